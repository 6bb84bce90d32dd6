"""Random loss inputs and the one tolerance helper of the kernel tests.

Inputs look like training data: references close to the policy, targets mostly sampled from the
policy (so some have p near 1), a replacement row for some bad tokens, exact duplicate rows,
weights of both signs and some zeros, behavior logprobs near the policy's with some NaN (unknown),
and a KL mask with holes. Each case draws from its own seed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

HAS_CUDA = torch.cuda.is_available()

# relative error bars per input dtype (docs/design.md, "Testing"); fp64 checks the CPU path's formulas
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


@dataclass
class Case:
    logits: torch.Tensor  # (N, V) in the case's dtype
    ref_logits: torch.Tensor  # (N, V)
    row_index: torch.Tensor  # (R,) int64
    targets: torch.Tensor  # (R,) int64
    weights: torch.Tensor  # (R,) fp32
    behavior: torch.Tensor  # (R,) fp32, NaN = unknown
    kl_mask: torch.Tensor  # (N,) bool
    beta: float
    variant: str

    def kwargs(self, dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments of token_loss; dtype casts the float row data (fp64 for the reference)."""
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        return dict(
            beta=self.beta,
            variant=self.variant,
            behavior_logprobs=cast(self.behavior),
            kl_mask=self.kl_mask,
        )

    def rows(self, dtype: torch.dtype | None = None) -> tuple:
        w = self.weights if dtype is None else self.weights.to(dtype)
        return self.row_index, self.targets, w


def make_case(n: int, vocab: int, variant: str, dtype: torch.dtype, beta: float, seed: int) -> Case:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0  # (N, V)
    r = 0.8 * z + 0.6 * torch.randn(n, vocab, generator=g, dtype=torch.float64)  # (N, V), near the policy
    # one sampled-token row per position for most positions, target drawn from the policy
    pos = torch.nonzero(torch.rand(n, generator=g) < 0.8)[:, 0]
    if pos.numel() == 0:
        pos = torch.zeros(1, dtype=torch.int64)
    tgt = torch.multinomial(torch.softmax(z[pos], -1), 1, generator=g)[:, 0]
    # make a quarter of them very likely: p_y > 1/2 takes the kernels' lse(others) path
    boost = torch.rand(pos.numel(), generator=g) < 0.25
    z[pos[boost], tgt[boost]] += 8.0
    w = torch.randn(pos.numel(), generator=g, dtype=torch.float64)
    w[torch.rand(pos.numel(), generator=g) < 0.15] = 0.0
    idx, tgts, ws = [pos], [tgt], [w]
    if vocab > 1:  # replacement rows for some bad tokens: another token, positive weight
        bad = torch.nonzero(w < 0)[:, 0]
        bad = bad[torch.rand(bad.numel(), generator=g) < 0.5]
        repl = (tgt[bad] + 1 + torch.randint(0, vocab - 1, (bad.numel(),), generator=g)) % vocab
        idx.append(pos[bad])
        tgts.append(repl)
        ws.append(w[bad].abs())
    elif variant == "unlikelihood":
        ws[0] = w.abs()  # V = 1: p = 1 always, so -|w| log(1 - p) is +inf for w < 0
    index, targets, weights = torch.cat(idx), torch.cat(tgts), torch.cat(ws)
    dup = torch.nonzero(torch.rand(index.numel(), generator=g) < 0.15)[:, 0]  # exact duplicates
    index, targets, weights = torch.cat([index, index[dup]]), torch.cat([targets, targets[dup]]), torch.cat([weights, weights[dup]])
    shuffle = torch.randperm(index.numel(), generator=g)
    index, targets, weights = index[shuffle], targets[shuffle], weights[shuffle]

    logits, ref_logits = z.to(dtype), r.to(dtype)
    logp = torch.log_softmax(logits.double(), -1)[index, targets]  # (R,)
    behavior = logp + 0.4 * torch.randn(index.numel(), generator=g, dtype=torch.float64)
    behavior[torch.rand(index.numel(), generator=g) < 0.2] = math.nan
    kl_mask = torch.rand(n, generator=g) < 0.8
    return Case(
        logits=logits,
        ref_logits=ref_logits,
        row_index=index,
        targets=targets,
        weights=weights.float(),
        behavior=behavior.clamp(max=0.0).float(),
        kl_mask=kl_mask,
        beta=beta,
        variant=variant,
    )


def seed_of(*parts) -> int:
    """A seed that depends on the case parameters only (str hashes change between runs)."""
    return zlib.crc32(repr(parts).encode())


def rel_error(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, scale), in float64.

    scale: the size of the terms that expected sums, for values that may cancel to near 0 (the
    scalar loss sums row terms of both signs).
    """
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / max(float(e.norm()), scale, 1e-30))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 0.0):
    """The tolerance helper: finite, same shape, relative error below TOL[dtype]."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = (~torch.isfinite(actual.detach())).sum()
    assert bad == 0, f"{what}: {int(bad)} non-finite values"
    err = rel_error(actual, expected, scale)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]:.0e} ({dtype})"


def loss_scale(row_losses: torch.Tensor, kl: torch.Tensor, kl_mask: torch.Tensor, beta: float) -> float:
    """Size of the terms the scalar loss sums: mean |l| + beta mean |KL| over the mask."""
    rows = float(row_losses.abs().mean()) if row_losses.numel() else 0.0
    kls = float(kl[kl_mask].abs().mean()) if bool(kl_mask.any()) else 0.0
    return rows + beta * kls
