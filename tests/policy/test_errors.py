"""Every bad input gets INVALID_ARGUMENT naming the field, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

import tokenfeedback.v1.common_pb2 as common_pb
import tokenfeedback.v1.policy_pb2 as pb
from tests.policy.conftest import generate, rpc_error, tokens_of

P = pb.SamplingParams
LONG = [5] * 1024  # the tiny model's maximum length

GENERATE = {
    "empty prompt": (pb.GenerateRequest(), "prompt_text"),
    "both prompts": (pb.GenerateRequest(prompt_text="a", prompt_token_ids=[1]), "prompt_text"),
    "id over vocab": (pb.GenerateRequest(prompt_token_ids=[1, 10**6]), "prompt_token_ids[1]"),
    "negative id": (pb.GenerateRequest(prompt_token_ids=[-1]), "prompt_token_ids[0]"),
    "prompt too long": (pb.GenerateRequest(prompt_token_ids=LONG), "prompt_token_ids"),
    "max_new_tokens over limit": (pb.GenerateRequest(prompt_text="a", params=P(max_new_tokens=513)),
                                  "params.max_new_tokens"),
    "max_new_tokens negative": (pb.GenerateRequest(prompt_text="a", params=P(max_new_tokens=-1)),
                                "params.max_new_tokens"),
    "temperature < 0": (pb.GenerateRequest(prompt_text="a", params=P(temperature=-0.5)), "params.temperature"),
    "temperature nan": (pb.GenerateRequest(prompt_text="a", params=P(temperature=float("nan"))),
                        "params.temperature"),
    "top_p 0": (pb.GenerateRequest(prompt_text="a", params=P(top_p=0.0)), "params.top_p"),
    "top_p > 1": (pb.GenerateRequest(prompt_text="a", params=P(top_p=1.5)), "params.top_p"),
    "top_k < 0": (pb.GenerateRequest(prompt_text="a", params=P(top_k=-3)), "params.top_k"),
    "alternatives 21": (pb.GenerateRequest(prompt_text="a", params=P(num_alternatives=21)), "params.num_alternatives"),
    "alternatives < 0": (pb.GenerateRequest(prompt_text="a", params=P(num_alternatives=-1)), "params.num_alternatives"),
    "empty stop": (pb.GenerateRequest(prompt_text="a", params=P(stop=["ok", ""])), "params.stop[1]"),
    "too many stops": (pb.GenerateRequest(prompt_text="a", params=P(stop=list("abcdefghi"))), "params.stop"),
    "stop too long": (pb.GenerateRequest(prompt_text="a", params=P(stop=["x" * 300])), "params.stop[0]"),
}

SCORE = {
    "no completion": (pb.ScoreRequest(prompt_text="a"), "completion_text"),
    "no prompt": (pb.ScoreRequest(completion_text="a"), "prompt_text"),
    "both completions": (pb.ScoreRequest(prompt_text="a", completion_text="b", completion_token_ids=[1]),
                         "completion_text"),
    "completion id over vocab": (pb.ScoreRequest(prompt_text="a", completion_token_ids=[3, 99999]),
                                 "completion_token_ids[1]"),
    "candidate over vocab": (pb.ScoreRequest(prompt_text="a", completion_text="b", candidate_token_ids=[99999]),
                             "candidate_token_ids[0]"),
    "alternatives 25": (pb.ScoreRequest(prompt_text="a", completion_text="b", num_alternatives=25), "num_alternatives"),
    "too long": (pb.ScoreRequest(prompt_token_ids=LONG[:1000], completion_token_ids=LONG[:30]),
                 "completion_token_ids"),
}

OTHER = {
    "tokenize both": ("Tokenize", pb.TokenizeRequest(text="a", token_ids=[1]), "text"),
    "tokenize bad id": ("Tokenize", pb.TokenizeRequest(token_ids=[10**6]), "token_ids[0]"),
    "span past the end": ("AlignSpans", pb.AlignSpansRequest(text="hello", spans=[common_pb.CharSpan(start=2, end=9)]),
                          "spans[0].end"),
    "empty span": ("AlignSpans", pb.AlignSpansRequest(text="hello", spans=[common_pb.CharSpan(start=2, end=2)]),
                   "spans[0].start"),
    "span text differs": ("AlignSpans", pb.AlignSpansRequest(
        text="hello world", spans=[common_pb.CharSpan(start=0, end=1), common_pb.CharSpan(start=0, end=5, text="world")]),
        "spans[1].text"),
    "text differs from ids": ("AlignSpans", pb.AlignSpansRequest(text="hello", token_ids=[70, 71]), "text"),
}


def check_invalid(err: grpc.RpcError, field: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details().startswith(f"{field}: "), err.details()


@pytest.mark.parametrize("case", GENERATE)
def test_generate_rejects(stub, case):
    request, field = GENERATE[case]
    check_invalid(rpc_error(stub.Generate, request, timeout=30), field)


@pytest.mark.parametrize("case", SCORE)
def test_score_rejects(stub, case):
    request, field = SCORE[case]
    check_invalid(rpc_error(stub.Score, request, timeout=30), field)


@pytest.mark.parametrize("case", OTHER)
def test_tokenize_and_align_reject(stub, case):
    method, request, field = OTHER[case]
    check_invalid(rpc_error(getattr(stub, method), request, timeout=30), field)


def test_still_serving_after_bad_input(stub):
    for request, _ in GENERATE.values():
        rpc_error(stub.Generate, request, timeout=30)
    events = generate(stub, max_new_tokens=5, seed=0)
    assert len(tokens_of(events)) == 5 and events[-1].end.completion_tokens == 5
