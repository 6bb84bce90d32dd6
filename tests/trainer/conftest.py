"""Fixtures of the trainer suite: real trainer (and policy) servers as subprocesses on 127.0.0.1.

`start_trainer(model_dir, data_dir, *args)` runs `python -m trainer_server` on port 0 and waits for
SERVING; every server started is stopped at the end of the test (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.process import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--threads", "1", "--publish-retry", "0.3"]  # two cores shared with the policy server


@pytest.fixture
def start_trainer():
    started: list[ServerProcess] = []

    def start(model_dir: Path, data_dir: Path, *args: str, module: str = "trainer_server",
              prefix: tuple[str, ...] = (), wait_healthy: bool = True) -> ServerProcess:
        server = start_server(
            module,
            [*prefix, "--model", str(model_dir), "--data", str(data_dir), "--port", "0", "--host", "127.0.0.1",
             *FAST, *args],
            name="trainer", cwd=ROOT, wait_healthy=wait_healthy, timeout=180,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_policy():
    """A policy server per test (the session-wide one in tests/conftest.py keeps its weights
    across tests; trainer tests change them)."""
    started: list[ServerProcess] = []

    def start(model_dir: Path, *args: str, port: int = 0) -> ServerProcess:
        server = start_server(
            "policy_server", ["--model", str(model_dir), "--port", str(port), "--host", "127.0.0.1", *args],
            name="policy", cwd=ROOT, timeout=180,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
