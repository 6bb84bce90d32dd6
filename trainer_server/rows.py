"""Training rows: what a validated annotation turns into, and the steps between it and the kernel.

An annotation row is (position t, target token y, weight w) (DESIGN.md, "The loss"). The store
keeps each annotation's *base rows*: one sampled-token row per judged position, whose weight is
the token reward r_t the person gave (token labels and spans merged), plus the replacement rows.
At training time two steps turn base rows into the rows the kernel sees, in this order:

1. `horizon_rows`: token rewards and the sequence reward become the sampled rows' weights
   G_t = sum_{k<h} gamma^k r_{t+k} (DESIGN.md, "Horizon"); replacement rows stay as they are.
2. `stale_factor`: an annotation judged by weights more than K versions old is down-weighted.

Rows after a replacement token are trained on the sampled sequence: the context c_t of every
position is prompt + the *sampled* completion tokens before t, even when an earlier token was
marked bad and given a replacement. The person judged the later tokens in the context they saw
(the sampled one); had the replacement been sampled, the continuation would have been different
and is unknown, so the trainer never invents a context nobody judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One loss row: at completion position `position`, target `token_id` with `weight`."""

    position: int
    token_id: int
    weight: float
    replacement: bool = False  # True: a token that was not sampled (its context is still the sampled one)


@dataclass(frozen=True)
class Annotation:
    """A validated annotated sequence, as the store keeps it."""

    annotation_id: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    model_version: int
    rows: tuple[Row, ...]  # base rows: sampled rows carry the token reward r_t; replacement rows
    behavior_logprobs: tuple[float, ...] | None = None  # one per completion token, or None
    sequence_reward: float | None = None  # placed on the last token by the horizon step
    annotator_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def merge_token_rewards(
    completion_ids: tuple[int, ...] | list[int],
    sampled: dict[int, float],
    replacements: list[tuple[int, int, float]],
) -> tuple[Row, ...]:
    """Base rows from per-position rewards {t: r_t} and replacement rows [(t, token, weight)],
    sorted by position with the sampled row first at each position."""
    rows = [Row(t, int(completion_ids[t]), float(w)) for t, w in sampled.items()]
    rows += [Row(t, int(tok), float(w), replacement=True) for t, tok, w in replacements]
    return tuple(sorted(rows, key=lambda r: (r.position, r.replacement, r.token_id)))


def horizon_rows(annotation: Annotation, horizon: int | None = 1, gamma: float = 1.0) -> list[Row]:
    """The sampled rows' weights after credit assignment (DESIGN.md, "Horizon").

    r_t is the base reward at t (0 where nothing was said) plus the sequence reward at the last
    token; G_t = sum_{k=0}^{h-1} gamma^k r_{t+k}, terms past the end 0; horizon None means the
    whole sequence. A position gets a sampled row when it was judged or when G_t != 0.
    Replacement rows keep their position and weight.
    """
    assert horizon is None or horizon >= 1, f"horizon must be >= 1 or None (full), got {horizon}"
    length = len(annotation.completion_ids)
    sampled = [r for r in annotation.rows if not r.replacement]
    replaced = [r for r in annotation.rows if r.replacement]
    if (horizon == 1 or length == 1) and annotation.sequence_reward is None:
        return list(annotation.rows)  # the common case: token-level feedback, rows as given
    reward = [0.0] * length  # r_t
    judged = set()
    for r in sampled:
        reward[r.position] += r.weight
        judged.add(r.position)
    if annotation.sequence_reward is not None:
        reward[-1] += annotation.sequence_reward
        judged.add(length - 1)
    h = length if horizon is None else min(horizon, length)
    # G_t = sum_{k<h} gamma^k r_{t+k}: each nonzero reward r_s reaches back to t in (s - h, s].
    # Summed from the sparse rewards, so positions nothing reaches stay exactly 0.
    returns = [0.0] * length
    for s in sorted(judged):
        if reward[s] == 0.0:
            continue
        for t in range(max(0, s - h + 1), s + 1):
            returns[t] += gamma ** (s - t) * reward[s]
    rows = [
        Row(t, int(annotation.completion_ids[t]), returns[t])
        for t in range(length)
        if t in judged or returns[t] != 0.0
    ]
    rows += replaced
    return sorted(rows, key=lambda r: (r.position, r.replacement, r.token_id))


def subtract_baseline(batch: list[list[Row]]) -> list[list[Row]]:
    """The optional baseline of the pg variants (DESIGN.md, "Horizon"): the mean sampled-row weight
    G over the batch is subtracted from every sampled row, so that a batch of only good (or only
    bad) sequences still pushes its better ones up relative to its worse ones. Replacement rows
    are targets named by a person, not returns: they keep their weight."""
    sampled = [r.weight for rows in batch for r in rows if not r.replacement]
    if not sampled:
        return batch
    mean = sum(sampled) / len(sampled)
    return [[r if r.replacement else Row(r.position, r.token_id, r.weight - mean) for r in rows] for rows in batch]


def stale_factor(model_version: int, current_version: int, limit: int, policy: str, decay: float) -> float | None:
    """Weight multiplier for an annotation made by `model_version` when training `current_version`:
    1 when fresh (age <= limit, or limit -1), decay ** (age - limit) when down-weighting, and
    None when stale annotations are skipped."""
    age = current_version - model_version
    if limit < 0 or age <= limit:
        return 1.0
    if policy == "skip":
        return None
    return decay ** (age - limit)


def scaled(rows: list[Row], factor: float) -> list[Row]:
    if factor == 1.0:
        return rows
    return [Row(r.position, r.token_id, r.weight * factor, r.replacement) for r in rows]


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
