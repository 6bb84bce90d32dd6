"""Real Triton launches on a CUDA device, bf16 at realistic sizes, against the float64 reference
on the same device. Skipped without a GPU; run them whenever a session has one."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import assert_close, loss_scale, make_case

from kernels import VARIANTS, default_chunk_size, fused_linear_token_loss, token_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def to_cuda(case):
    for name in ("logits", "ref_logits", "row_index", "targets", "weights", "behavior", "kl_mask"):
        setattr(case, name, getattr(case, name).cuda())
    return case


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,v", [(4096, 32000), (1024, 128256)])
def test_triton_bf16_realistic(n, v, variant):
    case = to_cuda(make_case(n, v, variant, torch.bfloat16, 0.1, seed=n + v))
    z64 = case.logits.double().requires_grad_()
    want = token_loss(z64, case.ref_logits.double(), *case.rows(torch.float64), **case.kwargs(torch.float64),
                      return_details=True, backend="reference")  # fmt: skip
    want[0].backward()
    z = case.logits.clone().requires_grad_()
    got = token_loss(z, case.ref_logits, *case.rows(), **case.kwargs(), return_details=True)  # default: triton
    got[0].backward()
    scale = loss_scale(want[1], want[2], case.kl_mask, case.beta)
    assert_close(got[0], want[0], torch.bfloat16, "loss", scale)
    assert_close(got[1], want[1], torch.bfloat16, "row losses")
    assert_close(got[2], want[2], torch.bfloat16, "kl")
    assert_close(z.grad, z64.grad, torch.bfloat16, "dL/dlogits")


def test_triton_fp32_tolerance():
    case = to_cuda(make_case(512, 50257, "unlikelihood", torch.float32, 0.5, seed=3))
    z64 = case.logits.double().requires_grad_()
    want = token_loss(z64, case.ref_logits.double(), *case.rows(torch.float64), **case.kwargs(torch.float64),
                      backend="reference")  # fmt: skip
    want.backward()
    z = case.logits.clone().requires_grad_()
    token_loss(z, case.ref_logits, *case.rows(), **case.kwargs()).backward()
    assert_close(z.grad, z64.grad, torch.float32, "dL/dlogits")


def test_fused_linear_bf16_realistic_and_its_memory():
    """N = 4096, V = 32000, H = 2048 in bf16: agrees with the reference, and the peak memory of
    the fused path is O(chunk x V): two logits chunks (policy, reference) and the gradients it
    returns (grad_W accumulated in fp32, then cast), independent of N."""
    n, v, h = 4096, 32000, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5 * 2).bfloat16()
    ref_hidden = (hidden.float() + 0.3 * torch.randn(n, h, device="cuda", generator=g)).bfloat16()
    case = to_cuda(make_case(n, 8, "unlikelihood", torch.bfloat16, 0.1, seed=1))  # rows only
    case.targets = torch.randint(0, v, case.targets.shape, device="cuda", generator=g)

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = fused_linear_token_loss(h64, w64, ref_hidden.double(), weight.double(), *case.rows(torch.float64),
                                   **case.kwargs(torch.float64), backend="reference")  # fmt: skip
    want.backward()
    del want

    hb, wb = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fused_linear_token_loss(hb, wb, ref_hidden, weight, *case.rows(), **case.kwargs())
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    print(f"\nfused-linear bf16 N={n} V={v} H={h}: peak extra {peak / 2**20:.0f} MiB")
    assert_close(hb.grad, h64.grad, torch.bfloat16, "dL/dhidden")
    assert_close(wb.grad, w64.grad, torch.bfloat16, "dL/dlm_head_weight")
    chunk = default_chunk_size(n, v, h, hidden.device, 2)
    bound = 2 * chunk * v * 2 + v * h * (4 + 2) + n * h * 2 + 64 * 2**20
    assert chunk < n and peak < bound, f"peak extra {peak / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
