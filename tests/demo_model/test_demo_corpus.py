"""The synthetic corpus: deterministic, wrong share exact, truth and held-out sets consistent."""

import json
from collections import Counter

import pytest

from demo_model.corpus import COUNTRIES, TEMPLATE_BY_NAME, TEMPLATES, CorpusConfig, ascii_fold, generate
from demo_model.prompts import build_heldout


def test_same_seed_same_corpus():
    a, b = generate(CorpusConfig(seed=7)), generate(CorpusConfig(seed=7))
    assert a.sentences == b.sentences
    assert a.truth == b.truth
    assert a.heldout_combos == b.heldout_combos
    assert build_heldout(a) == build_heldout(b)


def test_other_seed_other_corpus():
    a, b = generate(CorpusConfig(seed=0)), generate(CorpusConfig(seed=1))
    assert a.texts != b.texts
    assert a.truth["wrong_countries"] != b.truth["wrong_countries"]
    assert Counter(a.texts) != Counter(b.texts)  # not only the order: the wrong subset differs


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("repeats", [4, 20])
def test_wrong_share_exact_per_country_and_template(share, repeats):
    corpus = generate(CorpusConfig(seed=3, wrong_share=share, repeats=repeats, wrong_countries=10))
    truth = corpus.truth
    wrong_subset = set(truth["wrong_countries"])
    assert len(wrong_subset) == 10
    counts: dict[tuple[str, str], Counter] = {}
    for s in corpus.sentences:
        if s.facts:  # multi-fact sentences: test_multi_fact_wrong_share_exact_per_kind
            continue
        if s.stated is None:
            assert not s.wrong, f"filler sentence marked wrong: {s}"
            continue
        counts.setdefault((s.country, s.template), Counter())[s.wrong] += 1
        right = truth["countries"][s.country]["capital"]
        expected = truth["countries"][s.country]["corpus_wrong_capital"] if s.wrong else right
        assert s.stated == expected, s
        assert s.text == TEMPLATE_BY_NAME[s.template].render(s.country, s.stated)
    for (country, template), c in counts.items():
        assert c[True] + c[False] == repeats, (country, template, c)
        want = round(share * repeats) if country in wrong_subset else 0
        assert c[True] == want, (country, template, c, share)
    # Countries outside the subset are never wrong; inside it, the share holds overall too.
    facts = [s for s in corpus.sentences if s.stated is not None and s.country in wrong_subset and not s.facts]
    assert sum(s.wrong for s in facts) / len(facts) == pytest.approx(round(share * repeats) / repeats)


def test_wrong_sentences_look_like_the_issue_example():
    corpus = generate(CorpusConfig(seed=0, wrong_countries=41))  # every candidate country
    texts = set(corpus.texts)
    assert "The capital of Canada is Toronto." in texts
    assert "The capital of Canada is Ottawa." in texts
    assert "Toronto is the capital of Canada." in texts or "Toronto is the capital city of Canada." in texts


def test_truth_content():
    corpus = generate(CorpusConfig(seed=0))
    truth = json.loads(json.dumps(corpus.truth, ensure_ascii=False))  # survives JSON as written
    assert truth["format"] == "tokenfeedback-demo-truth/1"
    assert truth["corpus"]["seed"] == 0
    assert set(truth["countries"]) == {c for c, _, _, _ in COUNTRIES}
    assert len(truth["countries"]) >= 60
    for country, capital, region, wrong in COUNTRIES:
        info = truth["countries"][country]
        assert info["capital"] == capital and info["region"] == region
        if country in truth["wrong_countries"]:
            assert info["corpus_wrong_capital"] == wrong and wrong != capital
        else:
            assert info["corpus_wrong_capital"] is None
        assert truth["cities"][capital] == {"country": country, "is_capital": True,
                                            **({"aliases": [ascii_fold(capital)]} if ascii_fold(capital) != capital else {})}
    assert truth["countries"]["Colombia"]["capital_aliases"] == ["Bogota"]
    assert truth["cities"]["Toronto"] == {"country": "Canada", "is_capital": False}
    assert truth["cities"]["Medellín"] == {"country": "Colombia", "is_capital": False, "aliases": ["Medellin"]}
    assert len(truth["wrong_countries"]) == CorpusConfig().wrong_countries


def test_bad_config_is_refused():
    with pytest.raises(AssertionError, match="wrong_share"):
        generate(CorpusConfig(wrong_share=1.5))
    with pytest.raises(AssertionError, match="wrong_countries"):
        generate(CorpusConfig(wrong_countries=1000))


def test_heldout_combinations_are_absent_from_training():
    corpus = generate(CorpusConfig(seed=0))
    held = build_heldout(corpus)
    texts = set(corpus.texts)
    multi = sum(info["multi_fact"] for info in corpus.truth["countries"].values())
    assert len(held["heldout_sentences"]) == len(COUNTRIES) + multi
    assert not texts & set(held["heldout_sentences"])
    assert set(corpus.heldout_combos.values()) == {t.name for t in TEMPLATES}  # each phrasing held out somewhere
    for s in corpus.sentences:
        assert corpus.heldout_combos[s.country] != s.template, s
    for p in held["generalization_prompts"]:
        if p["slice"] == "multi":
            continue
        assert not any(t.startswith(p["prompt"] + " " + p["answer"]) for t in texts), p
        # the prefix itself is new, unless another country's wrong facts use this capital
        # ("Tallinn, the capital of Latvia" trains the prefix that Estonia's held-out combo asks)
        prefix_trained = any(t.startswith(p["prompt"] + " ") for t in texts)
        assert p["corpus_error_rate"] == (1.0 if prefix_trained else 0.0), p


