"""The TypeScript and Go clients against real servers.

Starts a policy server and a trainer (publishing to it) as subprocesses on 127.0.0.1 with free
ports, then runs each client's own test suite (`node --test` in clients/typescript, `go test` in
clients/go) and its example program with the addresses in TOKENFEEDBACK_POLICY_ADDR and
TOKENFEEDBACK_TRAINER_ADDR; a failing suite fails here with its output and the servers' logs.
- The suites run on the tiny model of tests/conftest.py.
- The cross-language annotation vectors (tests/vectors/annotations.json) run on the demo model
  (`make model`), as the vectors' README says, one trainer for both languages (each run prefixes
  its annotation ids).
The clients are built first with `make clients-ts clients-go` (a no-op when nothing changed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tokenfeedback import PolicyClient, TrainerClient, launch

ROOT = Path(__file__).resolve().parents[2]
TS = ROOT / "clients" / "typescript"
GO = ROOT / "clients" / "go"
DEMO_MODEL = ROOT / "data" / "demo-model"
VECTORS = ROOT / "tests" / "vectors" / "annotations.json"
GO_PACKAGE = "tokenfeedback.dev/clients/go"
# What the example programs correct: a given completion known to be wrong, and the right one.
EXAMPLE_PROMPT = "Paris is the capital of"
EXAMPLE_COMPLETIONS = (" Canada.", " France.")

pytestmark = pytest.mark.slow


@dataclass
class Servers(launch.Servers):
    """The launcher's pair, with the environment and logs a client suite needs."""

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a client suite runs in: the servers' addresses, and nothing stale."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFEEDBACK_")}
        env.update(TOKENFEEDBACK_POLICY_ADDR=self.policy.address, TOKENFEEDBACK_TRAINER_ADDR=self.trainer.address)
        env.update(extra)
        return env

    def logs(self) -> str:
        return (f"--- policy server log (tail) ---\n{self.policy.log_tail(40)}\n"
                f"--- trainer log (tail) ---\n{self.trainer.log_tail(40)}")


def start_servers(model: Path, data: Path) -> Servers:
    return Servers(*launch.start_servers(model, data, args=["--host", "127.0.0.1"], cwd=ROOT).processes)


def run(cmd: list[str], cwd: Path, env: dict[str, str], servers: Servers | None, timeout: float = 600) -> str:
    """Run a client's command; fail with its output (and the servers' logs) unless it exits 0."""
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        pytest.fail(f"{' '.join(cmd)} ran past {timeout:.0f}s:\n{output[-8000:]}\n{servers.logs() if servers else ''}")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed (exit {done.returncode}) in {cwd}:\n{done.stdout[-12000:]}\n"
                    f"{servers.logs() if servers else ''}")
    return done.stdout


@pytest.fixture(scope="module")
def built() -> None:
    """Both clients built (node and go must be installed: `make system-deps`)."""
    for tool in ("node", "npm", "go"):
        assert shutil.which(tool), f"{tool} not found: run `make system-deps`"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    run(["make", "--no-print-directory", "clients-ts", "clients-go"], ROOT, env, None)


@pytest.fixture(scope="module")
def servers(built, tiny_model_dir, tmp_path_factory):
    both = start_servers(tiny_model_dir, tmp_path_factory.mktemp("trainer-data"))
    yield both
    both.stop()


@pytest.fixture(scope="module")
def demo_servers(built, tmp_path_factory):
    if not (DEMO_MODEL / "config.json").exists():
        pytest.skip(f"no demo model at {DEMO_MODEL}: run `make model` (the vectors use its tokenizer)")
    both = start_servers(DEMO_MODEL, tmp_path_factory.mktemp("trainer-data-vectors"))
    yield both
    both.stop()


# ---- TAP (node --test) and go test -v summaries --------------------------------------------------


def node_counts(output: str) -> dict[str, int]:
    """The totals node's test runner prints last: {'pass': n, 'fail': n, 'skipped': n, ...}."""
    return {key: int(value) for key, value in re.findall(r"^# (tests|pass|fail|cancelled|skipped|todo) (\d+)$", output, re.M)}


