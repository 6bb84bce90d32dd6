"""The specification itself: hand-derived values on a tiny case (checked for every back end) and
torch.autograd.gradcheck of the reference in float64."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import make_case

from kernels import BACKENDS, VARIANTS, reference, token_loss

LOG2 = math.log(2.0)


def tiny():
    """One position, V = 3: p = (1/4, 1/2, 1/4), q = (1/4, 1/4, 1/2).

    KL = 1/4 log 1 + 1/2 log 2 + 1/4 log(1/2) = log(2) / 4.
    """
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0]], dtype=torch.float64))
    ref_logits = torch.log(torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.float64))
    return logits, ref_logits


def run(backend, logits, ref_logits, rows, **kw):
    dtype = torch.float64 if backend != "triton" else torch.float32  # Triton computes in fp32
    z = logits.to(dtype).clone().requires_grad_()
    index = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    targets = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    weights = torch.tensor([r[2] for r in rows], dtype=dtype)
    loss, row_losses, kl = token_loss(
        z, ref_logits.to(dtype), index, targets, weights, return_details=True, backend=backend, **kw
    )
    loss.backward()
    return loss.item(), row_losses.tolist(), kl.tolist(), z.grad[0].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_derived_unlikelihood_with_kl(backend):
    """Rows (t=0, y=1, w=1), (t=0, y=1, w=-2), (t=0, y=0, w=0.5); beta = 1/2.

    l1 = -log(1/2) = log 2; l2 = -2 log(1 - 1/2) = 2 log 2; l3 = -0.5 log(1/4) = log 2.
    L = (4/3) log 2 + (1/2)(log 2)/4 = (35/24) log 2.
    Gradients (docs/design.md, "The loss": identities):
      row 1: p - e_1 = (1/4, -1/2, 1/4)
      row 2: |w| p_y ([j=y] - p_j) / (1 - p_y) = 2 (e_1 - p) = (-1/2, 1, -1/2)
      row 3: 0.5 (p - e_0) = (-3/8, 1/4, 1/8)
      rows summed / R=3: (-5/24, 1/4, -1/24)
      KL: p_j (log p_j/q_j - KL) = log 2 (-1/16, 3/8, -5/16), times beta = log 2 (-1/32, 3/16, -5/32)
    """
    logits, ref_logits = tiny()
    loss, rows, kl, grad = run(backend, logits, ref_logits, [(0, 1, 1.0), (0, 1, -2.0), (0, 0, 0.5)], beta=0.5)
    tol = dict(rel=1e-6) if backend == "triton" else dict(rel=1e-12)
    assert loss == pytest.approx(35 / 24 * LOG2, **tol)
    assert rows == pytest.approx([LOG2, 2 * LOG2, LOG2], **tol)
    assert kl == pytest.approx([LOG2 / 4], **tol)
    expected = [-5 / 24 - LOG2 / 32, 1 / 4 + 3 * LOG2 / 16, -1 / 24 - 5 * LOG2 / 32]
    assert grad == pytest.approx(expected, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_derived_pg_clip(backend):
    """pg_clip, target y=1 (p = 1/2) sampled with mu = log(1/4): rho = 2, clipped to 1.2.

    w = +1: -min(2, 1.2) = -1.2, the clipped branch is active: no gradient.
    w = -1: -min(-2, -1.2) = 2, the unclipped branch: dl/dlog p = -w rho = 2, so
            dl/dz = 2 (e_1 - p) = (-1/2, 1, -1/2). A third row with unknown mu (NaN) is likelihood: w = 1 at y = 2,
            l = -log(1/4) = 2 log 2, gradient p - e_2 = (1/4, 1/2, -3/4). beta = 0: no KL.
    L = (-1.2 + 2 + 2 log 2) / 3, gradient ((-1/2 + 1/4), (1 + 1/2), (-1/2 - 3/4)) / 3.
    """
    logits, ref_logits = tiny()
    mu = torch.tensor([math.log(0.25), math.log(0.25), math.nan], dtype=torch.float64)
    if backend == "triton":
        mu = mu.float()
    loss, rows, kl, grad = run(
        backend, logits, ref_logits, [(0, 1, 1.0), (0, 1, -1.0), (0, 2, 1.0)],
        beta=0.0, variant="pg_clip", behavior_logprobs=mu,
    )  # fmt: skip
    tol = dict(rel=1e-6) if backend == "triton" else dict(rel=1e-12)
    assert rows == pytest.approx([-1.2, 2.0, 2 * LOG2], **tol)
    assert loss == pytest.approx((0.8 + 2 * LOG2) / 3, **tol)
    assert grad == pytest.approx([-0.25 / 3, 1.5 / 3, -1.25 / 3], **tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_gradcheck(variant):
    """Autograd of the reference agrees with finite differences in float64 (all variants, KL on)."""
    case = make_case(3, 5, variant, torch.float64, 0.6, seed=11)
    behavior = case.behavior.double()

    def f(logits):
        return reference.token_loss(
            logits, case.ref_logits, case.row_index, case.targets, case.weights.double(),
            beta=0.6, variant=variant, behavior_logprobs=behavior, kl_mask=case.kl_mask,
        )  # fmt: skip

    logits = case.logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_reference_kl_matches_closed_form():
    """KL from log_softmax equals the streaming identity sum p (z - r) - lse(z) + lse(r)."""
    case = make_case(17, 50, "likelihood", torch.float64, 0.5, seed=5)
    z, r = case.logits, case.ref_logits
    p = torch.softmax(z, -1)
    identity = (p * (z - r)).sum(-1) - torch.logsumexp(z, -1) + torch.logsumexp(r, -1)
    torch.testing.assert_close(reference.kl_per_position(z, r), identity, rtol=1e-12, atol=1e-12)