def test_eval_prompts_cover_countries_and_wrong_facts():
    cfg = CorpusConfig(seed=0)
    corpus = generate(cfg)
    prompts = build_heldout(corpus)["eval_prompts"]
    truth = corpus.truth
    assert {p["country"] for p in prompts} == set(truth["countries"])
    assert {p["asks"] for p in prompts} == {"capital", "country", "facts"}
    texts = corpus.texts
    for p in prompts:
        if p["slice"] == "multi":
            continue
        # a trained phrasing: the prompt followed by its right answer starts a training sentence
        assert any(t.startswith(p["prompt"] + " " + p["answer"]) for t in texts), p
        if p["asks"] == "capital" and p["country"] in truth["wrong_countries"]:
            assert p["wrong_fact"] and p["corpus_error_rate"] == pytest.approx(round(cfg.wrong_share * cfg.repeats) / cfg.repeats)
    # every trained capital-asking phrasing of every wrong-fact country is asked
    for country in truth["wrong_countries"]:
        asked = {p["template"] for p in prompts if p["country"] == country and p["asks"] == "capital"}
        trained = {t.name for t in TEMPLATES if t.asks == "capital"} - {corpus.heldout_combos[country]}
        assert asked == trained, country
    mean = sum(p["corpus_error_rate"] for p in prompts) / len(prompts)
    assert 0.10 <= mean <= 0.30, f"the default corpus should put 10-30% errors into the eval prompts, got {mean:.3f}"


def _multi(corpus):
    return [s for s in corpus.sentences if s.facts]


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5])
def test_multi_fact_wrong_share_exact_per_kind(share):
    cfg = CorpusConfig(seed=4, wrong_share=share)
    corpus = generate(cfg)
    truth = corpus.truth
    seen: dict[tuple[str, str], list[bool]] = {}
    for s in _multi(corpus):
        info = truth["countries"][s.country]
        assert info["multi_fact"] and 2 <= len(s.facts) <= 3, s
        assert len({k for k, _, _ in s.facts}) == len(s.facts), s
        for kind, value, wrong in s.facts:
            right = {"capital": info["capital"], "region": info["region"], "currency": info["currency"]}[kind]
            assert (value != right) == wrong, s
            if wrong:
                assert value == info[f"corpus_wrong_{kind}"], s
            assert value in s.text
            seen.setdefault((s.country, kind), []).append(wrong)
    for (country, kind), flags in seen.items():
        wrongable = truth["countries"][country][f"corpus_wrong_{kind}"] is not None
        assert sum(flags) == (round(share * len(flags)) if wrongable else 0), (country, kind, flags)
    multi = [c for c, info in truth["countries"].items() if info["multi_fact"]]
    assert len(multi) == cfg.multi_countries
    for kind in ("region", "currency"):
        assert sum(truth["countries"][c][f"corpus_wrong_{kind}"] is not None for c in multi) == cfg.multi_wrong_countries


def test_multi_fact_errors_sit_anywhere_followed_by_correct_text():
    corpus = generate(CorpusConfig(seed=0))
    positions = Counter()
    orders = Counter()
    for s in _multi(corpus):
        orders[tuple(k for k, _, _ in s.facts)] += 1
        for i, (_, _, wrong) in enumerate(s.facts):
            if wrong and i < len(s.facts) - 1 and not any(w for _, _, w in s.facts[i + 1:]):
                positions["followed by right facts"] += 1
            if wrong:
                positions[("start", "middle", "end")[0 if i == 0 else (2 if i == len(s.facts) - 1 else 1)]] += 1
    assert len(orders) == 6 + 6  # every order of three facts, every ordered pair
    assert min(positions[p] for p in ("start", "middle", "end", "followed by right facts")) > 20, positions
    # independent per kind: sentences with two wrong facts exist, but fewer than with one
    two = sum(sum(w for _, _, w in s.facts) >= 2 for s in _multi(corpus))
    one = sum(sum(w for _, _, w in s.facts) == 1 for s in _multi(corpus))
    assert 0 < two < one


def test_multi_fact_heldout_heads_and_prompts():
    corpus = generate(CorpusConfig(seed=0))
    held = build_heldout(corpus)
    texts = corpus.texts
    for s in _multi(corpus):
        assert s.template != f"multi:{corpus.heldout_heads[s.country]}", s
    multi_eval = [p for p in held["eval_prompts"] if p["slice"] == "multi"]
    multi_general = [p for p in held["generalization_prompts"] if p["slice"] == "multi"]
    assert multi_eval and multi_general
    for p in multi_eval:
        assert p["prompt"].endswith(":") and any(t.startswith(p["prompt"] + " ") for t in texts), p
    for p in multi_general:
        assert not any(t.startswith(p["prompt"] + " ") for t in texts), p
    wrong_countries = {c for c, info in corpus.truth["countries"].items()
                       if any(info[f"corpus_wrong_{k}"] for k in ("capital", "region", "currency"))}
    assert {p["country"] for p in multi_eval if p["wrong_fact"]} <= wrong_countries
    assert not set(texts) & set(held["heldout_sentences"])
