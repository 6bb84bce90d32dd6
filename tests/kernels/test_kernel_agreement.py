"""Each implementation against the float64 reference: loss, per-row losses, KL and gradients.

The CPU path runs the whole grid (V in {1, 7, 1000, 4097, 32771}, N in {1, 17, 256}, every variant,
fp32 and bf16, beta 0 and > 0). Under the Triton interpreter the grid is trimmed so the suite stays
fast: the full variant x dtype x beta grid at one shape, then every shape once with variant, dtype
and beta rotating, the largest shape marked slow. On a GPU Triton runs the whole grid.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_cases import HAS_CUDA, assert_close, loss_scale, make_case, seed_of

from kernels import VARIANTS, token_loss

SHAPES = [(n, v) for n in (1, 17, 256) for v in (1, 7, 1000, 4097, 32771)]
DTYPES = (torch.float32, torch.bfloat16)
BETAS = (0.0, 0.7)


def full_grid():
    """Every shape x variant x dtype (beta alternating), every beta at one shape; the largest
    shape once per variant (its float64 reference alone takes seconds)."""
    cases = [(17, 1000, variant, dtype, beta) for variant, dtype, beta in itertools.product(VARIANTS, DTYPES, BETAS)]
    for i, ((n, v), variant, dtype) in enumerate(itertools.product(SHAPES, VARIANTS, DTYPES)):
        if n * v > 2_000_000 and dtype != DTYPES[VARIANTS.index(variant) % 2]:
            continue
        cases.append((n, v, variant, dtype, BETAS[i % 2]))
    return cases


# the interpreter costs ~25 ms per program (position) and grows with V: N = 256 is kept at two
# vocabulary sizes, the largest shape (8.4M logits, a minute) is left to the CPU path and GPUs
INTERPRETER_SKIP = {(256, 1), (256, 7), (256, 32771)}


def interpreter_grid():
    cases = [(17, 1000, variant, dtype, beta) for variant, dtype, beta in itertools.product(VARIANTS, DTYPES, BETAS)]
    for i, (n, v) in enumerate(SHAPES):
        if (n, v) not in INTERPRETER_SKIP:
            marks = [pytest.mark.slow] if n * v > 1_000_000 else []
            cases.append(pytest.param(n, v, VARIANTS[i % 3], DTYPES[i % 2], BETAS[(i // 2) % 2], marks=marks))
    return cases


def reference_run(case):
    logits = case.logits.double().clone().requires_grad_()  # a new leaf even when already fp64
    loss, rows, kl = token_loss(
        logits, case.ref_logits.double(), *case.rows(torch.float64), **case.kwargs(torch.float64),
        return_details=True, backend="reference",
    )  # fmt: skip
    loss.backward()
    return loss, rows, kl, logits.grad


def check_backend(backend: str, n: int, v: int, variant: str, dtype: torch.dtype, beta: float, seed: int):
    case = make_case(n, v, variant, dtype, beta, seed)
    ref_loss, ref_rows, ref_kl, ref_grad = reference_run(case)
    logits = case.logits.clone().requires_grad_()
    loss, rows, kl = token_loss(
        logits, case.ref_logits, *case.rows(), **case.kwargs(), return_details=True, backend=backend
    )
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    scale = loss_scale(ref_rows, ref_kl, case.kl_mask, beta)
    assert_close(loss, ref_loss, dtype, "loss", scale)
    assert_close(rows, ref_rows, dtype, "row losses")
    assert_close(kl, ref_kl, dtype, "kl")
    assert_close(logits.grad, ref_grad, dtype, "dL/dlogits")


@pytest.mark.parametrize("n,v,variant,dtype,beta", full_grid())
def test_cpu_matches_reference(poison, n, v, variant, dtype, beta):
    check_backend("cpu", n, v, variant, dtype, beta, seed=seed_of(n, v, variant, dtype, beta))


@pytest.mark.parametrize("n,v,variant,dtype,beta", full_grid() if HAS_CUDA else interpreter_grid())
def test_triton_matches_reference(poison, n, v, variant, dtype, beta):
    check_backend("triton", n, v, variant, dtype, beta, seed=seed_of(n, v, variant, dtype, beta, "triton"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_in_float64_matches_reference_to_machine_precision(poison, variant):
    """The CPU path computes in fp64 for fp64 logits: its formulas, not just its precision, match."""
    case = make_case(17, 1000, variant, torch.float64, 0.7, seed=7)
    ref_loss, ref_rows, ref_kl, ref_grad = reference_run(case)
    logits = case.logits.clone().requires_grad_()
    loss, rows, kl = token_loss(
        logits, case.ref_logits, *case.rows(torch.float64), **case.kwargs(torch.float64),
        return_details=True, backend="cpu",
    )  # fmt: skip
    loss.backward()
    assert_close(loss, ref_loss, torch.float64, "loss", loss_scale(ref_rows, ref_kl, case.kl_mask, 0.7))
    assert_close(rows, ref_rows, torch.float64, "row losses")
    assert_close(kl, ref_kl, torch.float64, "kl")
    assert_close(logits.grad, ref_grad, torch.float64, "dL/dlogits")
