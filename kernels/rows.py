"""Argument checks and the row layout that every back end shares.

The loss (docs/design.md, "The loss") mixes two kinds of data: per-position data (logits, the KL mask)
and annotation rows (position, target, weight, behavior logprob), several of which may point at
the same position. The chunked back ends walk positions in order and need, for any run of
positions, the rows that point into it. So the rows are sorted by position once (stable, so
duplicates keep their order) and indexed CSR-style: the rows of position t are
offsets[t]:offsets[t+1]. Outputs per row come back in sorted order and are put back in the caller's
order with `order`.

The normalizers are folded in here once: every row's loss counts 1/R, every KL_t counts beta/T
where kl_mask is true and 0 elsewhere (R = 0 or T = 0 make their term 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

VARIANTS = ("likelihood", "unlikelihood", "pg_clip")


@dataclass(frozen=True)
class Rows:
    """Annotation rows sorted by position, plus the per-position KL weights."""

    index: Tensor  # (R,) int64 position of each row, ascending
    target: Tensor  # (R,) int64 token id
    weight: Tensor  # (R,) fp32 (fp64 when given in fp64)
    behavior: Tensor | None  # (R,) like weight: sampling logprob mu, NaN where unknown; None: all unknown
    order: Tensor  # (R,) int64: sorted row i is the caller's row order[i]
    offsets: Tensor  # (N + 1,) int64: rows of position t are offsets[t]:offsets[t + 1]
    offsets_cpu: list[int]  # the same offsets as Python ints (chunk slicing without device syncs)
    kl_weight: Tensor  # (N,) like weight: beta / T where kl_mask, else 0
    inv_rows: float  # 1 / R, 0 when R = 0
    variant: str  # one of VARIANTS
    clip_eps: float  # pg_clip: ratio clipped to [1 - eps, 1 + eps]

    @property
    def num_rows(self) -> int:
        return self.index.numel()

    def slice(self, start: int, end: int) -> Rows:
        """The rows of positions [start, end), with positions and offsets re-based to start."""
        a, b = self.offsets_cpu[start], self.offsets_cpu[end]
        return Rows(
            index=self.index[a:b] - start,
            target=self.target[a:b],
            weight=self.weight[a:b],
            behavior=None if self.behavior is None else self.behavior[a:b],
            order=self.order[a:b],
            offsets=self.offsets[start : end + 1] - a,
            offsets_cpu=[o - a for o in self.offsets_cpu[start : end + 1]],
            kl_weight=self.kl_weight[start:end],
            inv_rows=self.inv_rows,
            variant=self.variant,
            clip_eps=self.clip_eps,
        )

    def unsort(self, per_row: Tensor) -> Tensor:
        """Put a per-row tensor computed in sorted order back into the caller's row order."""
        out = torch.empty_like(per_row)
        out[self.order] = per_row
        return out


def check_args(
    n: int,
    vocab: int,
    device: torch.device,
    row_index: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    beta: float,
    variant: str,
    behavior_logprobs: Tensor | None,
    clip_eps: float,
    kl_mask: Tensor | None,
) -> None:
    """Raise ValueError naming the argument when the rows or options do not fit N x V logits."""
    if variant not in VARIANTS:
        raise ValueError(f"variant: must be one of {VARIANTS}, got {variant!r}")
    if not math.isfinite(float(beta)) or float(beta) < 0:
        raise ValueError(f"beta: must be finite and >= 0, got {beta}")
    if not math.isfinite(float(clip_eps)) or not 0 <= float(clip_eps) < 1:
        raise ValueError(f"clip_eps: must be in [0, 1), got {clip_eps}")
    if row_index.dim() != 1:
        raise ValueError(f"row_index: must be 1-D [R], got shape {list(row_index.shape)}")
    r = row_index.shape[0]
    named = [("row_index", row_index), ("targets", targets), ("weights", weights)]
    if behavior_logprobs is not None:
        named.append(("behavior_logprobs", behavior_logprobs))
    for name, t in named:
        if t.dim() != 1 or t.shape[0] != r:
            raise ValueError(f"{name}: must have shape [R] = [{r}] like row_index, got {list(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}: must be on {device} like the logits, got {t.device}")
    for name, t in named[:2]:
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: must be int32 or int64, got {t.dtype}")
    for name, t in named[2:]:
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name}: must be a floating-point tensor, got {t.dtype}")
    if r > 0:
        lo, hi = int(row_index.min()), int(row_index.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"row_index: must be in [0, {n}), got values in [{lo}, {hi}]")
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"targets: must be in [0, {vocab}), got values in [{lo}, {hi}]")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weights: must be finite")
        if behavior_logprobs is not None and bool(torch.isinf(behavior_logprobs).any()):
            raise ValueError("behavior_logprobs: must be finite (a log-probability) or NaN (unknown)")
    if kl_mask is not None:
        if kl_mask.dtype != torch.bool or tuple(kl_mask.shape) != (n,):
            raise ValueError(f"kl_mask: must be a bool tensor of shape [N] = [{n}], got {kl_mask.dtype} {list(kl_mask.shape)}")
        if kl_mask.device != device:
            raise ValueError(f"kl_mask: must be on {device} like the logits, got {kl_mask.device}")


def prepare_rows(
    n: int,
    row_index: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    beta: float,
    variant: str,
    behavior_logprobs: Tensor | None,
    clip_eps: float,
    kl_mask: Tensor | None,
) -> Rows:
    """Sort rows by position and fold the normalizers in (arguments already checked)."""
    device = row_index.device
    index = row_index.long()
    order = torch.argsort(index, stable=True)  # (R,)
    index = index[order]
    counts = torch.bincount(index, minlength=n)  # (N,)
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    num_rows = index.numel()
    if kl_mask is None:
        kl_mask = torch.ones(n, dtype=torch.bool, device=device)
    num_kl = int(kl_mask.sum())
    dtype = torch.float64 if weights.dtype == torch.float64 else torch.float32
    kl_weight = kl_mask.to(dtype) * (float(beta) / num_kl if num_kl > 0 else 0.0)  # (N,)
    return Rows(
        index=index,
        target=targets.long()[order],
        weight=weights.to(dtype)[order],
        behavior=None if behavior_logprobs is None else behavior_logprobs.to(dtype)[order],
        order=order,
        offsets=offsets,
        offsets_cpu=offsets.tolist(),
        kl_weight=kl_weight,
        inv_rows=1.0 / num_rows if num_rows > 0 else 0.0,
        variant=variant,
        clip_eps=float(clip_eps),
    )
