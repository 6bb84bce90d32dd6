"""The CPU path's two ways of running its [C, V] passes: compiled (torch.compile of the fused
steps, for large chunks) and eager (small chunks, and the fallback when compiling fails). Both
against the float64 reference, in place (the fused-linear path overwrites its logits) and into a
separate gradient buffer; the fallback mid-step; small chunks never compile."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from kernel_cases import assert_close, loss_scale, make_case
from test_kernel_agreement import reference_run
from test_kernel_fused_linear import make_fused
from test_kernel_fused_linear import run as run_fused
from test_kernel_numerics import compare

from kernels import VARIANTS, cpu, token_loss

FUSED_PASSES = {"_stats_fused", "_kl_fused", "_grad_fused"}  # token_loss: the gradient into its own buffer


@pytest.fixture
def compiled(monkeypatch):
    """Every chunk, however small, takes the compiled passes (kernels compiled once per process)."""
    monkeypatch.setattr(cpu, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(cpu, "_compile_failure", [])


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced: each pass named in `failing` raises when called, as a failed compile
    does, the others run as plain Python; a fresh cache, so the fake is what gets used."""
    failing = set()

    def fake(fn, **kwargs):
        def call(*args):
            if fn.__name__ in failing:
                raise RuntimeError(f"cannot compile {fn.__name__} here")
            return fn(*args)

        return call

    monkeypatch.setattr(torch, "compile", fake)
    monkeypatch.setattr(cpu, "_compiled", {})
    monkeypatch.setattr(cpu, "_compile_failure", [])
    monkeypatch.setattr(cpu, "COMPILE_MIN_ELEMENTS", 0)
    return failing


def run_logits(case, dtype=None):
    logits = case.logits.clone().requires_grad_()
    loss, rows, kl = token_loss(logits, case.ref_logits, *case.rows(dtype), **case.kwargs(dtype),
                                return_details=True, backend="cpu")  # fmt: skip
    loss.backward()
    return loss, rows, kl, logits.grad


def check(case, got, want, dtype, beta):
    assert_close(got[0], want[0], dtype, "loss", loss_scale(want[1], want[2], case.kl_mask, beta))
    assert_close(got[1], want[1], dtype, "row losses")
    assert_close(got[2], want[2], dtype, "kl")
    assert_close(got[3], want[3], dtype, "dL/dlogits")


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_in_float64_matches_reference_to_machine_precision(poison, compiled, variant):
    case = make_case(17, 1000, variant, torch.float64, 0.7, seed=11)
    got = run_logits(case, torch.float64)
    check(case, got, reference_run(case), torch.float64, 0.7)
    assert FUSED_PASSES <= set(cpu._compiled), "the compiled passes should have run"
    assert not cpu._compile_failure


def test_compiled_fused_linear_in_place_matches_reference(poison, compiled):
    """The fused-linear path hands each chunk's logits in as their own gradient buffer; chunks of
    16 over 37 positions: a ragged last chunk too."""
    tensors, case = make_fused(37, 1000, 48, "unlikelihood", torch.float32, seed=12)
    (ref_loss, ref_rows, ref_kl), ref_gh, ref_gw = run_fused("reference", tensors, case, torch.float64)
    (loss, rows, kl), gh, gw = run_fused("cpu", tensors, case, chunk_size=16)
    assert_close(loss, ref_loss, torch.float32, "loss", loss_scale(ref_rows, ref_kl, case.kl_mask, case.beta))
    assert_close(rows, ref_rows, torch.float32, "row losses")
    assert_close(kl, ref_kl, torch.float32, "kl")
    assert_close(gh, ref_gh, torch.float32, "dL/dhidden")
    assert_close(gw, ref_gw, torch.float32, "dL/dlm_head_weight")
    assert {"_stats_fused", "_kl_fused", "_grad_fused_in_place"} <= set(cpu._compiled)
    assert not cpu._compile_failure


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_masked_logits(poison, compiled, variant):
    """-inf in policy and reference: p = 0 entries add nothing to KL or the gradient (no 0 * inf)."""
    g = torch.Generator().manual_seed(13)
    n, v = 9, 1000
    logits, ref_logits = torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2
    masked = torch.rand(n, v, generator=g) < 0.1
    masked[:, -24:] = True
    logits[masked], ref_logits[masked] = -math.inf, -math.inf
    index = torch.arange(n).repeat(2)
    targets = torch.multinomial((~masked).float(), 2, generator=g).T.reshape(-1)
    weights = torch.randn(2 * n, generator=g)
    targets[0], weights[0] = v - 1, 0.0  # a masked target with weight 0
    compare("cpu", logits, ref_logits, index, targets, weights, beta=0.4, variant=variant)
    assert not cpu._compile_failure


@pytest.mark.parametrize("failing", [FUSED_PASSES, {"_grad_fused"}])
def test_compile_failure_falls_back_to_eager(poison, fake_compile, failing):
    """A pass that fails to compile: one warning, the step redone eagerly (also when the KL pass
    already ran and only the gradient's failed), right results; later chunks stay eager."""
    fake_compile.update(failing)
    case = make_case(17, 1000, "unlikelihood", torch.float32, 0.7, seed=14)
    want = reference_run(case)
    with pytest.warns(RuntimeWarning, match="running them eagerly"):
        got = run_logits(case)
    check(case, got, want, torch.float32, 0.7)
    assert cpu._compile_failure and "cannot compile" in cpu._compile_failure[0]
    assert not cpu.uses_compiled(case.logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        check(case, run_logits(case), want, torch.float32, 0.7)


def test_fake_compiled_passes_match_eager(poison, fake_compile):
    """The fused passes as plain PyTorch (what torch.compile is given) agree with the reference:
    the math is checked apart from the compiler."""
    case = make_case(17, 1000, "pg_clip", torch.float64, 0.7, seed=15)
    check(case, run_logits(case, torch.float64), reference_run(case), torch.float64, 0.7)
    assert FUSED_PASSES <= set(cpu._compiled) and not cpu._compile_failure


def test_small_chunks_do_not_compile(poison, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called for a chunk below COMPILE_MIN_ELEMENTS")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(cpu, "_compiled", {})
    case = make_case(17, 1000, "likelihood", torch.float32, 0.7, seed=16)
    assert 17 * 1000 < cpu.COMPILE_MIN_ELEMENTS
    check(case, run_logits(case), reference_run(case), torch.float32, 0.7)
    assert cpu._compiled == {}

