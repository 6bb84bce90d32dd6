"""The trainer publishes to a policy server on each non-default engine in POLICY_ENGINES (`make
test-integration`: vllm): annotate, train, publish; the next Score and Generate carry the new
version and the changed logprobs. The same loop and checks as tests/trainer/test_end_to_end.py,
whose Hugging Face run is part of `make test`."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

import tokenfeedback.v1.policy_pb2_grpc as pb_grpc
from common.process import ServerProcess, start_server
from tests.conftest import ROOT, VLLM_START_S, vllm_python
from tests.policy.conftest import ENGINES, VLLM_TEST_TIMEOUT_S, generate, tokens_of
from tests.trainer.conftest import start_trainer  # noqa: F401 - a fixture, used below
from tests.trainer.test_end_to_end import DEMO_MODEL, check_loop, run_loop


@pytest.fixture
def start_policy_on(request):
    """start(model_dir, port=N) for run_loop: a policy server on `request.param`'s engine."""
    started: list[ServerProcess] = []

    def start(model_dir: Path, *args: str, port: int = 0) -> ServerProcess:
        server = start_server(
            "policy_server", ["--engine", request.param, "--model", str(model_dir), "--port", str(port),
                              "--host", "127.0.0.1", *args],
            name="policy", cwd=ROOT, timeout=VLLM_START_S, python=vllm_python(),
        )
        started.append(server)
        return server

    start.started = started
    yield start
    for server in started:
        server.stop()


@pytest.mark.timeout(VLLM_TEST_TIMEOUT_S)
@pytest.mark.parametrize("start_policy_on", [e for e in ENGINES if e != "hf"], indirect=True)
@pytest.mark.skipif(not (DEMO_MODEL / "config.json").exists(), reason="no demo model: run `make model`")
def test_trainer_publishes_to_the_engine(start_policy_on, start_trainer, tmp_path):  # noqa: F811
    """On the demo model (vLLM's CPU attention does not take the tiny model's 16-dim heads), as
    tests/trainer/test_end_to_end.py::test_on_the_demo_model does on the Hugging Face engine."""
    r = run_loop(start_policy_on, start_trainer, DEMO_MODEL, tmp_path / "data", "Ottawa is the capital of",
                 "--lr", "1e-3")
    check_loop(r, min_shift=0.5)
    with grpc.insecure_channel(start_policy_on.started[0].address) as channel:
        events = generate(pb_grpc.PolicyServiceStub(channel), "Ottawa is the capital of", timeout=300,
                          max_new_tokens=4, temperature=0)
    assert events[0].start.model_version == 1 and {t.model_version for t in tokens_of(events)} == {1}
    assert events[-1].end.model_version == 1
