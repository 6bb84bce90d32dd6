"""`tokenfeedback serve`: a policy server and a trainer for local use, until Ctrl-C or SIGTERM.

Both are started by the launcher (tokenfeedback/launch.py) on the given model; with
--policy-http-port / --trainer-http-port they also serve Connect (the labeling page, curl), and
the addresses are printed (or, with --json, emitted as one "serving" event).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time

from tokenfeedback.commands.registry import DEFAULT_POLICY, DEFAULT_TRAINER, CliError, Context, command
from tokenfeedback.launch import DEFAULT_TIMEOUT, start_servers


def _configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="data/demo-model", help="model folder or hub id (default data/demo-model)")
    p.add_argument("--data", default="data/trainer", help="trainer data folder: store, checkpoints")
    p.add_argument("--policy-port", type=int, default=int(DEFAULT_POLICY.rsplit(":", 1)[1]))
    p.add_argument("--trainer-port", type=int, default=int(DEFAULT_TRAINER.rsplit(":", 1)[1]))
    p.add_argument("--policy-http-port", type=int, default=None, metavar="PORT",
                   help="also serve Connect (browsers, curl) on this port; 0 picks a free one (default: off)")
    p.add_argument("--trainer-http-port", type=int, default=None, metavar="PORT",
                   help="the trainer's Connect port, the same way (default: off)")
    p.add_argument("--policy-args", default="", help="extra policy_server flags, one quoted string")
    p.add_argument("--trainer-args", default="", help="extra trainer_server flags, one quoted string")
    p.add_argument("--startup-timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds each server may take to load")


@command("serve", "start a policy and a trainer server for local use; Ctrl-C stops both", _configure_serve)
def run_serve(args: argparse.Namespace, ctx: Context) -> int:
    if (args.policy_http_port is None) != (args.trainer_http_port is None):
        raise CliError("--policy-http-port and --trainer-http-port: give both (Connect on) or neither (off)")
    http = args.policy_http_port is not None

    def on_signal(signum, frame):  # SIGTERM behaves like Ctrl-C
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler of its own.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    servers = None
    failed = None
    try:
        try:
            servers = start_servers(
                args.model, args.data, policy_port=args.policy_port, trainer_port=args.trainer_port, http=http,
                policy_http_port=args.policy_http_port or 0, trainer_http_port=args.trainer_http_port or 0,
                policy_args=shlex.split(args.policy_args), trainer_args=shlex.split(args.trainer_args),
                timeout=args.startup_timeout, say=ctx.note)
        except FileNotFoundError as exc:
            raise CliError(str(exc)) from None
        policy, trainer = servers.processes
        if ctx.json:
            event = {"event": "serving", "policy": policy.address, "trainer": trainer.address,
                     "pids": {"policy": policy.proc.pid, "trainer": trainer.proc.pid}}
            if http:
                event |= {"policy_http": policy.connect_url, "trainer_http": trainer.connect_url}
            ctx.emit(event)
        else:
            ctx.say(f"policy  listening on {policy.address}\ntrainer listening on {trainer.address}")
            if http:
                ctx.say(f"policy  connect on {policy.connect_url}\ntrainer connect on {trainer.connect_url}")
            ctx.say(f"export TOKENFEEDBACK_POLICY={policy.address} TOKENFEEDBACK_TRAINER={trainer.address}")
            ctx.note("Ctrl-C stops both")
        while failed is None:
            time.sleep(0.5)
            failed = next((server for server in servers.processes if server.proc.poll() is not None), None)
        print(f"tokenfeedback serve: the {failed.name} server exited with code {failed.proc.returncode}:\n"
              f"{failed.log_tail(30)}", file=sys.stderr)
    except KeyboardInterrupt:
        ctx.note("stopping ...")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if servers is not None:
            codes = servers.stop()
            if ctx.json:
                ctx.emit({"event": "stopped", "exit_codes": codes})
            else:
                ctx.note("stopped " + ", ".join(f"{name} (exit {code})" for name, code in codes.items()))
    return 1 if failed is not None else 0
