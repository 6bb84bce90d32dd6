"""Fixtures of the Label Studio tests: real policy and trainer servers, the backend as a subprocess."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from common.process import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Servers:
    policy: ServerProcess
    trainer: ServerProcess
    model: Path


def start_servers(model: Path, data: Path, *trainer_args: str) -> Servers:
    policy = start_server("policy_server", ["--model", str(model), "--port", "0", "--host", "127.0.0.1"],
                          name="policy", cwd=ROOT, timeout=300)
    try:
        trainer = start_server(
            "trainer_server",
            ["--model", str(model), "--data", str(data), "--port", "0", "--host", "127.0.0.1",
             "--policy", policy.address, *trainer_args],
            name="trainer", cwd=ROOT, timeout=300,
        )
    except Exception:
        policy.stop()
        raise
    return Servers(policy, trainer, model)


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
