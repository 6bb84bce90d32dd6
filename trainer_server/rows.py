"""Training rows: what a validated annotation turns into, and the one place where stored
annotations become a training batch, next to the controller of the loss's KL coefficient.

An annotation row is (position t, target token y, weight w) (docs/design.md, "The loss"). The store
keeps each annotation's *base rows*: one sampled-token row per judged position, whose weight is
the token reward r_t the person gave (token labels and spans merged), plus the replacement rows.
At training time `BatchRules.batch` turns base rows into the rows the kernel sees, in this order:

1. `horizon_rows`: token rewards and the sequence reward become the sampled rows' weights
   G_t = sum_{k<h} gamma^k r_{t+k} (docs/design.md, "Horizon"); replacement rows stay as they are.
2. `stale_factor`: an annotation judged by weights more than K versions old is down-weighted
   (docs/design.md, "Versions and staleness").
3. `subtract_baseline` (pg_clip with --baseline): the batch-mean return is subtracted.

An annotation that cannot be trained on (`untrainable`: ids outside the vocabulary, weights or
behavior logprobs outside the bounds below, e.g. stored before those bounds existed) is set
aside with its reason, to be quarantined, and the batch goes on without it.

`KLController` moves beta between steps when a KL target is set (docs/design.md, "The loss").

Rows after a replacement token are trained on the sampled sequence: the context c_t of every
position is prompt + the *sampled* completion tokens before t, even when an earlier token was
marked bad and given a replacement. The person judged the later tokens in the context they saw
(the sampled one); had the replacement been sampled, the continuation would have been different
and is unknown, so the trainer never invents a context nobody judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Bounds of the values training computes with in float32 (docs/design.md, "Errors and limits"),
# checked at submit (validate.py) and again when a batch is made: a weight summed over a whole
# sequence by the horizon, times a log-probability, times pg_clip's ratio exp(log p - mu), stays far
# inside float32's range (3.4e38), so no annotation within them can make a training step non-finite.
MAX_ABS_WEIGHT = 1e4  # |weight| of token and span labels, replacement_weight, |sequence_reward|
MIN_BEHAVIOR_LOGPROB = -50.0  # behavior_logprobs in [this, 0]; a sampled token below e^-50 does not happen


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
    """The sampled rows' weights after credit assignment (docs/design.md, "Horizon").

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
    """The optional baseline of the pg variants (docs/design.md, "Horizon"): the mean sampled-row weight
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


@dataclass(frozen=True)
class Example:
    """One sequence of a batch, its rows after the horizon, staleness and baseline steps."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    rows: tuple[Row, ...]
    behavior_logprobs: tuple[float, ...] | None = None


def untrainable(a: Annotation, rows: list[Row], vocab_size: int | None = None,
                max_seq_len: int | None = None) -> str | None:
    """Why an annotation with these rows (after the horizon and staleness steps) cannot be
    trained on, or None. Everything submitted within the bounds passes; what fails could only
    have been stored by an older version or by hand."""
    length = len(a.prompt_ids) + len(a.completion_ids)
    if not a.prompt_ids or not a.completion_ids:
        return f"prompt ({len(a.prompt_ids)}) and completion ({len(a.completion_ids)}) need a token each"
    if max_seq_len is not None and length > max_seq_len:
        return f"{length} tokens, more than the trainer's max sequence length {max_seq_len}"
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in (*a.prompt_ids, *a.completion_ids)):
        return f"a token id outside the vocabulary [0, {vocab_size})"
    # a horizon sums at most every token's reward and the sequence reward
    limit = MAX_ABS_WEIGHT * (len(a.completion_ids) + 1)
    for r in rows:
        if not 0 <= r.position < len(a.completion_ids):
            return f"row position {r.position} outside the completion's {len(a.completion_ids)} tokens"
        if vocab_size is not None and not 0 <= r.token_id < vocab_size:
            return f"row token id {r.token_id} outside the vocabulary [0, {vocab_size})"
        if not (math.isfinite(r.weight) and abs(r.weight) <= limit):
            return f"row weight {r.weight!r} at position {r.position} not finite or beyond {limit:g}"
    if a.behavior_logprobs is not None:
        if len(a.behavior_logprobs) != len(a.completion_ids):
            return f"{len(a.behavior_logprobs)} behavior logprobs for {len(a.completion_ids)} completion tokens"
        for t, mu in enumerate(a.behavior_logprobs):
            if not (math.isfinite(mu) and MIN_BEHAVIOR_LOGPROB <= mu <= 0):
                return f"behavior logprob {mu!r} at position {t} outside [{MIN_BEHAVIOR_LOGPROB:g}, 0]"
    return None


@dataclass(frozen=True)
class Batch:
    examples: list[Example]
    untrainable: list[tuple[int, str]]  # (index into the annotations given, why), to be quarantined


@dataclass(frozen=True)
class BatchRules:
    """How stored annotations become a batch: the horizon and discount of a Train call, the
    staleness rule of the configuration, whether the pg baseline applies, and the model's limits."""

    horizon: int | None = 1  # None: the whole sequence
    gamma: float = 1.0
    staleness_limit: int = -1  # K; -1 disables
    stale_policy: str = "downweight"  # downweight | skip
    stale_decay: float = 0.5
    baseline: bool = False  # subtract the batch-mean return (only pg_clip asks for it)
    vocab_size: int | None = None  # token ids must be below it; None: not checked
    max_seq_len: int | None = None  # prompt + completion tokens; None: not checked

    def factor(self, annotation: Annotation, current_version: int) -> float | None:
        """The staleness multiplier of an annotation when training `current_version`; None: skip it."""
        return stale_factor(annotation.model_version, current_version, self.staleness_limit, self.stale_policy,
                            self.stale_decay)

    def batch(self, chosen: list[tuple[Annotation, float]]) -> Batch:
        """The examples of a batch from (annotation, staleness factor) pairs. Annotations left
        without rows (a horizon that sums to nothing) are dropped; untrainable ones are set aside."""
        examples, rejected = [], []
        for index, (a, factor) in enumerate(chosen):
            rows = scaled(horizon_rows(a, self.horizon, self.gamma), factor)
            problem = untrainable(a, rows, self.vocab_size, self.max_seq_len)
            if problem is not None:
                rejected.append((index, problem))
            elif rows:
                examples.append(Example(a.prompt_ids, a.completion_ids, tuple(rows), a.behavior_logprobs))
        if self.baseline and examples:
            rows = subtract_baseline([list(e.rows) for e in examples])
            examples = [Example(e.prompt_ids, e.completion_ids, tuple(r), e.behavior_logprobs)
                        for e, r in zip(examples, rows, strict=True)]
        return Batch(examples, rejected)


class KLController:
    """The KL coefficient beta of the loss across steps: fixed, or with a target KL per position
    the proportional controller of Ziegler et al. (2019), beta *= 1 + K_beta * clip(err, +-0.2)
    with err = (KL - target) / target (docs/design.md, "The loss")."""

    def __init__(self, beta: float, target: float | None = None, rate: float = 0.1):
        self.beta = beta
        self.target = target
        self.rate = rate

    def update(self, kl: float) -> float:
        """After a step that measured mean KL `kl`: the beta of the next step."""
        if self.target is not None:
            error = max(-0.2, min(0.2, (kl - self.target) / self.target))
            self.beta *= 1 + self.rate * error
        return self.beta
