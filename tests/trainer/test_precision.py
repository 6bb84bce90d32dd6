"""--precision bf16: bfloat16 autocast with fp32 master weights learns like fp32 (trainer_server/model.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer_server.config import config_from_args
from trainer_server.distributed import Collective
from trainer_server.model import ModelMode, prepare
from trainer_server.training import PolicyTrainer, StepParams

from .test_training import batch

STEPS = 6
# Tolerance of bf16 against fp32, per step: bf16 keeps 8 mantissa bits (relative rounding 2^-9),
# and the hidden states pass two layers rounded to it; the kernel accumulates in fp32.
LOSS_RTOL = 2e-2


def trainer(model_dir, precision: str) -> PolicyTrainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the policy differs from the reference, so the KL term has a gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    prepared = prepare(model, ModelMode(precision=precision), reference.to(ModelMode(precision).compute_dtype))
    return PolicyTrainer(prepared, None, Collective(), learning_rate=3e-3)


def test_bf16_learns_like_fp32(trained_tiny_model_dir):
    params = StepParams(variant="unlikelihood", beta=0.2, learning_rate=3e-3)
    runs = {}
    for precision in ("fp32", "bf16"):
        t = trainer(trained_tiny_model_dir, precision)
        start = {k: v.detach().clone() for k, v in t.model.named_parameters()}
        losses = [t.step(batch(0), params).loss for _ in range(STEPS)]
        moved = torch.cat([(p.detach() - start[k]).reshape(-1) for k, p in t.model.named_parameters()])
        runs[precision] = (losses, moved, t)

    (fp32, moved32, _), (bf16, moved16, t16) = runs["fp32"], runs["bf16"]
    for step, (a, b) in enumerate(zip(fp32, bf16, strict=True)):
        assert b == pytest.approx(a, rel=LOSS_RTOL), f"step {step}: bf16 loss {b}, fp32 {a}"
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0], (fp32, bf16)  # both learn
    assert bf16 != fp32  # the autocast really ran in bfloat16
    cosine = torch.nn.functional.cosine_similarity(moved32, moved16, dim=0)
    assert cosine > 0.95, f"bf16 moved the weights elsewhere than fp32 (cosine {float(cosine):.3f})"

    # fp32 master weights, gradients and optimizer state; the frozen reference in bf16
    assert {p.dtype for p in t16.params} == {torch.float32}
    assert {p.grad.dtype for p in t16.params} == {torch.float32}
    assert {s["exp_avg"].dtype for s in t16.optimizer.state.values()} == {torch.float32}
    assert {p.dtype for p in t16.reference.parameters()} == {torch.bfloat16}


def test_prepare_holds_a_bf16_reference_copy_by_default(trained_tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(trained_tiny_model_dir).float()
    prepared = prepare(model, ModelMode(precision="bf16"))
    assert prepared.reference is not model
    assert {p.dtype for p in prepared.reference.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in prepared.reference.parameters())
    for (name, p), r in zip(model.named_parameters(), prepared.reference.parameters(), strict=True):
        assert torch.equal(p.detach().to(torch.bfloat16), r), name


def test_flags_make_the_mode():
    config = config_from_args(["--precision", "bf16", "--lora-rank", "8", "--lora-alpha", "32",
                               "--lora-targets", "c_attn, c_proj"])
    mode = config.model_mode
    assert (mode.precision, mode.lora_rank, mode.lora_alpha, mode.lora_targets, mode.fsdp) == \
        ("bf16", 8, 32.0, ("c_attn", "c_proj"), False)
    assert mode.name == "bf16+lora8"
    assert config_from_args([]).model_mode == ModelMode()


@pytest.mark.parametrize("argv, message", [
    (["--lora-rank", "-1"], "--lora-rank"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha"),
    (["--lora-targets", "c_attn"], "--lora-targets"),
    (["--fsdp"], "--fsdp"),
])
def test_bad_mode_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        config_from_args(argv)
    assert message in capsys.readouterr().err
