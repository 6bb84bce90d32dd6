"""The policy server on vLLM (`--engine vllm`), the smoke test that `make test` runs: one vLLM server
and one Hugging Face server on the same tiny model, side by side. Generate, Score, one weight update
while a stream runs; the vLLM engine agrees with the Hugging Face engine on the same weights within
LOGPROB_TOL, before and after the update. The whole contract suite runs on vLLM in
`make test-integration` (POLICY_ENGINES=hf,vllm)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

import tokenfeedback.v1.policy_pb2 as pb
import tokenfeedback.v1.policy_pb2_grpc as pb_grpc
from common.adapters import factor_names
from tests.conftest import ROOT
from tests.policy.conftest import VLLM_TEST_TIMEOUT_S, generate, rpc_error, tokens_of, update_messages

# vLLM's kernels and the Hugging Face forward differ in summation order: float32 logprobs of the
# same weights agree to this (README, "The policy server on vLLM").
LOGPROB_TOL = 1e-3
# Tokens of the stream that runs while an update arrives: most of the tiny model's context (1024).
STREAM_TOKENS = 1000

pytestmark = pytest.mark.timeout(VLLM_TEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_vllm_model_dir):
    return tiny_vllm_model_dir  # both servers on the tiny model vLLM loads


@pytest.fixture(scope="module")
def servers(tiny_model_dir, start_policy_server):
    """(vLLM stub, Hugging Face stub, vLLM server), both on the same tiny model."""
    vllm = start_policy_server(tiny_model_dir, "--max-new-tokens-limit", str(STREAM_TOKENS), engine="vllm")
    hf = start_policy_server(tiny_model_dir)
    with grpc.insecure_channel(vllm.address) as v, grpc.insecure_channel(hf.address) as h:
        yield pb_grpc.PolicyServiceStub(v), pb_grpc.PolicyServiceStub(h), vllm
    vllm.stop()
    hf.stop()


def score(stub, start, ids, **kw) -> pb.ScoreResponse:
    return stub.Score(pb.ScoreRequest(prompt_token_ids=start.prompt_token_ids, completion_token_ids=ids, **kw),
                      timeout=120)


def test_generate_and_score_agree_with_the_hf_engine(servers, tiny_model_dir):
    vllm, hf, _ = servers
    info = vllm.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_version == 0 and info.model_name == str(tiny_model_dir) and info.dtype == "float32"
    events = generate(vllm, "Paris is the capital of", timeout=300, max_new_tokens=24, seed=5, temperature=1.3,
                      top_p=0.9, num_alternatives=5, stop_on_eos=False)
    start, end, tokens = events[0].start, events[-1].end, tokens_of(events)
    assert len(tokens) == 24 and end.finish_reason == pb.FINISH_REASON_LENGTH
    assert {start.model_version, end.model_version, *(t.model_version for t in tokens)} == {0}
    assert end.completion_text == "".join(t.text for t in tokens)
    for t in tokens:  # sampled from the temperature-1.3, top-0.9 distribution: computed exactly
        assert math.isfinite(t.sampling_logprob) and t.sampling_logprob <= 0
        assert t.sampling_logprob != t.logprob and len(t.alternatives) == 5
    ids = [t.token_id for t in tokens]
    on_vllm = score(vllm, start, ids, num_alternatives=5, candidate_token_ids=[0, 7])
    on_hf = score(hf, start, ids, num_alternatives=5, candidate_token_ids=[0, 7])
    assert on_vllm.model_version == on_hf.model_version == 0
    for streamed, v, h in zip(tokens, on_vllm.tokens, on_hf.tokens, strict=True):
        assert abs(streamed.logprob - v.logprob) < LOGPROB_TOL and abs(v.logprob - h.logprob) < LOGPROB_TOL
        assert (v.text, v.char_start, v.char_end) == (h.text, h.char_start, h.char_end)
        assert max(abs(a - b) for a, b in zip(v.candidate_logprobs, h.candidate_logprobs, strict=True)) < LOGPROB_TOL
        assert [a.token_id for a in v.alternatives][:1] == [a.token_id for a in h.alternatives][:1]
    assert on_vllm.completion_text == on_hf.completion_text == end.completion_text


def test_update_waits_for_the_running_stream_and_matches_hf(servers, tiny_model_dir):
    """A stream running when an update arrives finishes on the old weights, every token labelled
    with the old version (its logprobs are the old weights' as the Hugging Face server, still on
    them, scores them); the update lands after it; new streams carry the new version, and both
    engines agree again once the Hugging Face server has the same update.

    vLLM decodes the tiny model so fast that on a quiet machine a whole stream can be done before
    the update reaches the server (nothing to wait for then). So a try whose update found no running
    stream is repeated, up to five times, each with the next version; the Hugging Face server takes
    each update too, so that it is always on the weights the next stream runs on."""
    vllm, hf, vllm_server = servers
    probe = pb.ScoreRequest(prompt_text="Paris is the capital of", completion_text=" Canada. Ottawa", num_alternatives=3)
    before = vllm.Score(probe, timeout=120)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    new = {name: t + 0.2 * torch.randn(t.shape, generator=g) for name, t in model.state_dict().items()}
    new["lm_head.weight"] = new["transformer.wte.weight"]  # tied in the model: travels once

    for version in range(1, 6):
        messages = list(update_messages(new, version))  # built before the stream: the update arrives at once
        stream = vllm.Generate(pb.GenerateRequest(prompt_text="Ottawa is", params=pb.SamplingParams(
            max_new_tokens=STREAM_TOKENS, seed=9, stop_on_eos=False)), timeout=600)
        start = next(stream).start
        assert start.model_version == version - 1
        tokens = [next(stream).token]  # decoding has started
        reply = {}
        updating = threading.Thread(target=lambda reply=reply, messages=messages: reply.update(
            r=vllm.UpdateWeights(iter(messages), timeout=600)))  # this try's dict and messages
        updating.start()
        rest = list(stream)
        updating.join(600)
        tokens += [e.token for e in rest if e.WhichOneof("event") == "token"]
        assert reply["r"].model_version == version
        assert len(tokens) == STREAM_TOKENS and rest[-1].end.model_version == version - 1
        assert {t.model_version for t in tokens} == {version - 1}
        old = score(hf, start, [t.token_id for t in tokens[:40]])  # the Hugging Face server is on the old version
        assert old.model_version == version - 1
        for t, s in zip(tokens, old.tokens, strict=False):
            assert abs(t.logprob - s.logprob) < LOGPROB_TOL
        hf_reply = hf.UpdateWeights(update_messages(new, version), timeout=120)
        assert hf_reply.model_version == version and reply["r"].tensors_updated == hf_reply.tensors_updated
        if f"1 running stream(s) keep version {version - 1}" in vllm_server.log_tail(400):
            break
    else:
        pytest.fail("no update found a running stream in five tries:\n" + vllm_server.log_tail(40))

    after = generate(vllm, "Ottawa is", timeout=300, max_new_tokens=8, seed=9, stop_on_eos=False)
    assert {after[0].start.model_version, *(t.model_version for t in tokens_of(after))} == {version}
    on_vllm, on_hf = vllm.Score(probe, timeout=120), hf.Score(probe, timeout=120)
    assert on_vllm.model_version == on_hf.model_version == version
    for v, h in zip(on_vllm.tokens, on_hf.tokens, strict=True):
        assert abs(v.logprob - h.logprob) < LOGPROB_TOL
    assert abs(on_vllm.total_logprob - before.total_logprob) > 0.1  # the weights did change


def test_a_client_going_away_aborts_its_vllm_request(servers):
    """Cancelling a stream cancels the task that drives it, which closes vLLM's output generator
    (vLLM aborts the request there); the server goes on serving. On a loaded machine vLLM may
    finish all 500 tokens of the tiny model before the cancel arrives (nothing to abort then), so
    a request is tried again, up to five times, until one is caught running."""
    vllm, _, vllm_server = servers
    for _attempt in range(5):
        call = vllm.Generate(pb.GenerateRequest(prompt_text="Ottawa is", params=pb.SamplingParams(
            max_new_tokens=500, seed=1, stop_on_eos=False)), timeout=300)
        start = next(call).start
        next(call)
        call.cancel()
        deadline = time.monotonic() + 30
        line = f"generation {start.generation_id} cancelled after"
        while line not in vllm_server.log_tail(400) and time.monotonic() < deadline:
            time.sleep(0.2)
        if line in vllm_server.log_tail(400):
            break
    else:
        pytest.fail("no request was cancelled in five tries:\n" + vllm_server.log_tail(40))
    assert len(tokens_of(generate(vllm, "Paris is", timeout=300, max_new_tokens=4, seed=2, stop_on_eos=False))) == 4


def test_score_needs_room_for_one_more_token_on_vllm(servers):
    """The one limit that differs: vLLM scores prompt + completion only below the model's length."""
    vllm, hf, _ = servers
    length = vllm.GetModelInfo(pb.GetModelInfoRequest()).max_length
    prompt, completion = [5] * 8, [7] * (length - 8)
    full = pb.ScoreRequest(prompt_token_ids=prompt, completion_token_ids=completion)
    assert len(hf.Score(full, timeout=300).tokens) == length - 8
    err = rpc_error(vllm.Score, full, timeout=300)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "completion_token_ids" in err.details()
    one_less = pb.ScoreRequest(prompt_token_ids=prompt, completion_token_ids=completion[:-1])
    assert len(vllm.Score(one_less, timeout=300).tokens) == length - 9


