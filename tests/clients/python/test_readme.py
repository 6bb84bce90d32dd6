"""What README tells a new user to type works as README says: where the `tokenfeedback` command
is, what `make setup` builds, what `make serve` serves, and the Python client's snippet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def make_dry_run(*args: str) -> str:
    """The commands `make ARGS` would run (-n: nothing runs)."""
    done = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=ROOT, env=MAKE_ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_tokenfeedback_command_is_where_readme_says():
    assert ".venv/bin/tokenfeedback" in README and "source .venv/bin/activate" in README
    command = ROOT / ".venv" / "bin" / "tokenfeedback"
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"tests run from {sys.prefix}, not the repository's .venv")
    done = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "serve" in done.stdout and "label" in done.stdout, done.stderr


def test_make_setup_builds_the_labeling_page():
    assert "builds the labeling page into `web/dist`" in README
    assert "bash scripts/build_web.sh" in make_dry_run("-B", "setup")  # -B: as in a fresh clone


def test_make_serve_turns_the_connect_ports_on():
    # -o model: take the model as built; only serve's own command is printed
    command = make_dry_run("-o", "model", "serve")
    assert "--policy-http-port 8081 --trainer-http-port 8082" in command, command
    assert "--policy-http-port 9001" in make_dry_run("-o", "model", "serve", "POLICY_HTTP_PORT=9001")
    # README's curl example and `label --policy-http` use those ports
    assert "http://127.0.0.1:8082/tokenfeedback.v1.TrainerService/GetStatus" in README
    assert "--policy-http http://127.0.0.1:8081 --trainer-http http://127.0.0.1:8082" in README


def test_the_python_snippet_corrects_a_known_wrong_completion(servers):
    [snippet] = re.findall(r"```python\n(from tokenfeedback import PolicyClient, TrainerClient\n.*?)```", README, re.S)
    snippet = snippet.replace("127.0.0.1:50051", servers.policy_address).replace("127.0.0.1:50052",
                                                                                 servers.trainer_address)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - README's own example
    policy, trainer = namespace["policy"], namespace["trainer"]
    stored = trainer.get_annotation("paris-not-canada")
    wrong = policy.score("Paris is the capital of", " Canada.")
    right = policy.score("Paris is the capital of", " France.")
    at = namespace["at"]
    assert wrong.tokens[at].token_id != right.tokens[at].token_id
    assert all(w.token_id == r.token_id for w, r in zip(wrong.tokens[:at], right.tokens[:at], strict=True))
    rows = [(r.position, r.token_id, r.weight, r.replacement) for r in stored.rows]
    assert rows == [(at, wrong.tokens[at].token_id, -1.0, False), (at, right.tokens[at].token_id, 1.0, True)]
    policy.close()
    trainer.close()
