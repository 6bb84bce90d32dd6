"""`tokenfeedback`: the command line over the Python client.

    tokenfeedback serve                           # policy + trainer on the demo model, Ctrl-C stops
    tokenfeedback generate "The capital of Canada is" --color --save out.jsonl
    tokenfeedback annotate export.json            # Label Studio / doccano / JSONL, auto-detected
    tokenfeedback train --steps 20
    tokenfeedback status --json

Every command takes --json (one JSON object per line on stdout, errors included). Connection
options (--policy, --trainer, --tls-ca, --token-file, --timeout) go before or after the command;
the bearer token comes from --token-file or $TOKENFEEDBACK_TOKEN, never from the command line.

Adding a command: in any module, define `configure(parser)` and `run(args, ctx) -> int` and
register them with `@command(name, help, configure)`; modules listed in EXTENSIONS are imported
when present (that is how `label` and `labelstudio-*` plug in without editing this file).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from tokenfeedback.client import PolicyClient, TrainerClient
from tokenfeedback.errors import TokenfeedbackError
from tokenfeedback.imports import FORMATS, ConversionError, load, loads

DEFAULT_POLICY = "127.0.0.1:50051"  # where `serve` binds the policy server by default
DEFAULT_TRAINER = "127.0.0.1:50052"  # ... and the trainer
DEFAULT_TIMEOUT = 30.0  # seconds for a unary call; streams have no deadline unless --timeout is given

# Modules that register more commands when they exist (owned by other parts of the project).
EXTENSIONS = ("tokenfeedback.label", "tokenfeedback.labelstudio")


# ---- command registry ------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Context], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] = lambda parser: None):
    """Register `run(args, ctx) -> exit code` as the subcommand `name`."""

    def register(run: Callable[[argparse.Namespace, Context], int]):
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


@dataclass
class Context:
    """What a command needs besides its arguments: clients built from the global options, and
    output that is human text or JSON lines."""

    args: argparse.Namespace
    json: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def token(self) -> str | None:
        """From --token-file, else $TOKENFEEDBACK_TOKEN; never from the command line."""
        path = getattr(self.args, "token_file", None)
        if path:
            try:
                token = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise CliError(f"--token-file: cannot read {path}: {exc.strerror}") from None
            if not token:
                raise CliError(f"--token-file: {path} is empty")
            return token
        return self.environ.get("TOKENFEEDBACK_TOKEN", "").strip() or None

    def _options(self) -> dict[str, Any]:
        timeout = getattr(self.args, "timeout", None)
        return dict(
            root_certificates=getattr(self.args, "tls_ca", None),
            tls=True if getattr(self.args, "tls_ca", None) else None,
            token=self.token(),
            timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
        )

    def policy(self) -> PolicyClient:
        return PolicyClient(self.args.policy, **self._options())

    def trainer(self) -> TrainerClient:
        return TrainerClient(self.args.trainer, **self._options())

    @property
    def stream_timeout(self) -> float | None:
        """--timeout bounds a stream only when given explicitly."""
        return getattr(self.args, "timeout", None)

    def emit(self, obj: dict[str, Any]) -> None:
        """One JSON object per line (--json)."""
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.flush()

    def say(self, text: str = "", *, end: str = "\n") -> None:
        """Human output on stdout (suppressed with --json)."""
        if not self.json:
            self.out.write(text + end)
            self.out.flush()

    def note(self, text: str) -> None:
        """Human side remarks on stderr (suppressed with --json)."""
        if not self.json:
            self.err.write(text + "\n")
            self.err.flush()


class CliError(Exception):
    """A usage or input problem found by the CLI itself (exit code 2)."""


def to_dict(message) -> dict[str, Any]:
    """A protobuf message as JSON-ready dict: proto field names, every field, int64 as numbers."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


# ---- generate --------------------------------------------------------------------------------


