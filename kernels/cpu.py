"""The loss in chunked PyTorch: the path that runs on CPUs (and anywhere Triton does not).

Positions are processed in chunks of C rows of the logits, so besides the gradient buffer that the
API implies, the temporaries are a few [C, V] tensors: the gradient is built in place in the
caller's buffer (log p - log q, then p (log p - log q), then the gradient), next to one buffer
for p. The math is the Triton kernel's (see `kernels.triton_loss` for the derivation); here it is
vectorized over the rows of a chunk:

    dl/dz_j = a p_j + [j = y] (exact - a p_y)               first form, most rows
    dl/dz_j = c exp(z_j - lse(z without y)), exact at y    unlikelihood with w < 0 and p_y >= 1/2

Arithmetic is in fp32 (fp64 when the logits are fp64, which the tests use to check the path
against the reference at machine precision).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.rows import Rows

LN2 = math.log(2.0)
CHUNK_BYTES = 128 * 2**20  # one [C, V] fp32 buffer of a chunk: 128 MiB


def default_chunk_size(n: int, vocab: int) -> int:
    """Positions per chunk: one [C, V] fp32 buffer of about CHUNK_BYTES.

    Large on purpose. Each chunk costs ~40 PyTorch operations, ~15 of them parallel passes over
    [C, V]; on a shared CPU every parallel region waits for its slowest thread, so many small
    chunks lose more than cache-sized chunks win (1.5x faster per element on one idle core, up
    to 3x slower on a busy 2-core machine). In the fused-linear path each chunk also reads and writes
    all of the fp32 lm_head gradient (grad_W += g^T h_c): fewer chunks move less memory.
    """
    return max(1, min(n, CHUNK_BYTES // (4 * vocab)))


def row_terms(logp: Tensor, log1mp: Tensor, rows: Rows) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss l and gradient coefficients (a, exact, c), all (R,), from log p_y and log(1 - p_y).

    G = -dl/dlog p gives the first form a = G/R, exact = -G (1 - p_y)/R. Unlikelihood rows with
    w < 0 have G = w p/(1 - p) (first form, while p < 1/2) or c = w p/R (second form).
    """
    w = rows.weight.to(logp.dtype)  # (R,)
    p = logp.exp()  # (R,)
    loss = -w * logp  # likelihood
    big_g = w.clone()
    c = torch.zeros_like(w)
    if rows.variant == "unlikelihood":
        neg = w < 0
        high = logp >= -LN2
        loss = torch.where(neg, w * log1mp, loss)
        big_g = torch.where(neg, torch.where(high, 0.0, w * torch.exp(logp - log1mp)), big_g)
        c = torch.where(neg & high, w * p * rows.inv_rows, 0.0)
    elif rows.variant == "pg_clip" and rows.behavior is not None:
        mu = rows.behavior.to(logp.dtype)
        known = ~torch.isnan(mu)
        rho = torch.exp(logp - torch.where(known, mu, 0.0))
        unclipped = rho * w
        clipped = rho.clamp(1 - rows.clip_eps, 1 + rows.clip_eps) * w
        loss = torch.where(known, -torch.minimum(unclipped, clipped), loss)
        big_g = torch.where(known, torch.where(unclipped <= clipped, unclipped, 0.0), big_g)
    exact = torch.where(c != 0, -w * p * rows.inv_rows, -big_g * log1mp.exp() * rows.inv_rows)
    zero = w == 0
    return (
        torch.where(zero, 0.0, loss),
        torch.where(zero, 0.0, big_g * rows.inv_rows),
        torch.where(zero, 0.0, exact),
        torch.where(zero, 0.0, c),
    )


def _max_and_logsum(x: Tensor, buf: Tensor) -> tuple[Tensor, Tensor]:
    """Row maxima m (C,) and log sum exp(x - m) (C,), using buf (C, V) as scratch.

    lse = m + logsum, kept apart: (x - m) - logsum is exact near the maximum, where x - lse would
    round at the size of the logits.
    """
    m = x.amax(1)  # (C,)
    m = torch.where(m == float("-inf"), 0.0, m)  # rows of only -inf: keep x - m at -inf, not NaN
    logsum = torch.sub(x, m[:, None], out=buf).exp_().sum(1).log_()
    return m, logsum


