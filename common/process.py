"""Start the servers as real subprocesses and wait until they serve.

Used by the tests, the demo, the CLI's `serve` and the benchmarks, so every one of them talks to a
server exactly as a user's process would. A server announces its bound address by printing one
line `tokenfeedback: <name> listening on HOST:PORT` to stdout (port 0 binds a free port), and
reports SERVING on the standard health service once its model is loaded.
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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LISTENING = re.compile(r"tokenfeedback: (\S+) listening on (\S+:\d+)")


def announce(name: str, host: str, port: int) -> None:
    """What a server prints once bound (the line ServerProcess waits for)."""
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


def vllm_python(root: str | Path) -> Path:
    """The python of the vLLM venv (`make vllm`: .cache/vllm-venv under the checkout `root`), for
    `start_server(..., python=...)` with `--engine vllm`; built first when missing (many minutes
    the first time, instant after: scripts/vllm_venv.sh keeps a stamp)."""
    script = Path(root) / "scripts" / "vllm_venv.sh"
    done = subprocess.run(["bash", str(script)], cwd=root, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def start_server(
    module: str,
    args: list[str],
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
    `python`: the interpreter to run it with (another venv's, e.g. vLLM's); default this one."""
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
            raise RuntimeError(f"{' '.join(cmd)} did not start (exit {proc.returncode}):\n{server.log_tail()}")
    if wait_healthy:
        try:
            wait_serving(server.address, deadline - time.monotonic(), proc, credentials)
        except Exception:
            server.kill()
            raise RuntimeError(f"{server.name} never became healthy:\n{server.log_tail()}") from None
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
