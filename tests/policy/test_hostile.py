"""Hostile input, one client against the others (docs/design.md, "Errors and limits"): floats the
server computes with in float32 are bounded at the request; a stream whose row fails in the shared
decoding step ends alone with a status while the others finish; error messages quote client
values cut short; weight updates holding NaN or inf are refused before the swap."""

from __future__ import annotations

import asyncio
import math
import threading

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

import tokenfeedback.v1.common_pb2 as common_pb
import tokenfeedback.v1.policy_pb2 as pb
from common.errors import ServiceError, quote
from common.weights import iter_chunks
from policy_server import scheduler as scheduler_module
from policy_server.api import GenerateRequest, GenerationEnd, TokenEvent
from policy_server.sampling import MAX_TEMPERATURE, MIN_TEMPERATURE, SamplerState, SamplingParams, sample_rows
from tests.policy.conftest import generate, rpc_error, tokens_of, update_messages

GOOD = dict(max_new_tokens=24, seed=1, stop_on_eos=False)


# ---- bounds at the request ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [6e-38, 1e-45, 1e-4, MAX_TEMPERATURE * 1.01, 3e38, math.inf, math.nan, -1.0])
def test_temperature_bounded(stub, temperature):
    err = rpc_error(stub.Generate, pb.GenerateRequest(prompt_text="a", params=pb.SamplingParams(
        temperature=temperature, max_new_tokens=2)), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details().startswith("params.temperature: ") and f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]" in \
        err.details(), err.details()