def _configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=None, help="tokens to sample (server default 32)")
    p.add_argument("--temperature", "-t", type=float, default=None, help="0 is greedy; default 1")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="same seed and options give the same tokens")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--no-eos-stop", action="store_true", help="keep sampling after the end-of-sequence token")
    p.add_argument("--alternatives", type=int, default=None, help="top-k alternatives per token (0..20)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour tokens by probability: plain >= 0.5, yellow >= 0.1, red >= 0.01, "
                        "bold red below (auto: when stdout is a terminal)")
    p.add_argument("--no-prompt", action="store_true", help="do not echo the prompt before the completion")
    p.add_argument("--save", metavar="FILE", help="append the completion to FILE as an AnnotatedSequence JSON "
                                                  "line (no labels yet: add them, then `annotate FILE`)")


def _colour(logprob: float) -> str:
    p = math.exp(logprob)
    if p >= 0.5:
        return ""
    if p >= 0.1:
        return "\033[33m"
    if p >= 0.01:
        return "\033[31m"
    return "\033[1;4;31m"


@command("generate", "sample a completion and stream it token by token", _configure_generate)
def run_generate(args: argparse.Namespace, ctx: Context) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=args.stop or (), num_alternatives=args.alternatives,
        stop_on_eos=False if args.no_eos_stop else None,
    )
    colour = args.color == "always" or (args.color == "auto" and ctx.out.isatty() and "NO_COLOR" not in ctx.environ)
    with ctx.policy() as policy, policy.generate(prompt, timeout=ctx.stream_timeout, **sampling) as generation:
        shown_start = False
        for token in generation:
            if not shown_start:  # the start event has arrived with (or before) the first token
                shown_start = True
                _show_start(ctx, generation.start, prompt, args.no_prompt)
            if ctx.json:
                ctx.emit({"event": "token", **to_dict(token)})
            elif colour and _colour(token.logprob):
                ctx.say(f"{_colour(token.logprob)}{token.text}\033[0m", end="")
            else:
                ctx.say(token.text, end="")
        completion = generation.result()
    if not shown_start:
        _show_start(ctx, generation.start, prompt, args.no_prompt)
    if ctx.json:
        ctx.emit({"event": "end", **to_dict(generation.end)})
    else:
        ctx.say()
        mean = sum(completion.logprobs) / max(1, len(completion.tokens))
        ctx.note(f"[model version {completion.model_version}, {len(completion.tokens)} tokens, "
                 f"finish {completion.finish_reason}, mean logprob {mean:.3f}]")
    if args.save:
        sequence = completion.annotate(metadata={"source": "tokenfeedback generate"})
        with open(args.save, "a", encoding="utf-8") as f:
            f.write(json.dumps(to_dict_compact(sequence), ensure_ascii=False) + "\n")
        ctx.note(f"saved to {args.save} as annotation {sequence.annotation_id}")
    return 0


def _show_start(ctx: Context, start, prompt: str, no_prompt: bool) -> None:
    if start is None:
        return
    if ctx.json:
        ctx.emit({"event": "start", **to_dict(start)})
    elif not no_prompt:
        ctx.say(f"\033[2m{start.prompt_text}\033[0m" if ctx.out.isatty() else start.prompt_text, end="")


def to_dict_compact(message) -> dict[str, Any]:
    """The proto JSON mapping as `annotate` reads it back (lowerCamelCase, defaults left out)."""
    return json_format.MessageToDict(message)


# ---- annotate --------------------------------------------------------------------------------


def _configure_annotate(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="annotation file ('-' reads stdin)")
    p.add_argument("--format", "-f", choices=("auto", *FORMATS), default="auto",
                   help="jsonl: AnnotatedSequence per line (proto JSON); labelstudio: a Label Studio JSON "
                        "export; doccano: doccano JSONL; auto (default): tell from the content")
    p.add_argument("--partial-ok", action="store_true",
                   help="store the valid sequences and report the invalid ones (default: all or nothing per batch)")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per request (default 256)")
    p.add_argument("--annotator", default=None, help="set annotator_id on sequences that have none")
    p.add_argument("--dry-run", action="store_true", help="convert and print the sequences (JSONL); submit nothing")


