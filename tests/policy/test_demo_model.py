"""The policy server on the real demo model (data/demo-model, built by `make model`; skipped when
it has not been built): it loads, generates within the model's 64-token context, and its streamed
logprobs agree with Score."""

from __future__ import annotations

import grpc
import pytest

import tokenfeedback.v1.policy_pb2 as pb
import tokenfeedback.v1.policy_pb2_grpc as pb_grpc
from tests.conftest import ROOT
from tests.policy.conftest import generate, tokens_of

DEMO = ROOT / "data" / "demo-model"


@pytest.fixture(scope="module")
def demo_stub(start_policy_server):
    if not (DEMO / "config.json").exists():
        pytest.skip("data/demo-model is not built (make model)")
    with start_policy_server(DEMO) as server, grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.PolicyServiceStub(channel)


def test_demo_model_generates_and_scores(demo_stub):
    info = demo_stub.GetModelInfo(pb.GetModelInfoRequest())
    events = generate(demo_stub, "Ottawa is the capital of", max_new_tokens=512, seed=0, num_alternatives=3)
    tokens = tokens_of(events)
    end = events[-1].end
    assert end.prompt_tokens + end.completion_tokens <= info.max_length
    assert end.finish_reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH) and end.completion_text.strip()
    score = demo_stub.Score(pb.ScoreRequest(prompt_token_ids=events[0].start.prompt_token_ids,
                                            completion_token_ids=[t.token_id for t in tokens]))
    for streamed, scored in zip(tokens, score.tokens, strict=True):
        assert abs(streamed.logprob - scored.logprob) < 1e-4
