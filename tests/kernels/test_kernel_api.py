"""The public API: argument checks that name the argument, back-end dispatch, return_details,
where gradients flow, and the one-shot backward."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_case

import kernels
from kernels import fused_linear_token_loss, token_loss


def args(n=6, v=20, r=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, v, generator=g), torch.randn(n, v, generator=g), torch.randint(0, n, (r,), generator=g),
            torch.randint(0, v, (r,), generator=g), torch.randn(r, generator=g))  # fmt: skip


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(variant="dpo"), "variant"),
        (dict(beta=-1.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(clip_eps=1.5), "clip_eps"),
        (dict(row_index=torch.tensor([0, 1, 2, 6])), "row_index"),
        (dict(row_index=torch.tensor([0, 1, -1, 2])), "row_index"),
        (dict(row_index=torch.tensor([0.0, 1.0, 2.0, 3.0])), "row_index"),
        (dict(targets=torch.tensor([0, 1, 2, 20])), "targets"),
        (dict(targets=torch.tensor([0, 1, 2])), "targets"),
        (dict(weights=torch.tensor([1.0, float("inf"), 0.0, 1.0])), "weights"),
        (dict(weights=torch.tensor([1, 2, 3, 4])), "weights"),
        (dict(behavior_logprobs=torch.tensor([-1.0, float("-inf"), -1.0, -1.0])), "behavior_logprobs"),
        (dict(behavior_logprobs=torch.zeros(3)), "behavior_logprobs"),
        (dict(kl_mask=torch.ones(5, dtype=torch.bool)), "kl_mask"),
        (dict(kl_mask=torch.ones(6)), "kl_mask"),
        (dict(ref_logits=torch.randn(6, 21)), "ref_logits"),
        (dict(logits=torch.randn(6)), "logits"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_arguments_are_named(change, message):
    logits, ref_logits, index, targets, weights = args()
    kw = dict(logits=logits, ref_logits=ref_logits, row_index=index, targets=targets, weights=weights, beta=0.1)
    kw.update(change)
    with pytest.raises(ValueError, match=f"^{message}: "):
        token_loss(**kw)


def test_fused_shapes_are_checked():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    rows = (torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="^lm_head_weight: "):
        fused_linear_token_loss(h, torch.randn(10, 9), h, w, *rows, beta=0.1)
    with pytest.raises(ValueError, match="^ref_hidden: "):
        fused_linear_token_loss(h, w, torch.randn(5, 8), w, *rows, beta=0.1)
    with pytest.raises(ValueError, match="^chunk_size: "):
        fused_linear_token_loss(h, w, h, w, *rows, beta=0.1, chunk_size=0)


@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_details_and_gradient_targets(backend):
    case = make_case(9, 30, "unlikelihood", torch.float32, 0.3, seed=1)
    logits = case.logits.clone().requires_grad_()
    ref_logits = case.ref_logits.clone().requires_grad_()  # must not receive a gradient
    loss, rows, kl = token_loss(logits, ref_logits, *case.rows(), **case.kwargs(), return_details=True,
                                backend=backend)  # fmt: skip
    assert loss.shape == () and loss.requires_grad
    assert rows.shape == case.row_index.shape and not rows.requires_grad
    assert kl.shape == (9,) and not kl.requires_grad
    (2.0 * loss).backward()
    assert ref_logits.grad is None and logits.grad is not None
    # details are in the caller's row order: the reference's per-row values, row by row
    want = kernels.reference.row_losses(case.logits.double(), case.row_index, case.targets,
                                        case.weights.double(), "unlikelihood", None, 0.2)  # fmt: skip
    torch.testing.assert_close(rows.double(), want, rtol=1e-5, atol=1e-6)


def test_default_backend_on_cpu_is_the_cpu_path(monkeypatch):
    calls = []
    real = kernels.cpu.loss_and_grad
    monkeypatch.setattr(kernels.cpu, "loss_and_grad", lambda *a: calls.append(1) or real(*a))
    token_loss(*args(), beta=0.1)
    assert calls == [1]


def test_pg_clip_without_behavior_is_likelihood():
    logits, ref_logits, index, targets, weights = args()
    a = token_loss(logits, ref_logits, index, targets, weights, beta=0.2, variant="pg_clip")
    b = token_loss(logits, ref_logits, index, targets, weights, beta=0.2, variant="likelihood")
    nan = torch.full_like(weights, float("nan"))
    c = token_loss(logits, ref_logits, index, targets, weights, beta=0.2, variant="pg_clip", behavior_logprobs=nan)
    assert a.item() == b.item() == c.item()


def test_int32_rows_and_non_contiguous_logits():
    logits, ref_logits, index, targets, weights = args(v=40)
    want = token_loss(logits[:, ::2].contiguous(), ref_logits[:, ::2].contiguous(), index, targets % 20, weights,
                      beta=0.3, backend="reference")  # fmt: skip
    got = token_loss(logits[:, ::2], ref_logits[:, ::2], index.int(), (targets % 20).int(), weights, beta=0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_backward_twice_is_refused():
    logits, ref_logits, index, targets, weights = args()
    logits.requires_grad_()
    loss = token_loss(logits, ref_logits, index, targets, weights, beta=0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