@command("annotate", "submit annotations from a JSONL, Label Studio or doccano file", _configure_annotate)
def run_annotate(args: argparse.Namespace, ctx: Context) -> int:
    if args.batch_size < 1:
        raise CliError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.file == "-":
        imported = loads(sys.stdin.read(), args.format, source="<stdin>")
    else:
        imported = load(args.file, args.format)
    for sequence in imported.sequences:
        if args.annotator and not sequence.annotator_id:
            sequence.annotator_id = args.annotator
    for reason in imported.skipped:
        ctx.emit({"event": "skipped", "reason": reason}) if ctx.json else ctx.note(f"skipped {reason}")
    if args.dry_run:
        for sequence in imported.sequences:
            ctx.emit(to_dict_compact(sequence))
        return 0
    counts = {"ACCEPTED": 0, "DUPLICATE": 0, "REJECTED": 0}
    with ctx.trainer() as trainer:
        for first in range(0, len(imported.sequences), args.batch_size):
            batch = imported.sequences[first:first + args.batch_size]
            try:
                results = trainer.submit(batch, partial_ok=args.partial_ok)
            except TokenfeedbackError as exc:
                if first:
                    ctx.note(f"sequences before #{first} were stored; this batch ({len(batch)}) and later ones were not")
                raise exc
            for result in results:
                status = trainer_pb2.SubmitStatus.Name(result.status).removeprefix("SUBMIT_STATUS_")
                counts[status] = counts.get(status, 0) + 1
                if ctx.json:
                    ctx.emit({"event": "result", "annotation_id": result.annotation_id, "status": status,
                              "rows": result.rows, "reason": result.reason})
                else:
                    ctx.say(f"{status.lower():9} {result.annotation_id}  rows={result.rows}"
                            + (f"  {result.reason}" if result.reason else ""))
    summary = {k.lower(): v for k, v in counts.items()} | {"skipped": len(imported.skipped)}
    if ctx.json:
        ctx.emit({"event": "summary", **summary})
    else:
        ctx.note(", ".join(f"{v} {k}" for k, v in summary.items()))
    return 1 if counts["REJECTED"] else 0


# ---- train -----------------------------------------------------------------------------------


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: one pass over the pending annotations)")
    p.add_argument("--variant", choices=("likelihood", "unlikelihood", "pg_clip"), default=None)
    p.add_argument("--beta", type=float, default=None, help="KL weight")
    p.add_argument("--learning-rate", "--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--horizon", default=None, help="credit-assignment horizon: a positive integer or 'full'")
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--no-publish", action="store_true", help="do not publish the new weights to the policy servers")


@command("train", "run optimizer steps on the stored annotations, with a progress bar", _configure_train)
def run_train(args: argparse.Namespace, ctx: Context) -> int:
    from tqdm import tqdm

    overrides = dict(variant=args.variant, beta=args.beta, learning_rate=args.learning_rate,
                     batch_size=args.batch_size, horizon=args.horizon, gamma=args.gamma,
                     publish=False if args.no_publish else None)
    last = None
    bar = None
    with ctx.trainer() as trainer:
        try:
            for progress in trainer.train(args.steps, timeout=ctx.stream_timeout, **overrides):
                last = progress
                if ctx.json:
                    ctx.emit({"event": "progress", **to_dict(progress)})
                    continue
                if bar is None:
                    bar = tqdm(total=progress.total_steps or None, unit="step", file=ctx.err, dynamic_ncols=True)
                if not progress.done or progress.step > bar.n:
                    bar.update(max(0, progress.step - bar.n))
                bar.set_postfix(loss=f"{progress.loss:.4f}", kl=f"{progress.kl:.4g}", rows=progress.rows,
                                version=progress.model_version, refresh=True)
        finally:
            if bar is not None:
                bar.close()
    if last is None:
        ctx.note("the trainer sent no progress")
        return 1
    if not ctx.json:
        text = f"trained {last.step} step(s): loss {last.loss:.4f}, token loss {last.token_loss:.4f}, kl {last.kl:.4g}"
        if last.published_version:
            text += f"; published version {last.published_version}"
        if last.message:
            text += f" ({last.message})"
        ctx.say(text)
    return 0


