"""Generate, Score, Tokenize, AlignSpans and GetModelInfo against the real server over gRPC."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import tokenfeedback.v1.common_pb2 as common_pb
import tokenfeedback.v1.policy_pb2 as pb
from tests.policy.conftest import generate, tokens_of

PROMPTS = ["Paris is the", "Ottawa is the capital of", "😀 Ünïcödé ß"]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("params", [dict(max_new_tokens=24, seed=1), dict(max_new_tokens=7, temperature=0),
                                    dict(max_new_tokens=40, seed=5, temperature=1.7, num_alternatives=2)])
def test_stream_shape_and_order(stub, prompt, params):
    events = generate(stub, prompt, **params)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and set(kinds[1:-1]) == {"token"}
    start, end, tokens = events[0].start, events[-1].end, tokens_of(events)
    tokenized = stub.Tokenize(pb.TokenizeRequest(text=prompt, add_special_tokens=True))
    assert list(start.prompt_token_ids) == [t.token_id for t in tokenized.tokens]
    assert start.prompt_text == prompt and len(start.generation_id) == 36
    assert [t.position for t in tokens] == list(range(len(tokens)))
    assert end.completion_tokens == len(tokens) and end.prompt_tokens == len(start.prompt_token_ids)
    assert end.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
    if end.finish_reason == pb.FINISH_REASON_LENGTH:
        assert len(tokens) == params["max_new_tokens"]
    text = "".join(t.text for t in tokens)
    assert end.completion_text == text
    offset = 0
    for t in tokens:  # spans tile the completion text, in code points
        assert (t.char_start, t.char_end) == (offset, offset + len(t.text))
        offset = t.char_end
    versions = {start.model_version, end.model_version, *(t.model_version for t in tokens)}
    assert versions == {0}
    # the completion's ids decode to the streamed text, piece for piece
    decoded = stub.Tokenize(pb.TokenizeRequest(token_ids=[t.token_id for t in tokens]))
    assert decoded.text == text and [p.text for p in decoded.tokens] == [t.text for t in tokens]


@pytest.mark.parametrize("params", [dict(seed=3), dict(seed=4, temperature=0.6, top_k=20), dict(temperature=0),
                                    dict(seed=9, top_p=0.8, temperature=1.3)])
def test_logprob_agrees_with_score(stub, params):
    events = generate(stub, "Berlin is the capital of", max_new_tokens=48, num_alternatives=5, **params)
    tokens = tokens_of(events)
    ids = [t.token_id for t in tokens]
    score = stub.Score(pb.ScoreRequest(prompt_token_ids=events[0].start.prompt_token_ids,
                                       completion_token_ids=ids, num_alternatives=5, candidate_token_ids=[0, 7]))
    assert [s.token_id for s in score.tokens] == ids
    for streamed, scored in zip(tokens, score.tokens, strict=True):
        assert abs(streamed.logprob - scored.logprob) < 1e-4
        assert streamed.rank == scored.rank
        assert [a.token_id for a in streamed.alternatives] == [a.token_id for a in scored.alternatives]
        assert (streamed.text, streamed.char_start, streamed.char_end) == (scored.text, scored.char_start, scored.char_end)
        for cand_id, cand_lp in zip([0, 7], scored.candidate_logprobs, strict=True):
            alts = {a.token_id: a.logprob for a in scored.alternatives}
            assert cand_lp <= 0 and (cand_id not in alts or abs(alts[cand_id] - cand_lp) < 1e-6)
    assert score.completion_text == events[-1].end.completion_text
    assert math.isclose(score.total_logprob, sum(s.logprob for s in score.tokens), rel_tol=1e-6)
    # Score from text: the same tokens when the text re-tokenizes to them
    again = stub.Score(pb.ScoreRequest(prompt_text="Berlin is the capital of", completion_text="Paris is nice"))
    assert again.completion_text == "Paris is nice" and again.tokens


@pytest.mark.parametrize("k", [1, 5, 20])
def test_alternatives_sorted_and_contain_the_sampled_token(stub, k):
    events = generate(stub, "Tokyo is", max_new_tokens=40, seed=k, temperature=1.5, num_alternatives=k)
    for t in tokens_of(events):
        lps = [a.logprob for a in t.alternatives]
        assert len(lps) == k and lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert t.logprob <= 0 and t.rank >= 1
        ids = [a.token_id for a in t.alternatives]
        if t.rank <= k:
            assert ids[t.rank - 1] == t.token_id and math.isclose(lps[t.rank - 1], t.logprob, abs_tol=1e-6)
        else:
            assert t.token_id not in ids and t.logprob <= lps[-1]
        assert all(isinstance(a.text, str) for a in t.alternatives)


def test_sampling_logprob(stub):
    plain = tokens_of(generate(stub, max_new_tokens=40, seed=2, num_alternatives=1))
    assert all(t.sampling_logprob == t.logprob for t in plain)  # temperature 1, no truncation: identical
    greedy = tokens_of(generate(stub, max_new_tokens=20, temperature=0))
    assert all(t.sampling_logprob == 0 and t.rank == 1 for t in greedy)
    top_k = tokens_of(generate(stub, max_new_tokens=40, seed=2, top_k=3))
    assert all(t.rank <= 3 and t.sampling_logprob >= t.logprob - 1e-6 for t in top_k)  # renormalized over 3
    hot = tokens_of(generate(stub, max_new_tokens=40, seed=2, temperature=2.0))
    assert any(abs(t.sampling_logprob - t.logprob) > 1e-3 for t in hot)
    nucleus = tokens_of(generate(stub, max_new_tokens=40, seed=2, top_p=0.5, num_alternatives=20))
    for t in nucleus:  # the sampled token is inside the smallest set reaching 0.5
        mass_before = sum(math.exp(a.logprob) for a in t.alternatives[: t.rank - 1])
        assert mass_before < 0.5 + 1e-5 and t.sampling_logprob >= t.logprob - 1e-6


def test_seeded_determinism_alone_and_batched(stub):
    request = dict(prompt_text="Canberra is the capital of", max_new_tokens=48, seed=1234, temperature=1.2, top_k=50)
    alone = [t.token_id for t in tokens_of(generate(stub, **request))]
    assert alone == [t.token_id for t in tokens_of(generate(stub, **request))]
    others = [dict(prompt_text=p, max_new_tokens=60, seed=i) for i, p in enumerate(PROMPTS * 2)]
    with ThreadPoolExecutor(8) as pool:  # the same request while other streams decode in the same batches
        futures = [pool.submit(generate, stub, **o) for o in others[:4]]
        futures.append(pool.submit(generate, stub, **request))
        futures += [pool.submit(generate, stub, **o) for o in others[4:]]
        results = [f.result() for f in futures]
    assert [t.token_id for t in tokens_of(results[4])] == alone
    different = [[t.token_id for t in tokens_of(generate(stub, **(request | {"seed": s})))] for s in (1, 2, 3)]
    assert any(d != alone for d in different)


def test_stop_strings(stub):
    free = generate(stub, "Paris is", max_new_tokens=30, seed=11)
    text = free[-1].end.completion_text
    stop = text[5:8] if len(text) >= 8 else text[-2:]
    assert stop
    events = generate(stub, "Paris is", max_new_tokens=30, seed=11, stop=["@@never@@", stop])
    end, tokens = events[-1].end, tokens_of(events)
    assert end.finish_reason == pb.FINISH_REASON_STOP and end.stop_sequence == stop
    assert stop in end.completion_text and stop not in end.completion_text[: tokens[-1].char_start + len(stop) - 1]
    assert text.startswith(end.completion_text)  # same seed: the same tokens up to the stop


def test_tokenize_and_align_spans(stub):
    text = "😀 Paris is the capital of Canada."
    tokenized = stub.Tokenize(pb.TokenizeRequest(text=text))
    assert tokenized.text == text and "".join(t.text for t in tokenized.tokens) == text
    reply = stub.AlignSpans(pb.AlignSpansRequest(text=text, spans=[
        common_pb.CharSpan(start=26, end=32, text="Canada"),
        common_pb.CharSpan(start=27, end=33, text="Canada"),  # UTF-16 offsets (the emoji counts 2): retried
        common_pb.CharSpan(start=0, end=1),
    ]))
    canada, canada16, emoji = reply.spans
    assert "".join(reply.tokens[i].text for i in canada.token_positions).strip() == "Canada"
    assert (canada16.start, canada16.end) == (26, 32) and canada16.token_positions == canada.token_positions
    assert "".join(reply.tokens[i].text for i in emoji.token_positions) == "😀"
    by_ids = stub.AlignSpans(pb.AlignSpansRequest(token_ids=[t.token_id for t in tokenized.tokens],
                                                  spans=[common_pb.CharSpan(start=26, end=32)]))
    assert by_ids.text == text and list(by_ids.spans[0].token_positions) == list(canada.token_positions)


def test_model_info(stub, tiny_model_dir):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_name == str(tiny_model_dir) and info.vocab_size > 256 and info.max_length == 1024
    assert info.max_new_tokens == 512 and info.dtype == "float32" and info.device == "cpu"
    assert {s.role for s in info.special_tokens} >= {"eos"} and info.tensor_count > 0 and info.parameter_bytes > 0


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tokenfeedback.v1.PolicyService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in reply.list_services_response.service}
    assert {"tokenfeedback.v1.PolicyService", "grpc.health.v1.Health"} <= names
