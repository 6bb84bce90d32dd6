"""UpdateWeights over gRPC: a good update changes outputs and the version, streams already running
keep their version, and a corrupted or interrupted update changes nothing."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

import tokenfeedback.v1.policy_pb2 as pb
from common.weights import iter_chunks
from tests.policy.conftest import generate, rpc_error, tokens_of, update_messages

PROBE = dict(prompt_text="Paris is the capital of", completion_text=" Canada. Ottawa is nice")


@pytest.fixture(scope="module")
def policy_server(tiny_model_dir, start_policy_server, policy_engine):
    with start_policy_server(tiny_model_dir, "--max-new-tokens-limit", "1000", engine=policy_engine) as server:
        yield server


@pytest.fixture(scope="module")
def state_dict(tiny_model_dir) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return model.state_dict()  # lm_head.weight and transformer.wte.weight share storage


def perturbed(state_dict, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Noise on every tensor; tied tensors (lm_head = wte) stay tied, as in the server's model."""
    g = torch.Generator().manual_seed(seed)
    out = {name: t + scale * torch.randn(t.shape, generator=g) for name, t in state_dict.items()}
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def fingerprint(stub) -> tuple:
    """What must not move when an update fails: the version, a score, a greedy completion."""
    score = stub.Score(pb.ScoreRequest(**PROBE))
    greedy = [t.token_id for t in tokens_of(generate(stub, max_new_tokens=12, temperature=0))]
    return stub.GetModelInfo(pb.GetModelInfoRequest()).model_version, score.total_logprob, greedy


def current_version(stub) -> int:
    return stub.GetModelInfo(pb.GetModelInfoRequest()).model_version


