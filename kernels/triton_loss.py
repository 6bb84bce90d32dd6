"""Triton kernel for the token loss: loss, per-position KL and dL/dlogits in one launch.

One program per position t. It reads the policy logits z_t and the reference logits r_t (any float
dtype; all arithmetic in fp32) and does three things, with int64 offsets throughout (t * V exceeds
int32 for N V > 2^31):

1. Statistics pass, streaming over V in blocks with running maxima (docs/design.md, "The loss": identities):
   lse(z), lse(r) and S = sum_j p_j ((z_j - m_z) - (r_j - m_r)), so that
   KL_t = S - log s_z + log s_r (s = sum exp(. - m)). Keeping the sum relative to the running
   maxima, not sum p (z - r), avoids cancelling two large numbers for large logits.
2. Rows of t (sorted by position, CSR offsets): log p_y = z_y - lse(z), and 1 - p_y without
   cancellation: log1p(-p_y) form when p_y < 1/2, else exp(lse(z without y) - lse(z)) from one more
   streaming pass over z_t for that row only. From these, each row's loss and the coefficients of
   its gradient (see `kernels.cpu.row_terms`, the same formulas in PyTorch):
       dl/dz_j = a p_j + [j = y] (exact - a p_y)                (most rows)
       dl/dz_j = c exp(z_j - lse(z without y)),  exact at j = y   (unlikelihood, w < 0, p_y >= 1/2)
   The second form keeps the unlikelihood gradient finite when 1 - p_y underflows.
3. Gradient pass, streaming over V again, writing
       g_j = p_j (A_j + klw_t ((z_j - lse z) - (r_j - lse r) - KL_t)) + extra_j
   where A_j sums the a of the rows whose target is not j (summed, never A - a) and extra_j holds their exact target
   values and the second-form terms, so target entries are never computed as a difference of
   large numbers. The gradient goes to its own buffer, which may be the logits themselves (the
   fused-linear path overwrites each chunk's logits in place).

Bytes moved per position, with b bytes per logit: pass 1 reads 2 V b, pass 3 reads 2 V b and writes
V b, so 5 V b in all (plus V b per row with p_y >= 1/2, usually from L2). At V = 128256 in bf16
that is 1.3 MB per position; the kernel is bound by memory bandwidth, not by its 2 exp per logit.

Nothing here runs at import except the @triton.jit decoration, which needs no GPU; on CPU tensors
the kernel runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.rows import VARIANTS, Rows

LN2 = tl.constexpr(0.6931471805599453)  # ln 2: p_y >= 1/2 exactly when log p_y >= -LN2
# elements of V per loop step: 8 per thread at 8 warps (128-bit bf16 loads). 80-95 registers a thread
# on sm_90/sm_80 (python -m kernels.aot), 2-3 programs per SM; 4096 at 8 warps takes 230, 1 program.
MAX_BLOCK_V = 2048


@triton.jit
def _token_loss_kernel(
    z_ptr,  # (N, V) policy logits, last dim contiguous
    r_ptr,  # (N, V) reference logits
    g_ptr,  # (N, V) out: dL/dz (may alias z_ptr)
    z_stride,
    r_stride,
    g_stride,
    offsets_ptr,  # (N + 1,) int64: rows of position t are offsets[t]:offsets[t + 1]
    target_ptr,  # (R,) int64, rows sorted by position
    weight_ptr,  # (R,) fp32
    behavior_ptr,  # (R,) fp32 sampling logprob, NaN = unknown (read only when HAS_BEHAVIOR)
    kl_weight_ptr,  # (N,) fp32: beta / T where the KL counts, else 0
    row_loss_ptr,  # (R,) out: l per row (before the 1/R)
    kl_ptr,  # (N,) out: KL_t
    row_a_ptr,  # (R,) scratch: gradient coefficient a (includes 1/R)
    row_exact_ptr,  # (R,) scratch: exact gradient value at the target
    row_c_ptr,  # (R,) scratch: second-form coefficient c (0 for first-form rows)
    row_max_ptr,  # (R,) scratch, second-form rows: max of z without y (+inf for other rows)
    row_logsum_ptr,  # (R,) scratch, second-form rows: log sum exp(z - max) without y
    V,
    inv_rows,  # 1 / R
    clip_eps,
    VARIANT: tl.constexpr,  # 0 likelihood, 1 unlikelihood, 2 pg_clip
    HAS_BEHAVIOR: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + t * z_stride
    r_row = r_ptr + t * r_stride
    g_row = g_ptr + t * g_stride
    cols = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    # ---- 1. statistics: lse(z), lse(r), KL ----------------------------------------------------
    m_z = tl.full((), NEG_INF, tl.float32)
    m_r = tl.full((), NEG_INF, tl.float32)
    s_z = tl.zeros((), tl.float32)  # sum exp(z - m_z)
    s_r = tl.zeros((), tl.float32)  # sum exp(r - m_r)
    acc = tl.zeros((), tl.float32)  # sum exp(z - m_z) ((z - m_z) - (r - m_r))
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
        r = tl.load(r_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
        new_m_z = tl.maximum(m_z, tl.max(z, 0))
        new_m_r = tl.maximum(m_r, tl.max(r, 0))
        base_z = tl.where(new_m_z == NEG_INF, 0.0, new_m_z)  # avoid -inf - -inf
        base_r = tl.where(new_m_r == NEG_INF, 0.0, new_m_r)
        scale_z = tl.exp(m_z - base_z)
        # re-express the old terms relative to the new maxima before rescaling them
        shift = (base_z - tl.where(m_z == NEG_INF, base_z, m_z)) - (base_r - tl.where(m_r == NEG_INF, base_r, m_r))
        acc = scale_z * (acc - s_z * shift)
        e = tl.exp(z - base_z)
        d = tl.where(z == NEG_INF, 0.0, (z - base_z) - (r - base_r))
        acc += tl.sum(e * d, 0)
        s_z = s_z * scale_z + tl.sum(e, 0)
        s_r = s_r * tl.exp(m_r - base_r) + tl.sum(tl.exp(r - base_r), 0)
        m_z = new_m_z
        m_r = new_m_r
    # log p = (z - m_z) - log s_z: z - m_z is exact near the maximum, where m_z + log s_z would
    # round at the size of the logits (5e-4 at 1e4 in fp32)
    log_s_z = tl.log(s_z)
    log_s_r = tl.log(s_r)
    kl = acc / s_z - log_s_z + log_s_r
    tl.store(kl_ptr + t, kl)
    klw = tl.load(kl_weight_ptr + t)

    # ---- 2. rows of this position: loss and gradient coefficients -------------------------------
    row_start = tl.load(offsets_ptr + t)
    row_end = tl.load(offsets_ptr + t + 1)
    for k in range(row_start, row_end):
        y = tl.load(target_ptr + k)
        w = tl.load(weight_ptr + k)
        logp = (tl.load(z_row + y).to(tl.float32) - m_z) - log_s_z
        p_y = tl.exp(logp)
        high = logp >= -LN2
        # log(1 - p_y): stream lse over j != y when p_y >= 1/2 (the loop is empty otherwise)
        m_o = tl.full((), NEG_INF, tl.float32)
        s_o = tl.zeros((), tl.float32)
        for start in range(0, tl.where(high, V, 0), BLOCK_V):
            offs = start + cols
            zo = tl.load(z_row + offs, mask=(offs < V) & (offs != y), other=NEG_INF).to(tl.float32)
            new_m_o = tl.maximum(m_o, tl.max(zo, 0))
            base_o = tl.where(new_m_o == NEG_INF, 0.0, new_m_o)
            s_o = s_o * tl.exp(m_o - base_o) + tl.sum(tl.exp(zo - base_o), 0)
            m_o = new_m_o
        log_s_o = tl.log(tl.where(high, s_o, 1.0))
        log1mp = tl.where(high, (m_o - m_z) + (log_s_o - log_s_z), tl.log(1.0 - p_y))
        one_minus_p = tl.exp(log1mp)

        loss = -w * logp  # likelihood, and the w >= 0 half of unlikelihood
        big_g = w  # G = -dl/dlog p: dl/dz_j = G (p_j - [j = y])
        c = tl.zeros((), tl.float32)
        if VARIANT == 1:
            neg = w < 0
            loss = tl.where(neg, w * log1mp, loss)  # -|w| log(1 - p)
            # d(-log(1 - p))/dz_j = p/(1 - p) ([j = y] - p_j): first form while p < 1/2
            big_g = tl.where(neg, tl.where(high, 0.0, w * tl.exp(logp - log1mp)), big_g)
            c = tl.where(neg & high, w * p_y * inv_rows, 0.0)
        if VARIANT == 2:
            if HAS_BEHAVIOR:
                mu = tl.load(behavior_ptr + k)
                known = mu == mu  # not NaN
                rho = tl.exp(logp - tl.where(known, mu, 0.0))
                unclipped = rho * w
                clipped = tl.minimum(tl.maximum(rho, 1.0 - clip_eps), 1.0 + clip_eps) * w
                loss = tl.where(known, -tl.minimum(unclipped, clipped), loss)
                big_g = tl.where(known, tl.where(unclipped <= clipped, unclipped, 0.0), big_g)
        exact = tl.where(c != 0, -w * p_y * inv_rows, -big_g * one_minus_p * inv_rows)
        zero = w == 0
        a = tl.where(zero, 0.0, big_g * inv_rows)
        tl.store(row_loss_ptr + k, tl.where(zero, 0.0, loss))
        tl.store(row_a_ptr + k, a)
        tl.store(row_exact_ptr + k, tl.where(zero, 0.0, exact))
        tl.store(row_c_ptr + k, tl.where(zero, 0.0, c))
        tl.store(row_max_ptr + k, tl.where(c != 0, m_o, float("inf")))
        tl.store(row_logsum_ptr + k, tl.where(c != 0, log_s_o, 0.0))
    tl.debug_barrier()  # the scratch stores above are read back by other threads below

    # ---- 3. gradient ----------------------------------------------------------------------------
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(z_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
        r = tl.load(r_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
        logp = (z - m_z) - log_s_z
        p = tl.exp(logp)
        d = tl.where(z == NEG_INF, 0.0, logp - ((r - m_r) - log_s_r))
        a_eff = tl.zeros((BLOCK_V,), tl.float32)  # sum of a over rows aiming elsewhere: no A - a
        extra = tl.zeros((BLOCK_V,), tl.float32)
        for k in range(row_start, row_end):
            y = tl.load(target_ptr + k)
            hit = offs == y
            a_eff = tl.where(hit, a_eff, a_eff + tl.load(row_a_ptr + k))
            extra = tl.where(hit, extra + tl.load(row_exact_ptr + k), extra)
            c = tl.load(row_c_ptr + k)
            if c != 0:
                second = c * tl.exp((z - tl.load(row_max_ptr + k)) - tl.load(row_logsum_ptr + k))
                extra = tl.where(hit, extra, extra + second)
        g = p * (a_eff + klw * (d - kl)) + extra
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


# True when TRITON_INTERPRET=1 was set before triton was imported: the kernel then runs on CPU tensors
INTERPRETED = not isinstance(_token_loss_kernel, triton.runtime.jit.JITFunction)


def _launch_config(vocab: int) -> tuple[int, int]:
    """BLOCK_V and num_warps for a vocabulary size: 8 elements per thread from 1024 up."""
    block = min(MAX_BLOCK_V, max(128, triton.next_power_of_2(vocab)))
    return block, max(4, block // 256)


def loss_and_grad(z: Tensor, r: Tensor, rows: Rows, out: Tensor) -> tuple[Tensor, Tensor]:
    """Row losses (R,) in sorted order and KL (N,), writing dL/dz into out (may be z itself).

    z, r, out: (N, V), last dimension contiguous, on one device (CUDA, or CPU under
    TRITON_INTERPRET=1). Returns fp32 tensors.
    """
    n, vocab = z.shape
    assert r.shape == z.shape and out.shape == z.shape, f"shapes differ: z {z.shape}, r {r.shape}, out {out.shape}"
    assert z.stride(1) == 1 and r.stride(1) == 1 and out.stride(1) == 1, "last dimension must be contiguous"
    device = z.device
    num_rows = rows.num_rows
    room = max(num_rows, 1)  # empty row sets still need valid pointers
    row_loss = torch.empty(room, dtype=torch.float32, device=device)
    kl = torch.empty(n, dtype=torch.float32, device=device)
    scratch = torch.empty(5, room, dtype=torch.float32, device=device)
    target, weight = rows.target, rows.weight.float()
    if num_rows == 0:
        target = torch.zeros(1, dtype=torch.int64, device=device)
        weight = torch.zeros(1, dtype=torch.float32, device=device)
    has_behavior = rows.behavior is not None and num_rows > 0
    block, warps = _launch_config(vocab)
    _token_loss_kernel[(n,)](
        z, r, out, z.stride(0), r.stride(0), out.stride(0),
        rows.offsets, target, weight, rows.behavior.float() if has_behavior else weight, rows.kl_weight.float(),
        row_loss, kl, *scratch,
        vocab, rows.inv_rows, rows.clip_eps,
        VARIANT=VARIANTS.index(rows.variant), HAS_BEHAVIOR=has_behavior, BLOCK_V=block,
        num_warps=warps,
    )  # fmt: skip
    return row_loss[:num_rows], kl
