"""The simulated annotator: what a person would say about a completion of a demo-model question.

It reads each completion for every fact it states (demo_model.judge `judge_facts`: one fact for a
single-fact question, up to three for a multi-fact one) and answers in one of four forms, so that
every kind of feedback sees exactly the same sequences:

- "token" (what tokenfeedback is for): each wrong fact is a bad span, with the right value as its
  replacement text (the trainer aligns the span to its first token and tokenizes the replacement
  in context, docs/design.md, "Spans"); a share of the right facts are marked good;
- "sequence": one reward for the whole completion, -1 when any fact is wrong and +1 when all are
  right; the trainer spreads it over the tokens with its horizon (docs/design.md, "Horizon";
  h = full is sequence-level REINFORCE);
- "graded": one reward, linear in the share of right facts: +1 all right, -1 all wrong;
- "rft" (rejection-sampling fine-tuning): +1 for a completion whose facts are all right, nothing
  for the others (trained with the likelihood loss, this is fine-tuning on the accepted samples).

People err, so the annotator can too, each at a set rate and independently per fact:
- miss: a wrong fact is taken for right (left unmarked; counts as right for a sequence reward);
- false mark: a right fact is taken for wrong (marked bad, with some other value as its
  "replacement"; counts as wrong for a sequence reward);
- wrong replacement: a wrong fact is marked, but with another wrong value as its replacement.

Completions that state no fact get no label in any form (a person would skip them); they still
count as looked at (`annotated` counts the budget the same way for every form).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from demo_model.judge import Fact, Truth

FORMS = ("token", "sequence", "graded", "rft")


@dataclass(frozen=True)
class AnnotatorConfig:
    form: str = "token"  # token | sequence | graded | rft (see the module doc)
    good_share: float = 0.25  # token form: share of right facts also marked good (+1)
    replacements: bool = True  # token form: give a value as the replacement of a bad span
    miss_rate: float = 0.0  # share of wrong facts the annotator takes for right
    false_mark_rate: float = 0.0  # share of right facts the annotator takes for wrong
    wrong_replacement_rate: float = 0.0  # share of marked wrong facts given a wrong replacement
    seed: int = 0  # which facts get a good mark, and which the annotator gets wrong


@dataclass
class Judgement:
    """One completion as the annotator saw it; `labels` are keyword arguments of Completion.annotate."""

    facts: list[Fact]  # what the completion states, judged against the truth
    perceived_wrong: list[bool]  # per fact: what the annotator believes (errors included)
    labels: dict | None  # None: nothing to say about this completion

    @property
    def outcome(self) -> str:
        """The truth about the completion: "none" (no fact), "wrong" (any fact wrong), "right"."""
        if not self.facts:
            return "none"
        return "wrong" if any(f.is_wrong for f in self.facts) else "right"


class SimulatedAnnotator:
    def __init__(self, truth: Truth, config: AnnotatorConfig):
        assert config.form in FORMS, f"annotator form must be one of {FORMS}, got {config.form!r}"
        for name in ("good_share", "miss_rate", "false_mark_rate", "wrong_replacement_rate"):
            value = getattr(config, name)
            assert 0 <= value <= 1, f"{name} must be in [0, 1], got {value}"
        self.truth = truth
        self.config = config
        self._rng = random.Random(config.seed)

    def judge(self, prompt: str, completion: str) -> Judgement:
        facts = self.truth.judge_facts(prompt, completion)
        if not facts:
            return Judgement(facts, [], None)
        cfg, rng = self.config, self._rng
        # One draw per fact for the annotator's mistake, whatever the form, so that every form
        # errs on the same facts of the same sequences.
        perceived = [(rng.random() >= cfg.miss_rate) if f.is_wrong else (rng.random() < cfg.false_mark_rate)
                     for f in facts]
        good_marks = [rng.random() < cfg.good_share for _ in facts]
        bad_replacement = [rng.random() < cfg.wrong_replacement_rate for _ in facts]
        right = sum(not w for w in perceived)
        if cfg.form == "sequence":
            return Judgement(facts, perceived, {"sequence_reward": -1.0 if any(perceived) else 1.0})
        if cfg.form == "graded":
            return Judgement(facts, perceived, {"sequence_reward": 2.0 * right / len(facts) - 1.0})
        if cfg.form == "rft":
            return Judgement(facts, perceived, None if any(perceived) else {"sequence_reward": 1.0})
        spans = []
        for fact, wrong, good, swap in zip(facts, perceived, good_marks, bad_replacement, strict=True):
            start, end = fact.span
            if wrong:
                span = {"start": start, "end": end, "weight": -1.0, "text": completion[start:end]}
                if cfg.replacements:
                    value = self._replacement(fact, wrong_one=swap or not fact.is_wrong)
                    if value is not None:
                        span["replacement_text"] = value
                spans.append(span)
            elif good:
                spans.append({"start": start, "end": end, "weight": 1.0})
        # A completion with nothing marked still counts as looked at, with no row to train on.
        return Judgement(facts, perceived, {"span_labels": spans} if spans else None)

    def _replacement(self, fact: Fact, wrong_one: bool) -> str | None:
        """The right value, or (an annotator's mistake) a value that is neither right nor the one
        the completion already names."""
        if not wrong_one:
            return fact.expected
        choices = [v for v in self.truth.values(fact.kind) if v not in (fact.expected, fact.canonical)]
        return self._rng.choice(choices) if choices else None