def test_without_vllm_the_server_says_how_to_install_it(tiny_model_dir):
    """The project's own venv has no vLLM: `--engine vllm` stops at once, naming `make vllm`."""
    done = subprocess.run([sys.executable, "-m", "policy_server", "--engine", "vllm", "--model", str(tiny_model_dir),
                           "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "make vllm" in done.stderr, done.stderr[-2000:]


def test_lora_adapter_updates_merge_as_on_the_hf_engine(servers, tiny_model_dir):
    """A published LoRA adapter (factors only, common/adapters.py) is merged into the vLLM server's
    weights as into the Hugging Face server's: both agree after it, and a second adapter replaces
    the first on top of the same base (both servers are at the same version after the test above)."""
    vllm, hf, _ = servers
    probe = pb.ScoreRequest(prompt_text="Paris is the capital of", completion_text=" Canada. Ottawa")
    version = vllm.GetModelInfo(pb.GetModelInfoRequest()).model_version
    assert hf.GetModelInfo(pb.GetModelInfoRequest()).model_version == version
    before = vllm.Score(probe, timeout=120)
    shapes = {name: t.shape for name, t in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}
    g = torch.Generator().manual_seed(11)
    for seed in (1, 2):  # the second adapter replaces the first
        adapter = {}
        for weight in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
            rows, cols = shapes[weight]
            up, down = factor_names(weight)
            adapter[up] = 0.3 * seed * torch.randn(rows, 4, generator=g)  # (S0, r)
            adapter[down] = torch.randn(4, cols, generator=g)  # (r, S1)
        version += 1
        on_vllm = vllm.UpdateWeights(update_messages(adapter, version), timeout=600)
        on_hf = hf.UpdateWeights(update_messages(adapter, version), timeout=120)
        assert on_vllm.model_version == on_hf.model_version == version
        v, h = vllm.Score(probe, timeout=120), hf.Score(probe, timeout=120)
        assert v.model_version == h.model_version == version
        for a, b in zip(v.tokens, h.tokens, strict=True):
            assert abs(a.logprob - b.logprob) < LOGPROB_TOL
        assert abs(v.total_logprob - before.total_logprob) > 0.1  # the adapter changed the weights
        streamed = tokens_of(generate(vllm, "Paris is", timeout=300, max_new_tokens=4, seed=2, stop_on_eos=False))
        assert len(streamed) == 4 and {t.model_version for t in streamed} == {version}
