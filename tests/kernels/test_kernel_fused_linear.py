"""fused_linear_token_loss: each back end against the float64 reference (loss, per-row losses, KL,
gradients of hidden and lm_head weight), chunking that never holds all [N, V] logits, fp32
accumulation of the lm_head gradient, and which inputs get gradients."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_cases import assert_close, loss_scale, make_case, seed_of

from kernels import VARIANTS, fused_linear_token_loss

IMPLS = ("cpu", "triton")


def make_fused(n, v, h, variant, dtype, seed):
    """Hidden states and heads, plus rows from a token-loss case of the same shape."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5 * 2
    ref_hidden = hidden + 0.3 * torch.randn(n, h, generator=g, dtype=torch.float64)
    ref_weight = weight + 0.1 * torch.randn(v, h, generator=g, dtype=torch.float64)
    case = make_case(n, v, variant, dtype, 0.5, seed)  # rows, behavior and KL mask
    return [t.to(dtype) for t in (hidden, weight, ref_hidden, ref_weight)], case


def run(backend, tensors, case, dtype=None, chunk_size=None):
    hidden, weight, ref_hidden, ref_weight = (t if dtype is None else t.to(dtype) for t in tensors)
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    out = fused_linear_token_loss(
        hidden, weight, ref_hidden, ref_weight, *case.rows(dtype), **case.kwargs(dtype),
        chunk_size=chunk_size, return_details=True, backend=backend,
    )  # fmt: skip
    out[0].backward()
    return out, hidden.grad, weight.grad


@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
# chunk sizes: many chunks, a ragged last one, a single one
@pytest.mark.parametrize("chunk_size,variant", zip((1, 16, 64), VARIANTS, strict=True))
def test_matches_reference(poison, backend, dtype, chunk_size, variant):
    n, v, h = 37, 1000, 48
    tensors, case = make_fused(n, v, h, variant, dtype, seed_of(n, v, h, variant, dtype, chunk_size))
    (ref_loss, ref_rows, ref_kl), ref_gh, ref_gw = run("reference", tensors, case, torch.float64)
    (loss, rows, kl), gh, gw = run(backend, tensors, case, chunk_size=chunk_size)
    assert gh.dtype == dtype and gw.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss", loss_scale(ref_rows, ref_kl, case.kl_mask, case.beta))
    assert_close(rows, ref_rows, dtype, "row losses")
    assert_close(kl, ref_kl, dtype, "kl")
    assert_close(gh, ref_gh, dtype, "dL/dhidden")
    assert_close(gw, ref_gw, dtype, "dL/dlm_head_weight")


@pytest.mark.parametrize("backend", IMPLS)
def test_never_holds_all_logits(monkeypatch, backend):
    """The back end only ever sees [chunk_size, V] logits, and every position exactly once."""
    n, v, h, chunk = 50, 300, 16, 8
    tensors, case = make_fused(n, v, h, "unlikelihood", torch.float32, 3)
    seen = []
    module = importlib.import_module("kernels.cpu" if backend == "cpu" else "kernels.triton_loss")
    real = module.loss_and_grad

    def recording(z, r, rows, out, *args):
        seen.append(tuple(z.shape))
        assert out.data_ptr() == z.data_ptr(), "the chunk's gradient should overwrite its logits"
        return real(z, r, rows, out, *args)

    monkeypatch.setattr(module, "loss_and_grad", recording)
    run(backend, tensors, case, chunk_size=chunk)
    assert seen == [(chunk, v)] * (n // chunk) + [(n % chunk, v)]


def test_lm_head_gradient_accumulates_in_fp32(poison):
    """bf16 inputs, one position per chunk: 256 partial grad_W sums. Accumulated in bf16 they would
    drift by ~sqrt(256) bf16 ulps (a few %); in fp32 the result stays within the bf16 bar."""
    n, v, h = 256, 64, 32
    tensors, case = make_fused(n, v, h, "likelihood", torch.bfloat16, 9)
    *_, ref_gw = run("reference", tensors, case, torch.float64)
    *_, gw = run("cpu", tensors, case, chunk_size=1)
    assert_close(gw, ref_gw, torch.bfloat16, "dL/dlm_head_weight")


@pytest.mark.parametrize("backend", IMPLS)
def test_gradients_flow_only_where_asked(backend):
    """Frozen head: no weight gradient; reference inputs never get one; grad_output scales."""
    tensors, case = make_fused(12, 50, 8, "pg_clip", torch.float32, 5)
    hidden, weight, ref_hidden, ref_weight = (t.clone() for t in tensors)
    hidden.requires_grad_()
    ref_hidden.requires_grad_()
    ref_weight.requires_grad_()
    loss = fused_linear_token_loss(
        hidden, weight, ref_hidden, ref_weight, *case.rows(), **case.kwargs(), chunk_size=5, backend=backend
    )
    (3.0 * loss).backward()
    assert weight.grad is None and ref_hidden.grad is None and ref_weight.grad is None
    once = hidden.grad.clone()
    hidden.grad = None
    fused_linear_token_loss(
        hidden, weight, ref_hidden, ref_weight, *case.rows(), **case.kwargs(), chunk_size=5, backend=backend
    ).backward()
    torch.testing.assert_close(once, 3.0 * hidden.grad, rtol=1e-6, atol=0)
