"""Fixtures of the Label Studio tests: real policy and trainer servers, the backend as a subprocess."""

from __future__ import annotations

import pytest
from labelstudio_harness import ROOT, start_servers

from common.process import ServerProcess, start_server


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    """Policy + trainer on the tiny model; a high learning rate so one training pass shows."""
    started = start_servers(tiny_model_dir, tmp_path_factory.mktemp("trainer-data"), "--lr", "1e-2")
    yield started
    started.trainer.stop()
    started.policy.stop()


@pytest.fixture(scope="module")
def start_backend(tmp_path_factory):
    """Factory: start_backend(policy, trainer, *args) -> ServerProcess of the backend (port 0)."""
    started: list[ServerProcess] = []

    def start(policy: str, trainer: str, *args: str) -> ServerProcess:
        state = tmp_path_factory.mktemp("backend") / "state.sqlite"
        backend = start_server(
            "tokenfeedback.labelstudio",
            ["--policy", policy, "--trainer", trainer, "--port", "0", "--state", str(state), *args],
            name="labelstudio-backend", cwd=ROOT, wait_healthy=False, timeout=60,
        )
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()