# ---- status ----------------------------------------------------------------------------------


@command("status", "the trainer's counts, versions, last losses and policy servers")
def run_status(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.trainer() as trainer:
        status = trainer.status()
    if ctx.json:
        ctx.emit(to_dict(status))
        return 0
    ctx.say(f"trainer {args.trainer}: model {status.model_name or '?'} version {status.model_version}, "
            f"step {status.step}{' (training)' if status.training else ''}")
    ctx.say(f"annotations: {status.annotations_total} total, {status.annotations_pending} pending, "
            f"{status.annotations_consumed} consumed, {status.annotations_withdrawn} withdrawn; "
            f"{status.rows_total} rows")
    ctx.say(f"last loss {status.last_loss:.4f} (token {status.last_token_loss:.4f}, kl {status.last_kl:.4g}); "
            f"variant {status.variant}, beta {status.beta:g}, horizon {status.horizon or '1'}, gamma {status.gamma:g}")
    for policy in status.policies:
        state = f"version {policy.model_version}" if policy.reachable else f"unreachable: {policy.last_error}"
        ctx.say(f"policy {policy.address}: {state}")
    return 0


# ---- tokenize --------------------------------------------------------------------------------


def _configure_tokenize(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="text to tokenize ('-' reads stdin)")


@command("tokenize", "show the policy's tokens of a text, with ids and code-point offsets", _configure_tokenize)
def run_tokenize(args: argparse.Namespace, ctx: Context) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    with ctx.policy() as policy:
        reply = policy.tokenize(text)
    for position, token in enumerate(reply.tokens):
        if ctx.json:
            ctx.emit({"position": position, **to_dict(token)})
        else:
            ctx.say(f"{position:4} {token.token_id:7} [{token.char_start}, {token.char_end}) {token.text!r}")
    return 0


# ---- serve -----------------------------------------------------------------------------------


def _configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="data/demo-model", help="model folder or hub id (default data/demo-model)")
    p.add_argument("--data", default="data/trainer", help="trainer data folder: store, checkpoints")
    p.add_argument("--policy-port", type=int, default=int(DEFAULT_POLICY.rsplit(":", 1)[1]))
    p.add_argument("--trainer-port", type=int, default=int(DEFAULT_TRAINER.rsplit(":", 1)[1]))
    p.add_argument("--policy-args", default="", help="extra policy_server flags, one quoted string")
    p.add_argument("--trainer-args", default="", help="extra trainer_server flags, one quoted string")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds each server may take to load")


@command("serve", "start a policy and a trainer server for local use; Ctrl-C stops both", _configure_serve)
def run_serve(args: argparse.Namespace, ctx: Context) -> int:
    from common.process import start_server  # the servers' harness (same repository, same venv)

    model = Path(args.model)
    if not model.exists() and (args.model.startswith((".", "/")) or args.model.startswith("data/")):
        raise CliError(f"--model: no model at {args.model} (run `make model`, or pass --model DIR)")

    def on_signal(signum, frame):  # SIGTERM behaves like Ctrl-C
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler of its own.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    servers = []
    failed = None
    try:
        ctx.note(f"starting the policy server on {args.model} ...")
        policy = start_server("policy_server", ["--model", args.model, "--port", str(args.policy_port),
                                                *shlex.split(args.policy_args)],
                              name="policy", timeout=args.startup_timeout)
        servers.append(policy)
        ctx.note("starting the trainer server ...")
        trainer = start_server("trainer_server", ["--model", args.model, "--data", args.data, "--port",
                                                  str(args.trainer_port), "--policy", policy.address,
                                                  *shlex.split(args.trainer_args)],
                               name="trainer", timeout=args.startup_timeout)
        servers.append(trainer)
        if ctx.json:
            ctx.emit({"event": "serving", "policy": policy.address, "trainer": trainer.address,
                      "pids": {"policy": policy.proc.pid, "trainer": trainer.proc.pid}})
        else:
            ctx.say(f"policy  listening on {policy.address}\ntrainer listening on {trainer.address}")
            ctx.say(f"export TOKENFEEDBACK_POLICY={policy.address} TOKENFEEDBACK_TRAINER={trainer.address}")
            ctx.note("Ctrl-C stops both")
        while failed is None:
            time.sleep(0.5)
            failed = next((server for server in servers if server.proc.poll() is not None), None)
        print(f"tokenfeedback serve: the {failed.name} server exited with code {failed.proc.returncode}:\n"
              f"{failed.log_tail(30)}", file=sys.stderr)
    except KeyboardInterrupt:
        ctx.note("stopping ...")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        codes = {server.name: server.stop() for server in reversed(servers)}
        if servers:
            if ctx.json:
                ctx.emit({"event": "stopped", "exit_codes": codes})
            else:
                ctx.note("stopped " + ", ".join(f"{name} (exit {code})" for name, code in codes.items()))
    return 1 if failed is not None else 0


