"""Start the servers as real subprocesses and wait until they serve: one server, or a policy
server and a trainer publishing to it, stopped together.

The one launcher of the project: `tokenfeedback serve` and `tokenfeedback label`, the demo, the
load test and the tests all start servers through it, so every one of them talks to a server
exactly as a user's process would. It lives in the client package because it needs only grpc and
the health stubs, no server code: the servers run as `python -m policy_server` and
`python -m trainer_server`, which the child must be able to import (the repository on its path:
the working folder, `cwd=`, or the venv's path file).

A server announces its bound address by printing one line `tokenfeedback: <name> listening on
HOST:PORT` to stdout (`announce`; port 0 binds a free port), then, when it serves Connect
(`--http-port`), `tokenfeedback: <name> connect on http://HOST:PORT`, and reports SERVING on the
standard health service once its model is loaded.

    with start_servers("data/demo-model", "data/trainer", http=True) as servers:
        print(servers.policy.address, servers.trainer.address, servers.policy.connect_url)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LISTENING = re.compile(r"tokenfeedback: (\S+) listening on (\S+:\d+)")
# What a server prints once its Connect port is bound (common/connect.py, announce_connect).
CONNECT = re.compile(r"tokenfeedback: (\S+) connect on (https?://\S+:\d+)")
DEFAULT_TIMEOUT = 300.0  # seconds a server may take to bind and load its model


class LaunchError(RuntimeError):
    """A server did not start, or never became healthy; the message holds the end of its log."""


def announce(name: str, host: str, port: int) -> None:
    """What a server prints once bound (the line `start_server` waits for)."""
    print(f"tokenfeedback: {name} listening on {host}:{port}", flush=True)


@dataclass
class ServerProcess:
    """A running server subprocess; `address` is HOST:PORT. Use as a context manager."""

    name: str
    proc: subprocess.Popen
    address: str = ""
    output: deque = field(default_factory=lambda: deque(maxlen=400))

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(list(self.output)[-lines:])

    @property
    def connect_url(self) -> str:
        """The Connect URL the server printed ("" when it serves no Connect port)."""
        for line in list(self.output):
            if match := CONNECT.search(line):
                return match.group(2)
        return ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for a clean exit, SIGKILL if it does not come. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    module: str,
    args: Sequence[str],
    *,
    name: str | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    wait_healthy: bool = True,
    credentials: grpc.ChannelCredentials | None = None,
    python: str | Path | None = None,
) -> ServerProcess:
    """Run `python -m module args...`, wait for its listening line and (optionally) SERVING health
    (over TLS with `credentials` when the server has --tls-cert; health needs no token).
    `python`: the interpreter to run it with (another venv's, e.g. vLLM's); default this one.
    Raises LaunchError (the process killed) when either does not come within `timeout`."""
    cmd = [str(python or sys.executable), "-u", "-m", module, *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    )
    server = ServerProcess(name or module, proc)
    found = threading.Event()

    def pump() -> None:  # keeps the pipe drained for the whole life of the process
        for line in proc.stdout:
            server.output.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match and not found.is_set():
                server.address = match.group(2)
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise LaunchError(f"{' '.join(cmd)} did not start (exit {proc.returncode}):\n{server.log_tail()}")
    if wait_healthy:
        try:
            wait_serving(server.address, deadline - time.monotonic(), proc, credentials)
        except Exception:
            server.kill()
            raise LaunchError(f"{server.name} never became healthy:\n{server.log_tail()}") from None
    return server


def wait_serving(address: str, timeout: float, proc: subprocess.Popen | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    """Poll the standard health service until it says SERVING."""
    deadline = time.monotonic() + timeout
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s")
            time.sleep(0.2)


# ---- policy + trainer ------------------------------------------------------------------------


@dataclass
class Servers:
    """A policy server and a trainer started together; stop() stops the trainer first."""

    policy: ServerProcess
    trainer: ServerProcess

    @property
    def processes(self) -> tuple[ServerProcess, ServerProcess]:
        return self.policy, self.trainer

    def stop(self) -> dict[str, int]:
        """Stop both (trainer, then policy); their exit codes by name."""
        return {server.name: server.stop() for server in (self.trainer, self.policy)}

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def check_model(model: str | Path) -> None:
    """FileNotFoundError when `model` looks like a local folder (not a hub id) and is missing."""
    text = str(model)
    if not Path(text).exists() and text.startswith(("data/", ".", "/")):
        raise FileNotFoundError(f"--model: no model at {text} (run `make model`, or pass --model DIR)")


def start_servers(
    model: str | Path,
    data: str | Path,
    *,
    policy_port: int = 0,
    trainer_port: int = 0,
    http: bool = False,
    policy_http_port: int = 0,
    trainer_http_port: int = 0,
    args: Sequence[str] = (),
    policy_args: Sequence[str] = (),
    trainer_args: Sequence[str] = (),
    publish: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    say: Callable[[str], None] | None = None,
) -> Servers:
    """Start the policy server on `model`, then a trainer on the same model with its store and
    checkpoints in `data`, publishing to that policy server (unless publish=False), and wait
    until both serve. Port 0 binds a free port. http=True also serves Connect on
    policy_http_port / trainer_http_port (0: free ports; `ServerProcess.connect_url` has them).
    `args` go to both servers (e.g. TLS and token files), `policy_args` / `trainer_args` to one.
    `say` hears what is being started. If anything fails or is interrupted (Ctrl-C), what was
    started is stopped again before the exception leaves."""
    check_model(model)
    say = say or (lambda text: None)
    options = dict(timeout=timeout, cwd=cwd, env=env, credentials=credentials)
    policy_http = ["--http-port", str(policy_http_port)] if http else []
    trainer_http = ["--http-port", str(trainer_http_port)] if http else []
    policy = trainer = None
    try:
        say(f"starting the policy server on {model} ...")
        policy = start_server("policy_server", ["--model", str(model), "--port", str(policy_port), *policy_http,
                                                *args, *policy_args], name="policy", **options)
        say("starting the trainer server ...")
        publish_to = ["--policy", policy.address] if publish else []
        trainer = start_server("trainer_server", ["--model", str(model), "--data", str(data), "--port",
                                                  str(trainer_port), *trainer_http, *publish_to, *args,
                                                  *trainer_args], name="trainer", **options)
        if http:
            for server in (policy, trainer):
                wait_connect(server, timeout)
    except BaseException:
        if trainer is not None:
            trainer.stop()
        if policy is not None:
            policy.stop()
        raise
    return Servers(policy, trainer)


def wait_connect(server: ServerProcess, timeout: float) -> str:
    """The server's Connect URL, once its line has been read (it comes before SERVING)."""
    deadline = time.monotonic() + timeout
    while not server.connect_url:
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise LaunchError(f"{server.name} server printed no Connect address (does it take --http-port?):\n"
                              f"{server.log_tail(20)}")
        time.sleep(0.05)
    return server.connect_url
