"""Real servers for the Python client's integration tests.

`servers`: a policy server and a trainer (publishing to it) on the tiny model of tests/conftest.py,
started as subprocesses on 127.0.0.1 with free ports, stopped at the end of the module.
`demo_servers`: the same on the demo model (data/demo-model, `make model`), which the
cross-language test vectors are written against.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tokenfeedback.launch import Servers, start_servers

ROOT = Path(__file__).resolve().parents[3]
DEMO_MODEL = ROOT / "data" / "demo-model"


@dataclass
class BothServers(Servers):
    """The launcher's pair, with the addresses the tests pass to clients."""

    @property
    def policy_address(self) -> str:
        return self.policy.address

    @property
    def trainer_address(self) -> str:
        return self.trainer.address


def start_both(model: Path, data: Path) -> BothServers:
    servers = start_servers(model, data, args=["--host", "127.0.0.1"], cwd=ROOT)
    return BothServers(servers.policy, servers.trainer)


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    with start_both(tiny_model_dir, tmp_path_factory.mktemp("trainer-data")) as both:
        yield both


@pytest.fixture(scope="module")
def demo_servers(tmp_path_factory):
    if not (DEMO_MODEL / "config.json").exists():
        pytest.skip(f"no demo model at {DEMO_MODEL}: run `make model`")
    with start_both(DEMO_MODEL, tmp_path_factory.mktemp("trainer-data")) as both:
        yield both


@pytest.fixture(scope="session")
def cli():
    """cli(*args, env=..., stdin=...): `tokenfeedback ARGS` as a user runs it (a subprocess)."""
    return run_cli


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "tokenfeedback", *args],
        input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "TOKENFEEDBACK_TOKEN": "", **(env or {})},
    )