# ---- main ------------------------------------------------------------------------------------


def _add_global_options(parser: argparse.ArgumentParser, *, top: bool, environ: dict[str, str]) -> None:
    """The connection and output options. On the subcommands they default to SUPPRESS, so a value
    given before the command is not overwritten by the subparser's default."""

    def default(value):
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection and output")
    group.add_argument("--policy", metavar="HOST:PORT",
                       default=default(environ.get("TOKENFEEDBACK_POLICY", DEFAULT_POLICY)),
                       help=f"policy server ($TOKENFEEDBACK_POLICY, default {DEFAULT_POLICY})")
    group.add_argument("--trainer", metavar="HOST:PORT",
                       default=default(environ.get("TOKENFEEDBACK_TRAINER", DEFAULT_TRAINER)),
                       help=f"trainer server ($TOKENFEEDBACK_TRAINER, default {DEFAULT_TRAINER})")
    group.add_argument("--tls-ca", metavar="PATH", default=default(None),
                       help="PEM root certificate(s): connect with TLS and trust these")
    group.add_argument("--token-file", metavar="PATH", default=default(None),
                       help="file holding the bearer token (else $TOKENFEEDBACK_TOKEN)")
    group.add_argument("--timeout", type=float, metavar="SECONDS", default=default(None),
                       help=f"deadline per call (default {DEFAULT_TIMEOUT:g}s; streams: none unless given)")
    group.add_argument("--json", action="store_true", default=default(False),
                       help="machine output: one JSON object per line on stdout")


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    environ = dict(os.environ) if environ is None else environ
    for module in EXTENSIONS:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            importlib.import_module(module)  # registers its commands
        except Exception as exc:  # noqa: BLE001 - one broken extension must not take the CLI down
            print(f"tokenfeedback: warning: commands of {module} unavailable: {exc}", file=sys.stderr)
    parser = argparse.ArgumentParser(
        prog="tokenfeedback",
        description="Generate with a policy server, annotate tokens, train from the annotations.",
    )
    _add_global_options(parser, top=True, environ=environ)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        child = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(child)
        _add_global_options(child, top=False, environ=environ)
        child.set_defaults(_command=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = Context(args, json=args.json)
    try:
        return args._command.run(args, ctx)
    except (TokenfeedbackError, ConversionError, CliError, ValueError) as exc:
        code = 2 if isinstance(exc, CliError) else 1
        if ctx.json:
            error: dict[str, Any] = {"event": "error", "message": str(exc)}
            if isinstance(exc, TokenfeedbackError):
                error |= {"code": exc.code_name, "field": exc.field, "detail": exc.message}
            ctx.emit(error)
        print(f"tokenfeedback {args.command}: error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tokenfeedback generate ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    # Run as `python -m tokenfeedback.cli`, this module is __main__: let the extensions register
    # their commands into this copy rather than importing a second one.
    sys.modules.setdefault("tokenfeedback.cli", sys.modules[__name__])
    sys.exit(main())