def test_update_changes_outputs_and_version(stub, state_dict, policy_server):
    version, logprob, greedy = fingerprint(stub)
    new = perturbed(state_dict, seed=1)
    reply = stub.UpdateWeights(update_messages(new, version + 1), timeout=60)
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert reply.model_version == version + 1 == info.model_version
    assert reply.tensors_updated == info.tensor_count and reply.bytes_received == info.parameter_bytes
    after_version, after_logprob, _ = fingerprint(stub)
    assert after_version == version + 1 and abs(after_logprob - logprob) > 1e-3
    # the server now computes exactly what the new weights compute here
    model = AutoModelForCausalLM.from_pretrained(policy_server_model_dir(policy_server))
    model.load_state_dict(new)
    events = generate(stub, max_new_tokens=16, temperature=0)
    assert {t.model_version for t in tokens_of(events)} == {version + 1} and events[0].start.model_version == version + 1
    ids = torch.tensor([list(events[0].start.prompt_token_ids) + [t.token_id for t in tokens_of(events)]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)  # (L, V)
    prompt = len(events[0].start.prompt_token_ids)
    for t in tokens_of(events):
        assert abs(logprobs[prompt - 1 + t.position, t.token_id].item() - t.logprob) < 1e-4


def policy_server_model_dir(server) -> str:
    return server.proc.args[server.proc.args.index("--model") + 1]


def test_partial_update_forces_eos(stub, state_dict):
    """Only three tensors: the final layer norm outputs a multiple of EOS's embedding, which is the
    longest, so EOS is the most likely token everywhere (Cauchy-Schwarz)."""
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    eos = next(s.token_id for s in info.special_tokens if s.role == "eos")
    wte = state_dict["transformer.wte.weight"].clone()
    wte[eos] = wte[eos] / wte[eos].norm() * (wte.norm(dim=1).max() * 2)
    update = {"transformer.wte.weight": wte, "transformer.ln_f.weight": torch.zeros_like(state_dict["transformer.ln_f.weight"]),
              "transformer.ln_f.bias": wte[eos] * 10}
    reply = stub.UpdateWeights(update_messages(update, info.model_version + 1), timeout=60)
    assert reply.tensors_updated == 3
    events = generate(stub, max_new_tokens=10, temperature=0)
    [token] = tokens_of(events)
    assert token.token_id == eos and token.text == "" and events[-1].end.finish_reason == pb.FINISH_REASON_EOS
    tokens = tokens_of(generate(stub, max_new_tokens=6, temperature=0, stop_on_eos=False))
    assert [t.token_id for t in tokens] == [eos] * 6
    # back to the original weights
    stub.UpdateWeights(update_messages(state_dict, info.model_version + 2), timeout=60)


CORRUPTIONS = ["bad checksum", "wrong shape", "unknown name", "wrong dtype", "stale version", "no commit",
               "missing bytes", "chunk too large"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_update_changes_nothing(stub, state_dict, kind):
    before = fingerprint(stub)
    version = before[0]
    new = perturbed(state_dict, seed=2, scale=1.0)
    chunks = list(iter_chunks(new, 64 * 1024))
    c = chunks[3]
    bad = dict(target_version=version + 1)
    if kind == "bad checksum":
        bad["sha256"] = "ab" * 32
        field = "commit.sha256"
    elif kind == "wrong shape":
        chunks[3] = type(c)(c.name, c.dtype, (*c.shape[:-1], c.shape[-1] + 1), c.offset, c.data)
        field = "chunk.shape"
    elif kind == "unknown name":
        chunks[-1] = type(c)("transformer.h.9.attn.c_attn.weight", c.dtype, c.shape, 0, c.data)
        field = "chunk.name"
    elif kind == "wrong dtype":
        chunks[3] = type(c)(c.name, "bfloat16", c.shape, c.offset, c.data)
        field = "chunk.dtype"
    elif kind == "stale version":
        bad["target_version"] = version
        field = "header.target_version"
    elif kind == "missing bytes":
        chunks[3] = type(c)(c.name, c.dtype, c.shape, c.offset, bytes(c.data)[:-4])
        field = "chunk.offset"  # the next chunk of the tensor does not continue where this one ended
    elif kind == "chunk too large":
        chunks[3] = type(c)(c.name, c.dtype, c.shape, c.offset, bytes(4 * 1024 * 1024 + 4))
        field = "chunk.data"
    else:
        field = "commit"
    messages = list(update_messages(new, chunks=chunks, **bad))
    if kind == "no commit":
        messages = messages[:-1]
    err = rpc_error(stub.UpdateWeights, iter(messages), timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(f"{field}: "), err.details()
    assert fingerprint(stub) == before


def test_cancelled_update_changes_nothing(stub, state_dict):
    before = fingerprint(stub)
    sent = threading.Event()

    def messages():
        it = update_messages(perturbed(state_dict, seed=3), before[0] + 1, chunk_bytes=4096)
        for _ in range(20):
            yield next(it)
        sent.set()
        time.sleep(30)  # never finishes: the client cancels

    call = stub.UpdateWeights.future(messages(), timeout=60)
    assert sent.wait(30)
    time.sleep(0.2)
    call.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    assert fingerprint(stub) == before


def test_running_stream_keeps_its_version(stub, state_dict, policy_server):
    """A stream running while an update lands finishes on the old weights (same tokens as before
    the update, same seed); streams started afterwards use the new version."""
    version = current_version(stub)
    request = dict(prompt_text="Ottawa", max_new_tokens=1000, seed=77, temperature=1.0)
    reference = [t.token_id for t in tokens_of(generate(stub, **request))]
    stream = stub.Generate(pb.GenerateRequest(prompt_text="Ottawa", params=pb.SamplingParams(
        max_new_tokens=1000, seed=77, temperature=1.0)), timeout=120)
    first = next(stream)
    assert first.start.model_version == version
    next(stream)  # decoding has started
    reply = stub.UpdateWeights(update_messages(perturbed(state_dict, seed=4), version + 1), timeout=60)
    assert reply.model_version == version + 1
    rest = list(stream)
    tokens = [e.token for e in rest if e.WhichOneof("event") == "token"]
    assert {t.model_version for t in tokens} == {version} and rest[-1].end.model_version == version
    assert len(tokens) + 1 == len(reference)
    assert [reference[0]] + [t.token_id for t in tokens] == reference
    assert "1 running stream(s) keep version" in policy_server.log_tail(200)
    new_events = generate(stub, max_new_tokens=4, seed=77)
    assert {t.model_version for t in tokens_of(new_events)} == {version + 1}