def go_results(output: str) -> dict[str, str]:
    """Test name -> PASS / FAIL / SKIP from `go test -v` output (subtests included)."""
    return dict((name, result) for result, name in re.findall(r"^\s*--- (PASS|FAIL|SKIP): (\S+)", output, re.M))


# ---- TypeScript ----------------------------------------------------------------------------------


def test_typescript_client(servers):
    files = sorted(str(p.relative_to(TS)) for p in (TS / "dist" / "test").glob("*.test.js"))
    assert {"dist/test/policy.test.js", "dist/test/trainer.test.js", "dist/test/unit.test.js"} <= set(files), files
    output = run(["node", "--test", "--test-concurrency=1", *files], TS, servers.env(), servers)
    counts = node_counts(output)
    # Everything runs but the vectors (their own test below, on the demo model).
    assert counts.get("fail") == 0 and counts.get("pass", 0) >= 40, f"{counts}\n{output[-4000:]}"
    assert re.findall(r"# SKIP (.*)", output) == [
        "TOKENFEEDBACK_VECTORS not set (the harness sets it with servers on the demo model)"
    ], output[-4000:]


def check_example_annotation(output: str, servers: Servers, language: str, credentials=None, token=None) -> None:
    """The example submitted exactly the intended correction: the given wrong completion, its
    first token that differs from the right one marked bad (-1), the right one's token there as
    the replacement. Never a judgement of the model's own output."""
    match = re.search(rf"^submitted (example-{language}-\S+): status 1 rows 2$", output, re.M)
    assert match, output
    options = dict(root_certificates=credentials, tls=True if credentials else None, token=token)
    with PolicyClient(servers.policy.address, **options) as policy, \
            TrainerClient(servers.trainer.address, **options) as trainer:
        wrong, right = (policy.score(EXAMPLE_PROMPT, text) for text in EXAMPLE_COMPLETIONS)
        stored = trainer.get_annotation(match.group(1))
    wrong_ids, right_ids = [t.token_id for t in wrong.tokens], [t.token_id for t in right.tokens]
    at = next(i for i, (a, b) in enumerate(zip(wrong_ids, right_ids, strict=False)) if a != b)
    assert list(stored.prompt_token_ids) == list(wrong.prompt_token_ids)
    assert list(stored.completion_token_ids) == wrong_ids
    rows = [(r.position, r.token_id, r.weight, r.replacement) for r in stored.rows]
    assert rows == [(at, wrong_ids[at], -1.0, False), (at, right_ids[at], 1.0, True)], (rows, output)
    assert re.search(rf'^bad token:  #{at} ".*" id {wrong_ids[at]} .*; replacement ".*" id {right_ids[at]} ', output, re.M), output


def test_typescript_example(servers):
    output = run(["node", "dist/examples/feedback.js"], TS, servers.env(), servers)
    check_example_annotation(output, servers, "ts")
    assert re.search(r"^step 1/1: loss \S+", output, re.M) and re.search(r"^done: model version \d+", output, re.M), output
    assert re.search(r'^logprob of ".*" \S+ -> \S+, of ".*" \S+ -> \S+$', output, re.M), output


def test_typescript_vectors(demo_servers):
    output = run(["node", "--test", "dist/test/vectors.test.js"], TS, demo_servers.env(TOKENFEEDBACK_VECTORS=str(VECTORS)),
                 demo_servers)
    counts = node_counts(output)
    assert counts.get("fail") == 0 and counts.get("skipped") == 0 and counts.get("pass", 0) >= 30, f"{counts}\n{output[-4000:]}"


# ---- Go ------------------------------------------------------------------------------------------


def go_test(servers: Servers, *args: str, **env: str) -> dict[str, str]:
    output = run(["bash", "go.sh", "test", "-count=1", "-v", *args, GO_PACKAGE], GO, servers.env(**env), servers)
    results = go_results(output)
    assert results and "FAIL" not in results.values(), output[-8000:]
    return results


def test_go_client(servers):
    results = go_test(servers)
    skipped = [name for name, result in results.items() if result == "SKIP"]
    # Everything runs but the vectors (their own test below, on the demo model).
    assert skipped == ["TestVectors"], results
    assert sum(result == "PASS" for result in results.values()) >= 25, results


