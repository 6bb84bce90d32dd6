"""The training step in-process (no servers): gradients against a plain autograd computation of
docs/design.md's loss through the full model (tied lm_head included), micro-batching that changes
nothing, a non-finite loss that never reaches the weights, and the adaptive beta."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kernels.reference import token_loss
from trainer_server.distributed import Collective
from trainer_server.rows import Row
from trainer_server.training import Example, PolicyTrainer, StepParams, pack


def make_trainer(model_dir, micro_batch_size=0, lr=1e-3, optimizer="adamw") -> PolicyTrainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    reference = copy.deepcopy(model)
    with torch.no_grad():  # let the policy differ from the reference so the KL term has a gradient
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return PolicyTrainer(model, reference, Collective(), learning_rate=lr, micro_batch_size=micro_batch_size,
                         optimizer=optimizer)


def batch(seed: int = 0, vocab: int = 300) -> list[Example]:
    """Sequences of different lengths; rows of both signs, a replacement, a repeated position."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(0, vocab, (n,), generator=g).tolist())

    return [
        Example(ids(3), ids(5), (Row(0, 1, -1.0), Row(0, 7, 1.0, True), Row(3, 2, 0.5)), (-0.1, -0.2, -0.3, -0.4, -0.5)),
        Example(ids(6), ids(2), (Row(1, 4, -0.7),)),
        Example(ids(1), ids(7), (Row(6, 9, 1.0), Row(2, 3, -1.0), Row(2, 11, 0.3, True))),
    ]


def autograd_loss(model, reference, examples, params: StepParams) -> torch.Tensor:
    """docs/design.md's loss from the full model's logits (HF forward, tied lm_head), one sequence at a time."""
    logits, ref_logits, rows, targets, weights, behavior = [], [], [], [], [], []
    offset = 0
    for e in examples:
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        p = len(e.prompt_ids)
        out = model(input_ids=ids).logits[0, p - 1 : p - 1 + len(e.completion_ids)]  # (C, V)
        with torch.no_grad():
            ref = reference(input_ids=ids).logits[0, p - 1 : p - 1 + len(e.completion_ids)]  # (C, V)
        logits.append(out)
        ref_logits.append(ref)
        for r in e.rows:
            rows.append(offset + r.position)
            targets.append(r.token_id)
            weights.append(r.weight)
            known = e.behavior_logprobs is not None and not r.replacement
            behavior.append(e.behavior_logprobs[r.position] if known else math.nan)
        offset += len(e.completion_ids)
    return token_loss(torch.cat(logits).double(), torch.cat(ref_logits).double(), torch.tensor(rows),
                      torch.tensor(targets), torch.tensor(weights, dtype=torch.float64), beta=params.beta,
                      variant=params.variant, behavior_logprobs=torch.tensor(behavior, dtype=torch.float64),
                      clip_eps=params.clip_eps)


def grads_of_step(trainer: PolicyTrainer, examples, params) -> dict[str, torch.Tensor]:
    """The gradients the step applied (captured before AdamW consumes them)."""
    captured = {}
    original = trainer.optimizer.step

    def capture(*args, **kwargs):
        for name, p in trainer.model.named_parameters():
            captured[name] = p.grad.detach().clone()
        return original(*args, **kwargs)

    trainer.optimizer.step = capture
    try:
        trainer.step(examples, params)
    finally:
        trainer.optimizer.step = original
    return captured


@pytest.mark.parametrize("variant", ["likelihood", "unlikelihood", "pg_clip"])
def test_gradients_match_autograd_through_the_whole_model(trained_tiny_model_dir, variant):
    trainer = make_trainer(trained_tiny_model_dir)
    params = StepParams(variant=variant, beta=0.3, learning_rate=1e-3, max_grad_norm=0.0)
    examples = batch()
    expected_model = copy.deepcopy(trainer.model)
    loss = autograd_loss(expected_model, trainer.reference, examples, params)
    loss.backward()
    got = grads_of_step(trainer, examples, params)
    tied = trainer.model.lm_head.weight is trainer.model.transformer.wte.weight
    assert tied, "the tiny GPT-2 ties lm_head to the input embedding; this test relies on it"
    for name, p in expected_model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=2e-3, atol=2e-5, msg=f"gradient of {name}")


def test_micro_batches_give_the_same_step(trained_tiny_model_dir):
    # SGD: the weights then show the gradients themselves (AdamW would hide a scale error)
    params = StepParams(variant="unlikelihood", beta=0.2, learning_rate=1e-1)
    whole = make_trainer(trained_tiny_model_dir, optimizer="sgd")
    micro = make_trainer(trained_tiny_model_dir, micro_batch_size=1, optimizer="sgd")
    for seed in range(3):
        a, b = whole.step(batch(seed), params), micro.step(batch(seed), params)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.token_loss == pytest.approx(b.token_loss, rel=1e-5) and a.kl == pytest.approx(b.kl, rel=1e-4)
        assert (a.rows, a.completion_tokens, a.sequences) == (b.rows, b.completion_tokens, b.sequences) == (7, 14, 3)
    for (name, p), q in zip(whole.model.named_parameters(), micro.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} after 3 steps")


def test_reported_terms_are_the_losses_the_kernel_computed(trained_tiny_model_dir):
    trainer = make_trainer(trained_tiny_model_dir)
    params = StepParams(variant="unlikelihood", beta=0.25, learning_rate=1e-3)
    examples = batch(1)
    inputs = pack(examples, 0, torch.device("cpu"))
    with torch.no_grad():
        expected = autograd_loss(trainer.model, trainer.reference, examples, params)
    result = trainer.step(examples, params)
    assert result.loss == pytest.approx(float(expected), rel=1e-4)
    assert result.loss == pytest.approx(result.token_loss + 0.25 * result.kl, rel=1e-5)
    assert result.mean_abs_weight == pytest.approx(float(inputs.weights.abs().mean()))
    assert result.tokens == sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples)


def test_a_non_finite_loss_skips_the_step_and_changes_nothing(trained_tiny_model_dir):
    trainer = make_trainer(trained_tiny_model_dir)
    params = StepParams(variant="unlikelihood", beta=0.1, learning_rate=1e-2)
    trainer.step(batch(0), params)  # a normal step first: AdamW has state
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimizer_state = copy.deepcopy(trainer.optimizer.state_dict())
    with torch.no_grad():  # a reference that went bad: its logits, hence the KL, are NaN
        trainer.reference.transformer.ln_f.weight.fill_(math.nan)
    result = trainer.step(batch(1), params)
    assert result.skipped and not math.isfinite(result.loss)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), f"{name} changed by a skipped step"
    after = trainer.optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), f"optimizer state {index}.{key} changed"
    assert all(torch.isfinite(p.grad).all() for p in trainer.params)  # no NaN left behind for the next step
