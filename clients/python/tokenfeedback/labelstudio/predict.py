"""Pre-annotations: mark as Bad the completion tokens the policy itself finds least likely.

The annotator starts from the most suspicious tokens instead of reading every token with equal
attention. Each region covers one token's visible characters (its leading and trailing whitespace
left out, so " Canada" is marked as "Canada"; the span rules (docs/design.md, "Spans") map it back
to the same token) and carries the token's probability under the policy as its score. Pure functions over
scored tokens (policy ScoredToken or TokenEvent: position, token_id, text, char_start, char_end,
logprob), so they are tested without a server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenfeedback.labelstudio.config import NAMES, LabelNames


class ScoredPiece(Protocol):
    """What a policy ScoredToken and a TokenEvent both carry."""

    position: int
    token_id: int
    text: str
    char_start: int
    char_end: int
    logprob: float


@dataclass(frozen=True)
class MarkOptions:
    """Which tokens /predict pre-marks as Bad."""

    threshold: float = 0.1  # mark tokens whose probability under the policy is below this, in (0, 1]
    max_marks: int = 3  # at most this many regions per task, least likely first; 0 marks none

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold: must be in (0, 1], got {self.threshold}")
        if self.max_marks < 0:
            raise ValueError(f"max_marks: must be >= 0, got {self.max_marks}")


def visible_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    """[start, end) of `text` without its leading and trailing whitespace; None when nothing
    visible is left (a token that is only a space or a newline cannot be shown as a region)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def suspicious_tokens(tokens: Sequence[ScoredPiece], text: str, options: MarkOptions) -> list[ScoredPiece]:
    """The tokens to pre-mark: probability below the threshold, something visible to mark, and
    offsets that agree with `text` (the task's completion, which the regions index); the
    `max_marks` least likely of them, returned in text order."""
    threshold_logprob = math.log(options.threshold)
    candidates = [
        token
        for token in tokens
        if token.logprob < threshold_logprob
        and 0 <= token.char_start < token.char_end <= len(text)
        and text[token.char_start:token.char_end] == token.text  # offsets index this very text
        and visible_span(text, token.char_start, token.char_end) is not None
    ]
    candidates.sort(key=lambda token: (token.logprob, token.position))
    return sorted(candidates[: options.max_marks], key=lambda token: token.position)


def bad_region(text: str, token: ScoredPiece, names: LabelNames = NAMES) -> dict:
    """One Label Studio `labels` result marking `token` Bad, scored with its probability."""
    start, end = visible_span(text, token.char_start, token.char_end)
    probability = math.exp(token.logprob)
    return {
        "id": f"tf-{token.position}",
        "from_name": names.labels,
        "to_name": names.completion,
        "type": "labels",
        "origin": "prediction",
        "value": {"start": start, "end": end, "text": text[start:end], "labels": [names.bad]},
        "score": probability,
    }


def prediction(
    text: str,
    tokens: Sequence[ScoredPiece],
    model_version: str,
    options: MarkOptions,
    names: LabelNames = NAMES,
) -> dict:
    """The /predict item for one task: the pre-marked regions, and as the task's score the
    probability of its least likely token (Label Studio sorts tasks by it, so the most suspicious
    completions come first)."""
    marked = suspicious_tokens(tokens, text, options)
    lowest = min((token.logprob for token in tokens), default=0.0)
    return {
        "result": [bad_region(text, token, names) for token in marked],
        "score": math.exp(lowest),
        "model_version": model_version,
    }
