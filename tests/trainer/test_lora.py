"""--lora-rank: LoRA adapters on a frozen base (trainer_server/lora.py). The reference is the base with
the adapters off, publishing sends only the adapter factors, the policy server merges them, and
checkpoints hold the adapters so a restarted trainer resumes them."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tokenfeedback.v1.policy_pb2 as ppb
import tokenfeedback.v1.trainer_pb2 as pb
from common.weights import summarize_state_dict, tensor_nbytes, unique_tensors
from policy_server.adapters import AdapterMerger
from trainer_server.distributed import Collective
from trainer_server.model import ModelMode, prepare
from trainer_server.training import PolicyTrainer, StepParams

from .helpers import policy_stub, simple_sequence, status, train, trainer_stub
from .test_publish import logprobs, policy_versions, wait_until
from .test_training import batch

RANK, ALPHA = 4, 8.0
ARGS = ["--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--lr", "2e-2"]


def lora_trainer(model_dir, precision="fp32", lr=2e-2) -> PolicyTrainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    prepared = prepare(model, ModelMode(precision=precision, lora_rank=RANK, lora_alpha=ALPHA))
    return PolicyTrainer(prepared, None, Collective(), learning_rate=lr)


def adapter_bytes(model) -> int:
    """Bytes of the factors of every adapted weight (GPT-2's default target: attn.c_attn)."""
    layers = model.config.n_layer
    width = model.config.n_embd
    return layers * (width * RANK + RANK * 3 * width) * 4  # up (in, r) + down (r, 3 * width), fp32


def test_only_adapters_train_and_the_reference_is_the_base(trained_tiny_model_dir):
    t = lora_trainer(trained_tiny_model_dir)
    base = {k: v.detach().clone() for k, v in t.model.named_parameters() if not v.requires_grad}
    assert t.reference is None  # no second copy of the weights
    assert t.params and all("lora_" in n for n, p in t.model.named_parameters() if p.requires_grad)
    params = StepParams(variant="unlikelihood", beta=0.2, learning_rate=2e-2)
    results = [t.step(batch(0), params) for _ in range(4)]
    assert results[0].kl == 0.0  # B starts at zero: the policy is the base, the KL to it is zero
    assert results[-1].kl > 0  # the adapters moved the policy away from its reference ...
    assert results[-1].token_loss < results[0].token_loss  # ... in the direction the annotations ask
    for name, p in t.model.named_parameters():  # ... and the base stayed what it was
        if name in base:
            assert torch.equal(p, base[name]), name

    # the reference is exactly the plain model: the KL of a step against a fresh base model agrees
    plain = AutoModelForCausalLM.from_pretrained(trained_tiny_model_dir).float()
    with t.prepared.peft_model.disable_adapter():
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        torch.testing.assert_close(t.model(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)


def test_published_factors_are_small_and_rebuild_the_adapted_model(trained_tiny_model_dir):
    t = lora_trainer(trained_tiny_model_dir)
    params = StepParams(variant="unlikelihood", beta=0.2, learning_rate=2e-2)
    for _ in range(3):
        t.step(batch(0), params)
    published = t.prepared.published()
    assert published and all(n.endswith((".lora_up", ".lora_down")) for n in published)
    assert summarize_state_dict(published).total_bytes == adapter_bytes(t.model)

    plain = AutoModelForCausalLM.from_pretrained(trained_tiny_model_dir).float().eval()
    full_bytes = sum(tensor_nbytes(v) for v in unique_tensors(plain.state_dict()).values())
    assert summarize_state_dict(published).total_bytes < full_bytes / 20
    merged, _ = AdapterMerger().resolve(published, plain.state_dict())
    plain.load_state_dict(merged, strict=False)
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, t.model(ids).logits, rtol=1e-4, atol=1e-5)


def test_bf16_lora_keeps_the_base_in_bf16_and_the_adapters_in_fp32(trained_tiny_model_dir):
    t = lora_trainer(trained_tiny_model_dir, precision="bf16")
    frozen = {p.dtype for p in t.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16} and {p.dtype for p in t.params} == {torch.float32}
    params = StepParams(variant="unlikelihood", beta=0.2, learning_rate=2e-2)
    first, *_, last = [t.step(batch(0), params) for _ in range(4)]
    assert last.token_loss < first.token_loss


def _local_logprobs(model_dir, checkpoint=None) -> torch.Tensor:
    """Log-probabilities (7, V) after each token of 1..7 from the base + the checkpoint's adapters
    (the base alone without a checkpoint), computed here, not by a server."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    prepared = prepare(model, ModelMode(lora_rank=RANK, lora_alpha=ALPHA))
    if checkpoint is not None:
        prepared.load_checkpoint_state(load_file(str(checkpoint / "model.safetensors")))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (7, V)


def _published_mb(log: str) -> list[float]:
    return [float(m) for m in re.findall(r"now holds version \d+ \(([\d.]+) MB", log)]


def train_with_adapters(start_policy, start_trainer, model_dir, data):
    """A policy server and a LoRA trainer that published version 1 to it after 3 steps."""
    policy = start_policy(model_dir)
    trainer = start_trainer(model_dir, data, "--policy", policy.address, *ARGS)
    stub = trainer_stub(trainer.address)
    base = logprobs(policy.address)
    stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[simple_sequence("l-1")]), timeout=30)
    done = train(stub, steps=3)[-1]
    assert done.published_version == 1 and policy_versions(stub)[policy.address] == (1, True)
    return policy, trainer, base


def test_publish_moves_only_adapters_and_the_policy_merges_them(start_policy, start_trainer, tiny_model_dir,
                                                                tmp_path):
    data = tmp_path / "data"
    policy, trainer, base = train_with_adapters(start_policy, start_trainer, tiny_model_dir, data)
    # the adapters alone went out (well under 0.1 MB; the whole tiny model is about 0.8 MB) ...
    info = policy_stub(policy.address).GetModelInfo(ppb.GetModelInfoRequest(), timeout=30)
    assert info.parameter_bytes > 500_000
    assert _published_mb(trainer.log_tail(200)) == [0.0]
    # ... the checkpoint holds only them ...
    checkpoint = data / "checkpoints" / "ckpt-0000000003"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    # ... and the policy's next requests run on base + adapters, as the trainer has them
    trained = logprobs(policy.address)
    assert trained != base
    local, local_base = _local_logprobs(tiny_model_dir, checkpoint), _local_logprobs(tiny_model_dir)
    assert trained == pytest.approx([float(local[2 + i, t]) for i, t in enumerate((4, 5, 6, 7))], abs=1e-4)
    generated = list(policy_stub(policy.address).Generate(ppb.GenerateRequest(
        prompt_token_ids=[1, 2, 3], params=ppb.SamplingParams(max_new_tokens=1, temperature=0.0)), timeout=60))
    token = next(e.token for e in generated if e.HasField("token"))
    assert token.logprob == pytest.approx(float(local[2, token.token_id]), abs=1e-4)
    assert abs(float(local[2, token.token_id]) - float(local_base[2, token.token_id])) > 1e-3


def test_a_restarted_trainer_resumes_the_adapters(start_policy, start_trainer, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    policy, trainer, _ = train_with_adapters(start_policy, start_trainer, tiny_model_dir, data)
    trained = logprobs(policy.address)
    trainer.stop()
    policy.stop()
    # a fresh policy server (version 0) gets the resumed adapters, not fresh ones
    fresh = start_policy(tiny_model_dir)
    trainer = start_trainer(tiny_model_dir, data, "--policy", fresh.address, *ARGS)
    stub = trainer_stub(trainer.address)
    assert status(stub).step == 3 and status(stub).model_version == 1
    wait_until(lambda: policy_versions(stub)[fresh.address] == (1, True), 60, "the fresh policy server to get v1")
    assert logprobs(fresh.address) == trained
    done = train(stub, steps=1)[-1]
    assert done.published_version == 2 and logprobs(fresh.address) != trained


def test_a_checkpoint_of_another_mode_is_refused(start_trainer, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    trainer = start_trainer(tiny_model_dir, data, *ARGS)
    stub = trainer_stub(trainer.address)
    stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[simple_sequence("m-1")]), timeout=30)
    train(stub, steps=1)
    trainer.stop()
    full = start_trainer(tiny_model_dir, data, wait_healthy=False)
    assert full.proc.wait(timeout=180) != 0
    assert "written in mode fp32+lora4, the trainer runs in fp32" in full.log_tail(100)
