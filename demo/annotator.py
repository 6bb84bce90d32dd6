"""The simulated annotator: what a careful person would say about a capital-facts completion.

It reads each completion the way the ground truth says a person would (demo_model.judge), and
answers in one of two forms, so that the two kinds of feedback see exactly the same sequences:

- token level (what tokenfeedback is for): a wrong capital is a bad span, with the right capital
  as its replacement text (the trainer aligns the span to its first token and tokenizes the
  replacement in context, DESIGN.md "Spans"); a share of the right answers are marked good.
- sequence level (the baseline): the whole completion gets a reward, -1 when it names a wrong
  answer and +1 when it names the right one; the trainer spreads it over the tokens with its
  horizon (DESIGN.md "Horizon"; h = full is sequence-level REINFORCE).

Completions that answer nothing of the asked kind get no label in either form (a person would
skip them), so both forms label the same sequences, and `annotated` counts them the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from demo_model.judge import Truth, Verdict

FORMS = ("token", "sequence")


@dataclass(frozen=True)
class AnnotatorConfig:
    form: str = "token"  # "token": spans with replacements; "sequence": one reward per completion
    good_share: float = 0.25  # token form: share of right answers also marked good (+1)
    replacements: bool = True  # token form: give the right capital as the replacement of a bad span
    seed: int = 0  # which right answers get a good mark


@dataclass
class Judgement:
    """One completion as the annotator saw it; `labels` are keyword arguments of Completion.annotate."""

    verdict: Verdict
    labels: dict | None  # None: nothing to say about this completion


class SimulatedAnnotator:
    def __init__(self, truth: Truth, config: AnnotatorConfig):
        assert config.form in FORMS, f"annotator form must be one of {FORMS}, got {config.form!r}"
        assert 0 <= config.good_share <= 1, f"good_share must be in [0, 1], got {config.good_share}"
        self.truth = truth
        self.config = config
        self._rng = random.Random(config.seed)

    def judge(self, prompt: str, completion: str) -> Judgement:
        verdict = self.truth.judge(prompt, completion)
        if verdict.outcome not in ("right", "wrong") or verdict.span is None:
            return Judgement(verdict, None)
        if self.config.form == "sequence":
            return Judgement(verdict, {"sequence_reward": 1.0 if verdict.is_right else -1.0})
        start, end = verdict.span
        if verdict.is_wrong:
            span = {"start": start, "end": end, "weight": -1.0, "text": completion[start:end]}
            if self.config.replacements and verdict.expected is not None:
                span["replacement_text"] = verdict.expected
            return Judgement(verdict, {"span_labels": [span]})
        if self._rng.random() < self.config.good_share:
            return Judgement(verdict, {"span_labels": [{"start": start, "end": end, "weight": 1.0}]})
        # A right answer left unmarked still counts as looked at, with no row to train on.
        return Judgement(verdict, None)
