"""Judge a (prompt, completion) pair against the ground truth the corpus generator wrote.

The judge is generic: it knows countries, capitals and the other cities of truth.json, not the
corpus templates. It reads the prompt for the last country or city it names, which decides the
question: after a country ("The capital of Kenya is", "Kenya's capital is") the completion should
name its capital; after a city ("Lima, the capital of") it should name the city's country. It then
reads the completion's first sentence (up to the first ".", "!", "?" or newline) for the first
name of the asked kind, and says whether it is the right one, a wrong one, or none.

For a wrong answer the verdict carries the character span of the wrong name in the completion
(Unicode code points, half-open, docs/design.md, "Spans") and the right answer's text, so an
annotator can mark the span bad and offer the right name as its replacement (`corrected` gives
the completion with the replacement applied, which the policy server tokenizes in context).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

TRUTH_FILE = "truth.json"
# The first sentence of a completion is what the judge reads: "Nairobi. Lima is ..." answers with
# Nairobi only.
_SENTENCE_END = re.compile(r"[.!?\n]")


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "right", "wrong", "none" (no answer of the asked kind), "unknown" (prompt asks nothing known)
    asks: str | None  # "capital" or "country"; None when the prompt names no known place
    subject: str | None  # the place the prompt names (canonical): a country, or a city
    expected: str | None  # the right answer (canonical); None when there is none (prompt names a non-capital city)
    named: str | None  # the answer the completion names, as written there
    named_canonical: str | None  # the same, canonical spelling
    span: tuple[int, int] | None  # [start, end) of `named` in the completion, code points

    @property
    def country(self) -> str | None:
        """The country the question is about (None when the prompt names a city that is no capital)."""
        return self.subject if self.asks == "capital" else self.expected

    @property
    def is_wrong(self) -> bool:
        return self.outcome == "wrong"

    @property
    def is_right(self) -> bool:
        return self.outcome == "right"


@dataclass(frozen=True)
class Fact:
    """One fact a completion states: which kind, what it names, where, and whether it is right."""

    kind: str  # "capital", "country" (single-fact questions naming a capital), "region", "currency"
    named: str  # as written in the completion
    canonical: str  # canonical spelling
    expected: str | None  # the right value (None: the question has no right answer of this kind)
    span: tuple[int, int]  # [start, end) in the completion, code points

    @property
    def is_wrong(self) -> bool:
        return self.canonical != self.expected


class Truth:
    """truth.json with the indexes the judge needs."""

    def __init__(self, data: dict):
        assert data.get("format") == "tokenfeedback-demo-truth/1", f"unknown truth format {data.get('format')!r}"
        self.data = data
        self.countries: dict[str, dict] = data["countries"]
        self.cities: dict[str, dict] = data["cities"]
        self.wrong_countries: list[str] = list(data["wrong_countries"])
        # written name -> (kind, canonical)
        self.names: dict[str, tuple[str, str]] = {}
        for country in self.countries:
            self.names[country] = ("country", country)
        for city, info in self.cities.items():
            for name in [city, *info.get("aliases", [])]:
                self.names.setdefault(name, ("city", city))
        self.capital_of = {c: info["capital"] for c, info in self.countries.items()}
        self.country_of_capital = {info["capital"]: c for c, info in self.countries.items()}
        self._any = _name_regex(self.names)
        self._countries = _name_regex([n for n, (k, _) in self.names.items() if k == "country"])
        self._cities = _name_regex([n for n, (k, _) in self.names.items() if k == "city"])
        # Multi-fact questions (truth files written before them have none of these keys).
        self.regions: list[str] = list(data.get("regions", []))
        self.currencies: dict[str, str] = dict(data.get("currencies", {}))  # name -> country
        self._regions = _name_regex(self.regions) if self.regions else None
        self._currencies = _name_regex(self.currencies) if self.currencies else None

    def is_multi(self, prompt: str) -> bool:
        """A multi-fact question: the prompt names a country last and ends with a colon."""
        mentions = list(self._any.finditer(prompt))
        return (bool(mentions) and self.names[mentions[-1].group(0)][0] == "country"
                and prompt.rstrip().endswith(":") and self._regions is not None)

    def judge_facts(self, prompt: str, completion: str) -> list[Fact]:
        """Every fact the completion's first sentence states (see the module doc), in order."""
        if not self.is_multi(prompt):
            v = self.judge(prompt, completion)
            if v.outcome not in ("right", "wrong") or v.span is None:
                return []
            return [Fact(v.asks, v.named, v.named_canonical, v.expected, v.span)]
        country = self.names[list(self._any.finditer(prompt))[-1].group(0)][1]
        info = self.countries[country]
        end = _SENTENCE_END.search(completion)
        first_sentence = completion[: end.start() if end else len(completion)]
        facts = []
        for kind, pattern, expected, canon in (
            ("capital", self._cities, info["capital"], lambda n: self.names[n][1]),
            ("region", self._regions, info["region"], lambda n: n),
            ("currency", self._currencies, info.get("currency"), lambda n: n),
        ):
            m = pattern.search(first_sentence)
            if m is not None:
                facts.append(Fact(kind, m.group(0), canon(m.group(0)), expected, (m.start(), m.end())))
        return sorted(facts, key=lambda f: f.span)

    def values(self, kind: str) -> list[str]:
        """Every canonical value a fact of `kind` can name (for annotators that err)."""
        if kind == "capital":
            return sorted(info["capital"] for info in self.countries.values())
        if kind == "country":
            return sorted(self.countries)
        if kind == "region":
            return list(self.regions)
        if kind == "currency":
            return sorted(self.currencies)
        raise ValueError(f"unknown fact kind {kind!r}")

    def judge(self, prompt: str, completion: str) -> Verdict:
        """Which question the prompt asks, and what the completion answers. See the module doc."""
        mentions = list(self._any.finditer(prompt))
        if not mentions:
            return Verdict("unknown", None, None, None, None, None, None)
        kind, subject = self.names[mentions[-1].group(0)]
        if kind == "country":
            asks, expected, pattern = "capital", self.capital_of[subject], self._cities
        else:
            asks, expected, pattern = "country", self.country_of_capital.get(subject), self._countries
        end = _SENTENCE_END.search(completion)
        first_sentence = completion[: end.start() if end else len(completion)]
        m = pattern.search(first_sentence)
        if m is None:
            return Verdict("none", asks, subject, expected, None, None, None)
        named = m.group(0)
        canonical = self.names[named][1]
        outcome = "right" if canonical == expected else "wrong"
        return Verdict(outcome, asks, subject, expected, named, canonical, (m.start(), m.end()))


def _name_regex(names) -> re.Pattern:
    """Whole-word match of any of `names`, longest first ("Ho Chi Minh City" before shorter names)."""
    alts = sorted(names, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in alts) + r")(?!\w)")


def load_truth(model_dir: str | Path) -> Truth:
    """truth.json from a built demo model folder (or the path of the file itself)."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / TRUTH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {model_dir} a demo model folder (python -m demo_model)?")
    return Truth(json.loads(path.read_text(encoding="utf-8")))


def judge(truth: Truth, prompt: str, completion: str) -> Verdict:
    """Same as `truth.judge(prompt, completion)`."""
    return truth.judge(prompt, completion)


def corrected(completion: str, verdict: Verdict) -> str:
    """The completion with its wrong answer replaced by the right one (what an annotator would
    write as the replacement for the wrong span). Only for a wrong verdict with a known answer."""
    if not verdict.is_wrong or verdict.expected is None or verdict.span is None:
        raise ValueError(f"corrected: needs a wrong verdict with a right answer, got {verdict}")
    start, end = verdict.span
    return completion[:start] + verdict.expected + completion[end:]
