"""The loss in chunked PyTorch: the path that runs on CPUs (and anywhere Triton does not).

Positions are processed in chunks of C rows of the logits (docs/design.md, "Kernels"). Per chunk
there are two steps over [C, V]: row statistics (max and log-sum-exp of z and r), then KL and
the gradient, written in place into the caller's buffer (which may be z). Large chunks run them
compiled (torch.compile, three fused kernels, no [C, V] temporaries); small chunks, and every chunk
once compiling has failed, run them eagerly (in-place PyTorch, one [C, V] buffer besides). The math
is the Triton kernel's (see `kernels.triton_loss` for the derivation); here it is vectorized over
the rows of a chunk:

    dl/dz_j = a p_j + [j = y] (exact - a p_y)               first form, most rows
    dl/dz_j = c exp(z_j - lse(z without y)), exact at y    unlikelihood with w < 0 and p_y >= 1/2

Arithmetic is in fp32 (fp64 when the logits are fp64, which the tests use to check the path
against the reference at machine precision).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from kernels.rows import Rows

LN2 = math.log(2.0)
CHUNK_BYTES = 512 * 2**20  # at most one [C, V] fp32 buffer of a chunk: 512 MiB


def default_chunk_size(n: int, vocab: int) -> int:
    """Positions per chunk: the fewest chunks whose [C, V] fp32 buffers stay within CHUNK_BYTES,
    all of the same size (no small last chunk).

    Large on purpose. The fused-linear path's matmuls run at their best rate for C in the
    thousands, and each chunk reads and writes all of the fp32 lm_head gradient
    (grad_W += g^T h_c): fewer chunks move less memory. What a chunk holds besides: its policy and
    reference logits (the compiled passes allocate nothing more), or one more [C, V] buffer in the
    eager passes. At N=4096, V=50257: 2 chunks of 2048, about 0.8 GiB of logits at a time against
    eager PyTorch's 5.4 GiB for the whole loss.
    """
    max_rows = max(1, CHUNK_BYTES // (4 * vocab))
    chunks = -(-n // max_rows)  # ceil
    return -(-n // chunks)


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


# ---- the [C, V] passes ---------------------------------------------------------------------------
# Two implementations of the same two steps: row statistics (max and log-sum-exp of z and r), then
# KL and the gradient. Eager: in-place PyTorch, about 17 passes over [C, V] memory and one [C, V]
# buffer besides z, r and out. Fused: the same math written plainly and run under torch.compile,
# which makes each step a loop over rows that reads a row from memory once and keeps it in cache
# for the row's next pass: 3 kernels, no [C, V] temporaries. Compiled on first use per dtype
# (shapes are dynamic), only for chunks of at least COMPILE_MIN_ELEMENTS; if compiling fails the
# process warns once and stays eager.

COMPILE_MIN_ELEMENTS = 2**22  # smaller chunks run eagerly: compiling (seconds, once) would not pay
_compiled: dict[str, Callable] = {}  # fused pass name -> its torch.compile wrapper, made on first use
_compile_failure: list[str] = []  # why compiling failed; non-empty: every chunk runs eagerly


def _max_and_logsum(x: Tensor, buf: Tensor) -> tuple[Tensor, Tensor]:
    """Row maxima m (C,) and log sum exp(x - m) (C,), using buf (C, V) as scratch.

    lse = m + logsum, kept apart: (x - m) - logsum is exact near the maximum, where x - lse would
    round at the size of the logits.
    """
    m = x.amax(1)  # (C,)
    m = torch.where(m == float("-inf"), 0.0, m)  # rows of only -inf: keep x - m at -inf, not NaN
    logsum = torch.sub(x, m[:, None], out=buf).exp_().sum(1).log_()
    return m, logsum


def _stats_eager(z: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """m_z, logsum_z, m_r, logsum_r, each (C,); one [C, V] scratch buffer."""
    buf = torch.empty_like(z)  # (C, V)
    m_r, logsum_r = _max_and_logsum(r, buf)
    m_z, logsum_z = _max_and_logsum(z, buf)
    return m_z, logsum_z, m_r, logsum_r


def _kl_and_grad_eager(z, r, m_z, logsum_z, lse_diff, klw, a_sum, out) -> Tensor:
    """KL (C,); out (C, V) gets dL/dz_j = klw p_j d_j + p_j (A - klw KL), target entries aside."""
    p = torch.sub(z, m_z[:, None]).sub_(logsum_z[:, None]).exp_()  # (C, V)
    pd = torch.sub(z, r, out=out).sub_(lse_diff[:, None]).mul_(p)  # (C, V) p d; z is dead if out is z
    kl = pd.sum(1)  # (C,)
    broken = (~torch.isfinite(kl)).nonzero()[:, 0]
    if broken.numel():  # -inf logits give 0 * nan: p = 0 entries contribute nothing
        fixed = pd[broken].masked_fill_(p[broken] == 0, 0.0)
        pd[broken] = fixed
        kl[broken] = fixed.sum(1)
    pd.mul_(klw[:, None]).addcmul_(p, (a_sum - klw * kl)[:, None])
    return kl


def _stats_fused(z: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """As _stats_eager, for torch.compile (rows of only -inf give NaN here, as they do later there)."""
    m_z = z.amax(1, keepdim=True)  # (C, 1)
    m_r = r.amax(1, keepdim=True)  # (C, 1)
    logsum_z = torch.exp(z - m_z).sum(1).log()  # (C,)
    logsum_r = torch.exp(r - m_r).sum(1).log()  # (C,)
    return m_z[:, 0], logsum_z, m_r[:, 0], logsum_r


def _p_and_d(z, r, m_z, logsum_z, lse_diff) -> tuple[Tensor, Tensor]:
    p = torch.exp((z - m_z[:, None]) - logsum_z[:, None])  # (C, V)
    d = (z - r) - lse_diff[:, None]  # (C, V) log p - log q
    return p, d


def _kl_fused(z, r, m_z, logsum_z, lse_diff) -> Tensor:
    """KL (C,), for torch.compile; entries with p = 0 contribute 0 (also where d is infinite)."""
    p, d = _p_and_d(z, r, m_z, logsum_z, lse_diff)
    return torch.where(p > 0, p * d, 0.0).sum(1)


def _grad_of(z, r, m_z, logsum_z, lse_diff, klw, a_sum, kl) -> Tensor:
    """p_j (A + klw (d_j - KL)) (C, V), for the compiled kernels below."""
    p, d = _p_and_d(z, r, m_z, logsum_z, lse_diff)
    return torch.where(p > 0, p * (klw[:, None] * (d - kl[:, None]) + a_sum[:, None]), 0.0)


# Written out twice rather than called with out = z: the compiled kernels never see two arguments
# that alias (torch 2.13: after a call with out = z, a later call with a separate out left it
# unwritten). And a kernel of its own, not fused into _kl_fused: inductor fails to compile a
# reduction followed by an in-place store in one function; the price is a second read of z and r.
def _grad_fused(z, r, m_z, logsum_z, lse_diff, klw, a_sum, kl, out) -> None:
    out.copy_(_grad_of(z, r, m_z, logsum_z, lse_diff, klw, a_sum, kl))


def _grad_fused_in_place(z, r, m_z, logsum_z, lse_diff, klw, a_sum, kl) -> None:
    z.copy_(_grad_of(z, r, m_z, logsum_z, lse_diff, klw, a_sum, kl))


def _fused(fn: Callable) -> Callable:
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn.__name__]


def _give_up_compiling(error: Exception) -> None:
    """Remember the failure and warn once; compiling fails before a kernel runs, so the chunk's
    buffers are untouched and the eager passes can redo the step."""
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    _compile_failure.append(f"{type(error).__name__}: {first_line}")
    warnings.warn(f"kernels.cpu: torch.compile of the loss passes failed ({_compile_failure[0]}); "
                  "running them eagerly from now on", RuntimeWarning, stacklevel=3)  # fmt: skip


def uses_compiled(z: Tensor) -> bool:
    """Whether a chunk of these logits (C, V) runs the compiled passes."""
    return not _compile_failure and z.numel() >= COMPILE_MIN_ELEMENTS


def _stats(z: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if uses_compiled(z):
        try:
            return _fused(_stats_fused)(z, r)
        except Exception as e:  # noqa: BLE001 - any compile failure: the eager passes still work
            _give_up_compiling(e)
    return _stats_eager(z, r)


def _kl_and_grad(z, r, m_z, logsum_z, lse_diff, klw, a_sum, out) -> Tensor:
    if uses_compiled(z):
        try:
            kl = _fused(_kl_fused)(z, r, m_z, logsum_z, lse_diff)
            if out.data_ptr() == z.data_ptr():  # the fused-linear path: logits become their gradient
                _fused(_grad_fused_in_place)(z, r, m_z, logsum_z, lse_diff, klw, a_sum, kl)
            else:
                _fused(_grad_fused)(z, r, m_z, logsum_z, lse_diff, klw, a_sum, kl, out)
            return kl
        except Exception as e:  # noqa: BLE001 - as in _stats; out is written only by a compiled kernel
            _give_up_compiling(e)
    return _kl_and_grad_eager(z, r, m_z, logsum_z, lse_diff, klw, a_sum, out)


# ---- one chunk -------------------------------------------------------------------------------------


def chunk_loss_and_grad(z: Tensor, r: Tensor, rows: Rows, work: Tensor) -> tuple[Tensor, Tensor]:
    """Row losses (Rc,) and KL (C,) of one chunk; dL/dz is left in work (C, V).

    z, r, work share one float dtype; work may be z itself (then z is overwritten). The [C, V]
    passes are the two steps above; everything else here is per row or per target entry.
    """
    c_pos, vocab = z.shape
    t, y = rows.index, rows.target  # (Rc,) positions in the chunk, targets
    m_z, logsum_z, m_r, logsum_r = _stats(z, r)  # (C,) each

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
    keys, inverse = torch.unique(t * vocab + y, return_inverse=True)  # (U,) target entries
    kt, ky = keys // vocab, keys % vocab
    z_key = z[kt, ky]  # (U,) read before work (maybe z) is overwritten
    p_key = torch.exp((z_key - m_z[kt]) - logsum_z[kt])  # (U,) as the passes compute p and d
    d_key = torch.where(p_key == 0, 0.0, (z_key - r[kt, ky]) - lse_diff[kt])  # p = 0: no KL part

    # dL/dz_j = p_j (A + klw (d_j - KL)) = klw p_j d_j + p_j (A - klw KL), A = sum of the rows' a;
    # at target entries p_y (A - a of the rows aiming at y) + KL part + their exact values
    klw = rows.kl_weight.to(z.dtype)  # (C,)
    a_sum = torch.zeros(c_pos, dtype=z.dtype, device=z.device).index_add_(0, t, a)  # (C,)
    a_same = torch.zeros(keys.shape, dtype=z.dtype, device=z.device).index_add_(0, inverse, a)
    exact_sum = torch.zeros(keys.shape, dtype=z.dtype, device=z.device).index_add_(0, inverse, exact)
    kl = _kl_and_grad(z, r, m_z, logsum_z, lse_diff, klw, a_sum, work)  # (C,); work holds dL/dz
    target_grad = p_key * ((a_sum[kt] - a_same) + klw[kt] * (d_key - kl[kt])) + exact_sum
    work.view(-1)[keys] = target_grad
    if second.numel():
        work.index_add_(0, t[second], contrib)
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