def chunk_loss_and_grad(z: Tensor, r: Tensor, rows: Rows, work: Tensor) -> tuple[Tensor, Tensor]:
    """Row losses (Rc,) and KL (C,) of one chunk; dL/dz is left in work (C, V).

    z, r, work share one float dtype; work may be z itself (then z is overwritten). Besides z, r
    and work, one [C, V] buffer (p) is allocated. About 15 passes over [C, V] memory: the cost of
    this path is memory traffic, so every full-size operation is in place.
    """
    c_pos, vocab = z.shape
    t, y = rows.index, rows.target  # (Rc,) positions in the chunk, targets
    p = torch.empty_like(z)  # (C, V), scratch until it holds p
    m_r, logsum_r = _max_and_logsum(r, p)  # (C,)
    m_z = z.amax(1)  # (C,)
    m_z = torch.where(m_z == float("-inf"), 0.0, m_z)
    s_z = torch.sub(z, m_z[:, None], out=p).exp_().sum(1)  # (C,) p holds exp(z - m_z) now
    logsum_z = s_z.log()
    p.mul_(s_z.reciprocal()[:, None])  # (C, V) p

    # rows: log p_y, and log(1 - p_y) as lse(others) - lse(all) where p_y >= 1/2
    logp_y = (z[t, y] - m_z[t]) - logsum_z[t]  # (Rc,)
    log1mp = torch.log1p(-logp_y.exp())
    m_o = torch.zeros_like(logp_y)  # (Rc,) max and log-sum of z without y, where p_y >= 1/2
    logsum_o = torch.zeros_like(logp_y)
    high = (logp_y >= -LN2).nonzero()[:, 0]
    if high.numel():
        others = z[t[high]].scatter_(1, y[high, None], float("-inf"))  # (Rh, V)
        m_o[high], logsum_o[high] = _max_and_logsum(others, torch.empty_like(others))
        log1mp[high] = (m_o[high] - m_z[t[high]]) + (logsum_o[high] - logsum_z[t[high]])
        del others
    row_loss, a, exact, c = row_terms(logp_y, log1mp, rows)
    second = (c != 0).nonzero()[:, 0]
    if second.numel():  # c exp(z - lse(others)), target entry excluded; from z, before work overwrites it
        ts = t[second]
        contrib = torch.exp((z[ts] - m_o[second, None]) - logsum_o[second, None]).mul_(c[second, None])  # (Rs, V)
        contrib.scatter_(1, y[second, None], 0.0)

    # d = log p - log q = (z - r) - (lse z - lse r); the maxima differ exactly, unlike the lse's
    lse_diff = (m_z - m_r) + (logsum_z - logsum_r)  # (C,)
    d = torch.sub(z, r, out=work).sub_(lse_diff[:, None])  # (C, V); z is dead from here when work is z
    keys, inverse = torch.unique(t * vocab + y, return_inverse=True)  # (U,) target entries
    kt, ky = keys // vocab, keys % vocab
    p_key, d_key = p[kt, ky], d[kt, ky]  # (U,) read before d is overwritten
    pd = d.mul_(p)  # (C, V) p d
    kl = pd.sum(1)  # (C,)
    broken = (~torch.isfinite(kl)).nonzero()[:, 0]
    if broken.numel():  # -inf logits give 0 * nan: p = 0 entries contribute nothing
        fixed = pd[broken].masked_fill_(p[broken] == 0, 0.0)
        pd[broken] = fixed
        kl[broken] = fixed.sum(1)
        d_key = torch.where(p_key == 0, 0.0, d_key)

    # dL/dz_j = p_j (A + klw (d_j - KL)) = klw p_j d_j + p_j (A - klw KL), A = sum of the rows' a;
    # at target entries p_y (A - a of the rows aiming at y) + KL part + their exact values
    klw = rows.kl_weight.to(z.dtype)  # (C,)
    a_sum = torch.zeros(c_pos, dtype=z.dtype, device=z.device).index_add_(0, t, a)  # (C,)
    a_same = torch.zeros(keys.shape, dtype=z.dtype, device=z.device).index_add_(0, inverse, a)
    exact_sum = torch.zeros(keys.shape, dtype=z.dtype, device=z.device).index_add_(0, inverse, exact)
    target_grad = p_key * ((a_sum[kt] - a_same) + klw[kt] * (d_key - kl[kt])) + exact_sum
    grad = pd.mul_(klw[:, None]).addcmul_(p, (a_sum - klw * kl)[:, None])  # (C, V)
    del p
    grad.view(-1)[keys] = target_grad
    if second.numel():
        grad.index_add_(0, t[second], contrib)
    return row_loss, kl


def loss_and_grad(
    z: Tensor, r: Tensor, rows: Rows, out: Tensor, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Row losses (R,) in sorted order and KL (N,), writing dL/dz into out (may be z itself).

    Works chunk by chunk over positions; each chunk is computed in fp32 (fp64 for fp64 logits)
    in out's rows when out has that dtype, else in a [C, V] buffer copied into out.
    """
    n, vocab = z.shape
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    chunk = chunk_size or default_chunk_size(n, vocab)
    row_loss = torch.empty(rows.num_rows, dtype=dtype, device=z.device)
    kl = torch.empty(n, dtype=dtype, device=z.device)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        sub = rows.slice(start, end)
        zc, rc = z[start:end].to(dtype), r[start:end].to(dtype)
        work = out[start:end] if out.dtype == dtype else torch.empty_like(zc)
        a, b = rows.offsets_cpu[start], rows.offsets_cpu[end]
        row_loss[a:b], kl[start:end] = chunk_loss_and_grad(zc, rc, sub, work)
        if work.data_ptr() != out[start:end].data_ptr():
            out[start:end] = work
    return row_loss, kl