@pytest.mark.parametrize("temperature", [0.0, MIN_TEMPERATURE, 1.0, MAX_TEMPERATURE])
def test_temperature_at_the_bounds_samples(stub, temperature):
    events = generate(stub, max_new_tokens=3, temperature=temperature, seed=0, stop_on_eos=False)
    assert len(tokens_of(events)) == 3


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.0001, math.nan])
def test_top_p_bounded(stub, top_p):
    err = rpc_error(stub.Generate, pb.GenerateRequest(prompt_text="a", params=pb.SamplingParams(top_p=top_p)),
                    timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("params.top_p: ")
    assert "(0, 1]" in err.details()


def test_hostile_temperature_among_good_streams(stub):
    """Three good streams and one at temperature 6e-38 (logits / T overflows float32), at once:
    the hostile one is refused, the three good ones finish."""
    results: dict[int, object] = {}

    def run(i: int, temperature: float) -> None:
        try:
            results[i] = generate(stub, temperature=temperature, **GOOD)
        except grpc.RpcError as err:
            results[i] = err

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate([1.0, 6e-38, 1.0, 1.0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert isinstance(results[1], grpc.RpcError) and results[1].code() == grpc.StatusCode.INVALID_ARGUMENT
    for i in (0, 2, 3):
        assert isinstance(results[i], list), results[i]
        assert len(tokens_of(results[i])) == GOOD["max_new_tokens"] and results[i][-1].HasField("end")


# ---- isolation in the shared decoding step --------------------------------------------------


class Unchecked(SamplingParams):
    """Parameters past the request's checks (what a bug, or a bound that missed a case, would let in)."""

    def validate(self, *args, **kwargs) -> None:
        pass


def test_sample_rows_fails_rows_alone():
    logits = torch.randn(4, 50)  # (B, V)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    states = [SamplerState(SamplingParams(seed=i), torch.device("cpu")) for i in range(3)]
    states.append(SamplerState(Unchecked(temperature=1e-45, seed=3), torch.device("cpu")))
    logits[3] = logits[0] * 1e3  # finite logits whose sampling distribution is not (logits / 1e-45)
    out = sample_rows(logits, states)
    assert not isinstance(out[0], Exception) and 0 <= out[0].token_id < 50
    for row in (1, 2, 3):
        assert isinstance(out[row], ServiceError), out[row]
    assert "not finite" in str(out[1]) and "not finite" in str(out[2])


@pytest.mark.parametrize("poisoned_at", [1, 3])
def test_failing_row_ends_alone(engine, monkeypatch, poisoned_at):
    """One stream's logits turn NaN at its first token (in the shared prefill) or its third (in
    the shared decoding step), injected into the shared step: that stream ends with an error
    naming what happened, the other three finish all their tokens."""
    real = scheduler_module.sample_rows
    calls: dict[int, int] = {}

    def poisoned(logits, states):
        logits = logits.clone()
        for row, state in enumerate(states):
            calls[id(state)] = calls.get(id(state), 0) + 1
            if state.params.seed == 666 and calls[id(state)] >= poisoned_at:
                logits[row] = float("nan")
        return real(logits, states)

    monkeypatch.setattr(scheduler_module, "sample_rows", poisoned)

    async def one(seed: int):
        request = GenerateRequest(prompt_text=f"Paris {seed}", params=SamplingParams(
            max_new_tokens=24, seed=seed, stop_on_eos=False))
        events = []
        try:
            async for event in engine.generate(request):
                events.append(event)
        except ServiceError as exc:
            return events, exc
        return events, None

    async def main():
        return await asyncio.gather(one(1), one(666), one(2), one(3))

    results = asyncio.run(main())
    events, error = results[1]
    assert error is not None and error.code == "INTERNAL" and "not finite" in str(error), error
    assert len([e for e in events if isinstance(e, TokenEvent)]) == poisoned_at - 1
    for i in (0, 2, 3):
        events, error = results[i]
        assert error is None, error
        assert len([e for e in events if isinstance(e, TokenEvent)]) == 24 and isinstance(events[-1], GenerationEnd)


# ---- client values quoted cut short ---------------------------------------------------------


def test_quote_cuts_long_values():
    assert quote("abc") == "'abc'"
    cut = quote("x" * 10_000, limit=80)
    assert len(cut) < 120 and "10000 characters" in cut


def test_long_sha256_is_invalid_argument_not_resource_exhausted(stub, tiny_model_dir):
    state = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    version = stub.GetModelInfo(pb.GetModelInfoRequest()).model_version
    err = rpc_error(stub.UpdateWeights, update_messages(state, version + 1, sha256="f" * 10_000), timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("commit.sha256: "), err
    assert len(err.details()) < 400


@pytest.mark.parametrize("part", ["name", "dtype"])
def test_long_chunk_strings_are_cut(stub, tiny_model_dir, part):
    state = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    chunks = list(iter_chunks(state, 64 * 1024))
    c = chunks[-1]  # a tensor sent in one chunk: renaming it keeps the header's tensor count
    chunks[-1] = type(c)("n" * 10_000 if part == "name" else c.name, "d" * 10_000 if part == "dtype" else c.dtype,
                         c.shape, c.offset, c.data)
    version = stub.GetModelInfo(pb.GetModelInfoRequest()).model_version
    err = rpc_error(stub.UpdateWeights, update_messages(state, version + 1, chunks=chunks), timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(f"chunk.{part}: "), err
    assert len(err.details()) < 400


def test_long_span_text_is_cut(stub):
    text = "hello " * 10_000
    err = rpc_error(stub.AlignSpans, pb.AlignSpansRequest(
        text=text, spans=[common_pb.CharSpan(start=0, end=50_000, text="y" * 50_000)]), timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("spans[0].text: "), err
    assert len(err.details()) < 400


# ---- weight updates checked for finite values -----------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_update_with_non_finite_values_changes_nothing(stub, tiny_model_dir, bad):
    state = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    name = "transformer.h.0.mlp.c_fc.weight"
    state[name] = state[name].clone()
    state[name][3, 5] = bad
    before = stub.GetModelInfo(pb.GetModelInfoRequest()).model_version
    err = rpc_error(stub.UpdateWeights, update_messages(state, before + 1), timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details().startswith("chunk.data: ") and name in err.details() and "not finite" in err.details()
    assert stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == before
    assert len(tokens_of(generate(stub, max_new_tokens=4, seed=0, stop_on_eos=False))) == 4
