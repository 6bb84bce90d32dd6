"""Numerical edge cases: logits of +-1e4, p_y within 1e-6 of 1, -inf (masked) logits, zero
weights, empty row sets and empty KL masks. Every back end must stay finite and agree with the
float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import assert_close, loss_scale

from kernels import VARIANTS, token_loss

IMPLS = ("cpu", "triton")


def compare(backend, logits, ref_logits, index, targets, weights, dtype=torch.float32, **kw):
    """Run backend and the float64 reference on the same (already rounded) inputs; return both."""
    z64 = logits.double().clone().requires_grad_()
    want = token_loss(z64, ref_logits.double(), index, targets, weights.double(), return_details=True,
                      backend="reference", **kw)  # fmt: skip
    want[0].backward()
    z = logits.clone().requires_grad_()
    got = token_loss(z, ref_logits, index, targets, weights, return_details=True, backend=backend, **kw)
    got[0].backward()
    scale = loss_scale(want[1], want[2], kw.get("kl_mask", torch.ones(len(logits), dtype=torch.bool)), kw["beta"])
    assert_close(got[0], want[0], dtype, "loss", scale)
    assert_close(got[1], want[1], dtype, "row losses")
    assert_close(got[2], want[2], dtype, "kl")
    assert_close(z.grad, z64.grad, dtype, "dL/dlogits")
    return got, z.grad


@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_extreme_logits_with_a_dominant_bad_token(poison, backend, variant):
    """z_y = +1e4 against -1e4 elsewhere: p_y = 1 up to e^-2e4, so 1 - p_y underflows even in
    float64. Unlikelihood of that token is still finite (|w| 2e4) and so is its gradient."""
    g = torch.Generator().manual_seed(1)
    n, v = 6, 300
    logits = torch.full((n, v), -1e4)
    targets = torch.randint(0, v, (n,), generator=g)
    logits[torch.arange(n), targets] = 1e4
    ref_logits = (torch.randint(0, 2, (n, v), generator=g) * 2 - 1).float() * 1e4
    weights = torch.tensor([-1.0, -0.5, 1.0, 0.0, -2.0, 0.7])
    mu = torch.full((n,), -0.1)
    got, grad = compare(backend, logits, ref_logits, torch.arange(n), targets, weights,
                        beta=0.3, variant=variant, behavior_logprobs=mu)  # fmt: skip
    if variant == "unlikelihood":
        assert got[1][0].item() == pytest.approx(2e4 - math.log(v - 1), rel=1e-6)


@pytest.mark.parametrize("backend", IMPLS)
def test_unlikelihood_near_one_without_cancellation(poison, backend):
    """p_y = 1 - 1e-6 in fp32 logits: -log(1 - p) = 13.8 to 1e-5, where log1p(-p) from an fp32 p
    would be off by ~10%; the gradient's target entry |w| p is exact too."""
    v, delta = 1000, 1e-6
    logits = torch.zeros(2, v)
    logits[:, 3] = math.log((v - 1) * (1 - delta) / delta)
    ref_logits = torch.randn(2, v, generator=torch.Generator().manual_seed(2))
    got, grad = compare(backend, logits, ref_logits, torch.tensor([0, 1]), torch.tensor([3, 3]),
                        torch.tensor([-1.0, -3.0]), beta=0.2)  # fmt: skip
    assert got[1][0].item() == pytest.approx(-math.log(delta), rel=1e-4)


@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_logits(poison, backend, variant):
    """-inf in both policy and reference (padded vocabulary, banned tokens), rows targeting a
    masked token with weight 0 (no NaN from 0 * inf) and with negative weight (log(1 - 0) = 0)."""
    g = torch.Generator().manual_seed(3)
    n, v = 9, 1000
    logits = torch.randn(n, v, generator=g) * 2
    ref_logits = torch.randn(n, v, generator=g) * 2
    masked = torch.rand(n, v, generator=g) < 0.1
    masked[:, -24:] = True  # padding columns
    logits[masked] = -math.inf
    ref_logits[masked] = -math.inf
    allowed = (~masked).float()
    index = torch.arange(n).repeat(2)
    targets = torch.multinomial(allowed, 2, generator=g).T.reshape(-1)  # (2N,) unmasked targets
    weights = torch.randn(2 * n, generator=g)
    targets[0], weights[0] = v - 1, 0.0  # a masked target with weight 0
    if variant == "unlikelihood":
        targets[1], weights[1] = v - 2, -1.0  # a masked target pushed down: l = 0
    mu = torch.randn(2 * n, generator=g).clamp(max=0) - 1
    compare(backend, logits, ref_logits, index, targets, weights, beta=0.4, variant=variant, behavior_logprobs=mu)


@pytest.mark.parametrize("backend", ("reference", *IMPLS))
def test_zero_weights_and_beta_give_exact_zero(poison, backend):
    logits = torch.randn(5, 40)
    z = logits.clone().requires_grad_()
    loss = token_loss(z, torch.randn(5, 40), torch.tensor([0, 2, 2, 4]), torch.tensor([1, 2, 3, 39]),
                      torch.zeros(4), beta=0.0, backend=backend)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0
    assert bool((z.grad == 0).all())


@pytest.mark.parametrize("backend", IMPLS)
def test_empty_rows_and_empty_kl_mask(poison, backend):
    g = torch.Generator().manual_seed(4)
    logits, ref_logits = torch.randn(7, 100, generator=g), torch.randn(7, 100, generator=g)
    none = torch.zeros(0, dtype=torch.int64)
    # R = 0: the token term is 0, the KL term alone remains
    got, _ = compare(backend, logits, ref_logits, none, none, torch.zeros(0), beta=0.5)
    assert got[1].shape == (0,)
    # T = 0: the KL term is 0 (KL is still reported per position)
    index, targets, weights = torch.tensor([1, 3]), torch.tensor([5, 7]), torch.tensor([1.0, -1.0])
    no_kl = torch.zeros(7, dtype=torch.bool)
    got, _ = compare(backend, logits, ref_logits, index, targets, weights, beta=0.5, kl_mask=no_kl)
    assert bool((got[2] > 0).all())
    # both: the loss is exactly 0 with a zero gradient
    z = logits.clone().requires_grad_()
    loss = token_loss(z, ref_logits, none, none, torch.zeros(0), beta=0.5, kl_mask=no_kl, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and bool((z.grad == 0).all())


@pytest.mark.parametrize("backend", IMPLS)
def test_bf16_extreme_logits(poison, backend):
    """bf16 inputs at +-1e4 (what bf16 rounds them to) stay finite and within the bf16 bar."""
    g = torch.Generator().manual_seed(6)
    n, v = 5, 700
    logits = ((torch.randint(0, 2, (n, v), generator=g) * 2 - 1) * 1e4).bfloat16()
    ref_logits = ((torch.randint(0, 2, (n, v), generator=g) * 2 - 1) * 1e4).bfloat16()
    index = torch.tensor([0, 1, 2, 3, 4, 4])
    targets = torch.randint(0, v, (6,), generator=g)
    compare(backend, logits, ref_logits, index, targets, torch.tensor([1.0, -1, 0.5, -2, 1, 0]),
            dtype=torch.bfloat16, beta=0.1)  # fmt: skip