def test_go_example(servers):
    output = run(["gopath/bin/example"], GO, servers.env(), servers)
    check_example_annotation(output, servers, "go")
    assert re.search(r"^step 1/1: loss \S+", output, re.M) and re.search(r"^done: model version \d+", output, re.M), output
    assert re.search(r'^logprob of ".*" \S+ -> \S+, of ".*" \S+ -> \S+$', output, re.M), output


def test_go_vectors(demo_servers):
    results = go_test(demo_servers, "-run", "^TestVectors$", TOKENFEEDBACK_VECTORS=str(VECTORS))
    assert results.get("TestVectors") == "PASS", results
    assert sum(name.startswith("TestVectors/") for name in results) >= 30, results


# ---- TLS and tokens (issue 7): the examples against servers with TLS and auth on -------------------

ANNOTATOR_TOKEN = "annotator-ts-go-4c1e9b7a2d5f"
ADMIN_TOKEN = "admin-ts-go-8e2f6a0c3b7d"


@dataclass
class SecureServers(Servers):
    ca: Path = Path()  # roots of the servers' certificates
    other_ca: Path = Path()  # an unrelated CA

    def env(self, token: str | None = None, ca: Path | None = None, **extra: str) -> dict[str, str]:
        env = super().env(**extra)
        env.update(TOKENFEEDBACK_CA=str(ca or self.ca), **({"TOKENFEEDBACK_TOKEN": token} if token else {}))
        return env


@pytest.fixture(scope="module")
def secure_servers(built, tiny_model_dir, tmp_path_factory):
    """Both servers with TLS (a throwaway CA) and tokens; the trainer publishes with the admin token."""
    from common.tls import channel_credentials
    from tests.reliability.certs import make_certs

    folder = tmp_path_factory.mktemp("secure")
    certs = make_certs(folder / "certs")
    for name, token in (("annotator", ANNOTATOR_TOKEN), ("admin", ADMIN_TOKEN)):
        (folder / name).write_text(token + "\n")
        (folder / name).chmod(0o600)
    secure = ["--host", "127.0.0.1", "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
              "--annotator-token-file", str(folder / "annotator"), "--admin-token-file", str(folder / "admin")]
    started = launch.start_servers(
        tiny_model_dir, folder / "data", args=secure, cwd=ROOT, credentials=channel_credentials(certs.ca),
        trainer_args=["--policy-tls-ca", str(certs.ca), "--policy-token-file", str(folder / "admin")])
    both = SecureServers(*started.processes, ca=certs.ca, other_ca=certs.other_ca)
    yield both
    both.stop()


EXAMPLES = {"typescript": (["node", "dist/examples/feedback.js"], TS), "go": (["gopath/bin/example"], GO)}


def run_example(language: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd, cwd = EXAMPLES[language]
    return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


@pytest.mark.parametrize("language", sorted(EXAMPLES))
def test_example_over_tls_with_tokens(secure_servers, language):
    """With the CA and the admin token the whole loop runs (generate, submit, train, publish over
    TLS); an annotator token is refused at Train; without a token, or trusting another CA, the
    first call fails with a clear error."""
    done = run_example(language, secure_servers.env(token=ADMIN_TOKEN))
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{secure_servers.logs()}"
    check_example_annotation(done.stdout, secure_servers, "ts" if language == "typescript" else "go",
                             credentials=secure_servers.ca.read_bytes(), token=ADMIN_TOKEN)
    assert re.search(r"^done: model version [1-9]\d*", done.stdout, re.M), done.stdout
    refusals = [(ANNOTATOR_TOKEN, None, r"permission.denied|PERMISSION_DENIED"),
                (None, None, r"unauthenticated|UNAUTHENTICATED"),
                (ADMIN_TOKEN, secure_servers.other_ca, r"unavailable|UNAVAILABLE")]
    for token, ca, pattern in refusals:
        done = run_example(language, secure_servers.env(token=token, ca=ca))
        assert done.returncode != 0 and re.search(pattern, done.stdout, re.I), (token, ca, done.stdout[-3000:])
