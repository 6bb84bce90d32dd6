"""Evaluation prompts and held-out sentences for the demo model (written to heldout.json).

What is held out, and what is not:
- `eval_prompts`: prefixes of phrasings the model WAS trained on, cut just before the answer
  ("The capital of Kenya is", "Lima, the capital of"). They are not held-out text; they ask the
  questions the corpus taught, so that sampling them at temperature 1 measures the factual error
  rate the corpus put into the model. They cover every country (one capital-asking prompt each),
  every capital-asking phrasing for the countries with wrong facts (where the errors are), and a
  capital-to-country prompt for every third country plus every capital that the corpus also uses
  as a wrong capital ("Harare, the capital of" -> sometimes " Zambia").
- `generalization_prompts`: the same kind of prefixes from the (country, phrasing) combinations
  that never occur in training (one per country, see corpus.py). They show whether feedback given
  on one phrasing carries over to another.
- `heldout_sentences`: the correct sentence of each held-out (country, phrasing) combination
  ("Nairobi is the capital city of Kenya." when that combination was held out). None occurs in the
  training corpus verbatim; their perplexity measures how well the model keeps correct facts in
  familiar words, and rises when feedback training degenerates the model.

Multi-fact prompts (`slice` "multi") are the heads of multi-fact sentences ("Facts about Kenya:"):
both trained heads of every country with a wrong fact of any kind, one head of every third other
country; their held-out head is a generalization prompt for every country with a wrong fact, and
its correct three-fact sentence a held-out sentence for every country. The single-fact prompts
above are the other slice (`slice` "single").

Each prompt carries `corpus_error_rate`: the share of the training sentences continuing this
exact prefix that give a wrong answer, i.e. what a perfectly fitted model gets wrong at
temperature 1 (0 for prompts about countries without wrong facts; 0 for held-out combinations,
except where another country's wrong facts use the same capital: "Tallinn, the capital of Latvia"
trains the prefix that Estonia's held-out "Tallinn, the capital of" asks, with only wrong answers).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from demo_model.corpus import (
    COUNTRIES,
    MULTI_HEAD_BY_NAME,
    MULTI_HEADS,
    TEMPLATE_BY_NAME,
    TEMPLATES,
    Corpus,
    render_multi,
)

HELDOUT_FILE = "heldout.json"


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str  # text the model completes; the answer follows after a space
    country: str  # the country the question is about
    asks: str  # "capital" or "country": what the completion should name
    answer: str  # the right answer (canonical spelling)
    template: str  # corpus template name the prefix comes from
    wrong_fact: bool  # the corpus has wrong sentences continuing this prefix
    corpus_error_rate: float  # share of training continuations of this prefix that are wrong (multi: of facts)
    slice: str = "single"  # "single" (one fact) or "multi" (a multi-fact head, asks "facts")


@dataclass(frozen=True)
class Heldout:
    eval_prompts: list[EvalPrompt]
    generalization_prompts: list[EvalPrompt]
    heldout_sentences: list[str]

    def of_slice(self, name: str) -> list[EvalPrompt]:
        """The eval prompts of one slice ("single" or "multi")."""
        return [p for p in self.eval_prompts if p.slice == name]

    @property
    def wrong_fact_prompts(self) -> list[EvalPrompt]:
        """The eval prompts where the corpus itself is sometimes wrong (where feedback must act)."""
        return [p for p in self.eval_prompts if p.wrong_fact]


def build_heldout(corpus: Corpus) -> dict:
    """The heldout.json content for `corpus` (deterministic: no randomness beyond the corpus's)."""
    truth = corpus.truth
    # What the corpus says after each prefix: prompt -> Counter(answer), answers as stated.
    continuations: dict[str, Counter] = {}
    for s in corpus.sentences:
        if s.stated is None:
            continue
        t = TEMPLATE_BY_NAME[s.template]
        answer = s.stated if t.asks == "capital" else s.country
        continuations.setdefault(t.prompt(s.country, s.stated), Counter())[answer] += 1

    def make(country: str, template: str) -> EvalPrompt:
        t = TEMPLATE_BY_NAME[template]
        capital = truth["countries"][country]["capital"]
        right = capital if t.asks == "capital" else country
        prompt = t.prompt(country, capital)
        seen = continuations.get(prompt, Counter())
        total = sum(seen.values())
        rate = (total - seen[right]) / total if total else 0.0
        return EvalPrompt(prompt, country, t.asks, right, template, rate > 0, round(rate, 6))

    capital_templates = [t.name for t in TEMPLATES if t.asks == "capital"]
    country_templates = [t.name for t in TEMPLATES if t.asks == "country"]
    wrong_subset = set(truth["wrong_countries"])
    wrong_cities = {truth["countries"][c]["corpus_wrong_capital"] for c in wrong_subset}
    eval_prompts, general = [], []
    for i, (country, capital, _, _) in enumerate(COUNTRIES):
        held = corpus.heldout_combos[country]
        trained_cap = [t for t in capital_templates if t != held]
        trained_cty = [t for t in country_templates if t != held]
        if country in wrong_subset:
            chosen = trained_cap
        else:
            chosen = [trained_cap[i % len(trained_cap)]]
        if i % 3 == 0 or capital in wrong_cities:
            chosen = chosen + [trained_cty[i % len(trained_cty)]]
        eval_prompts += [make(country, t) for t in chosen]
        general.append(make(country, held))
    multi_eval, multi_general, multi_sentences = _multi_prompts(corpus)
    eval_prompts += multi_eval
    general += multi_general
    heldout_sentences = [
        TEMPLATE_BY_NAME[corpus.heldout_combos[c]].render(c, cap) for c, cap, _, _ in COUNTRIES
    ] + multi_sentences
    train_texts = set(corpus.texts)
    assert not train_texts & set(heldout_sentences), "a held-out sentence occurs in the training corpus"
    return {
        "format": "tokenfeedback-demo-heldout/1",
        "about": "see demo_model/prompts.py: eval_prompts ask trained phrasings; generalization_prompts "
                 "and heldout_sentences use (country, phrasing) combinations absent from training",
        "eval_prompts": [asdict(p) for p in eval_prompts],
        "generalization_prompts": [asdict(p) for p in general],
        "heldout_sentences": heldout_sentences,
    }


def _multi_prompts(corpus: Corpus) -> tuple[list[EvalPrompt], list[EvalPrompt], list[str]]:
    """The multi-fact slice: eval prompts, generalization prompts and held-out sentences."""
    truth = corpus.truth
    facts_after: dict[str, list[bool]] = {}  # head prompt -> wrongness of every fact continuing it
    for s in corpus.sentences:
        if s.facts:
            head = MULTI_HEAD_BY_NAME[s.template.split(":", 1)[1]].format(country=s.country)
            facts_after.setdefault(head, []).extend(w for _, _, w in s.facts)

    def make(country: str, head: str) -> EvalPrompt:
        info = truth["countries"][country]
        prompt = MULTI_HEAD_BY_NAME[head].format(country=country)
        seen = facts_after.get(prompt, [])
        rate = sum(seen) / len(seen) if seen else 0.0
        answer = f"{info['capital']}; {info['region']}; {info['currency']}"
        return EvalPrompt(prompt, country, "facts", answer, f"multi:{head}", rate > 0, round(rate, 6), "multi")

    heads = [name for name, _ in MULTI_HEADS]
    evals, general, sentences = [], [], []
    for i, (country, capital, region, _) in enumerate(COUNTRIES):
        info = truth["countries"][country]
        if not info["multi_fact"]:
            continue
        wrong_any = any(info[k] is not None for k in ("corpus_wrong_capital", "corpus_wrong_region",
                                                      "corpus_wrong_currency"))
        held = corpus.heldout_heads[country]
        trained = [h for h in heads if h != held]
        if wrong_any:
            evals += [make(country, h) for h in trained]
            general.append(make(country, held))
        elif i % 3 == 0:
            evals.append(make(country, trained[i % len(trained)]))
        sentences.append(render_multi(held, country, [("capital", 0, capital), ("region", 0, region),
                                                      ("currency", 0, info["currency"])]))
    return evals, general, sentences


def heldout(model_dir: str | Path) -> Heldout:
    """Read heldout.json from a built demo model folder."""
    path = Path(model_dir) / HELDOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {model_dir} a demo model folder (python -m demo_model)?")
    d = json.loads(path.read_text(encoding="utf-8"))
    return Heldout(
        eval_prompts=[EvalPrompt(**p) for p in d["eval_prompts"]],
        generalization_prompts=[EvalPrompt(**p) for p in d["generalization_prompts"]],
        heldout_sentences=list(d["heldout_sentences"]),
    )
