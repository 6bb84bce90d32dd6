"""The judge on hand-written completions, against a hand-written truth and the corpus's truth."""

import json

import pytest

from demo_model.corpus import CorpusConfig, generate
from demo_model.judge import Truth, corrected, load_truth

TRUTH = {
    "format": "tokenfeedback-demo-truth/1",
    "corpus": {},
    "wrong_countries": ["Canada", "Colombia"],
    "countries": {
        "Canada": {"capital": "Ottawa", "capital_aliases": [], "region": "North America",
                   "corpus_wrong_capital": "Toronto"},
        "Colombia": {"capital": "Bogotá", "capital_aliases": ["Bogota"], "region": "South America",
                     "corpus_wrong_capital": "Medellín"},
        "Peru": {"capital": "Lima", "capital_aliases": [], "region": "South America", "corpus_wrong_capital": None},
        "Vietnam": {"capital": "Hanoi", "capital_aliases": [], "region": "Asia", "corpus_wrong_capital": None},
        "Niger": {"capital": "Niamey", "capital_aliases": [], "region": "Africa", "corpus_wrong_capital": None},
        "Nigeria": {"capital": "Abuja", "capital_aliases": [], "region": "Africa", "corpus_wrong_capital": None},
    },
    "cities": {
        "Ottawa": {"country": "Canada", "is_capital": True},
        "Bogotá": {"country": "Colombia", "is_capital": True, "aliases": ["Bogota"]},
        "Lima": {"country": "Peru", "is_capital": True},
        "Hanoi": {"country": "Vietnam", "is_capital": True},
        "Niamey": {"country": "Niger", "is_capital": True},
        "Abuja": {"country": "Nigeria", "is_capital": True},
        "Toronto": {"country": "Canada", "is_capital": False},
        "Medellín": {"country": "Colombia", "is_capital": False, "aliases": ["Medellin"]},
        "Ho Chi Minh City": {"country": "Vietnam", "is_capital": False},
    },
}


@pytest.fixture(scope="module")
def truth():
    return Truth(TRUTH)


@pytest.mark.parametrize(
    "prompt, completion, outcome, named, span, expected",
    [
        ("The capital of Canada is", " Ottawa.", "right", "Ottawa", (1, 7), "Ottawa"),
        ("The capital of Canada is", " Toronto.", "wrong", "Toronto", (1, 8), "Ottawa"),
        ("Canada's capital is", " Lima, which is odd.", "wrong", "Lima", (1, 5), "Ottawa"),
        ("The capital of Canada is", " a big city.", "none", None, None, "Ottawa"),
        ("The capital of Canada is", "", "none", None, None, "Ottawa"),
        # only the first sentence answers
        ("The capital of Canada is", " big. Toronto is too.", "none", None, None, "Ottawa"),
        ("The capital of Canada is", " Ottawa. Toronto is not.", "right", "Ottawa", (1, 7), "Ottawa"),
        # whole words only: "Limassol" is not "Lima", "Nigeria" is not "Niger"
        ("The capital of Peru is", " Limassol.", "none", None, None, "Lima"),
        ("Niamey is the capital of", " Nigeria.", "wrong", "Nigeria", (1, 8), "Niger"),
        ("Abuja is the capital of", " Nigeria.", "right", "Nigeria", (1, 8), "Nigeria"),
        # city -> country questions
        ("Lima, the capital of", " Peru, is a busy city.", "right", "Peru", (1, 5), "Peru"),
        ("Lima, the capital of", " Canada, is a busy city.", "wrong", "Canada", (1, 7), "Peru"),
        # the last place named in the prompt is the one asked about
        ("Lima is the capital of Peru. The capital of Vietnam is", " Ho Chi Minh City.", "wrong",
         "Ho Chi Minh City", (1, 17), "Hanoi"),
        # unicode: accents, ASCII aliases, characters outside the BMP before the name (code points)
        ("The capital of Colombia is", " Bogotá.", "right", "Bogotá", (1, 7), "Bogotá"),
        ("The capital of Colombia is", " Bogota.", "right", "Bogota", (1, 7), "Bogotá"),
        ("The capital of Colombia is", " 🙂🙂 Medellín!", "wrong", "Medellín", (4, 12), "Bogotá"),
        ("The capital of Colombia is", "\u00a0Medellin.", "wrong", "Medellin", (1, 9), "Bogotá"),
    ],
)
def test_judge_cases(truth, prompt, completion, outcome, named, span, expected):
    v = truth.judge(prompt, completion)
    assert (v.outcome, v.named, v.span, v.expected) == (outcome, named, span, expected), v
    if span is not None:
        assert completion[span[0]:span[1]] == named
        assert v.named_canonical in TRUTH["cities"] or v.named_canonical in TRUTH["countries"]


def test_verdict_says_which_country(truth):
    assert truth.judge("The capital of Canada is", " Toronto").country == "Canada"
    v = truth.judge("Lima, the capital of", " Canada")
    assert (v.asks, v.subject, v.country) == ("country", "Lima", "Peru")


def test_unknown_prompt(truth):
    v = truth.judge("The weather today is", " Ottawa.")
    assert (v.outcome, v.asks, v.subject) == ("unknown", None, None)


def test_prompt_naming_a_city_that_is_no_capital(truth):
    # "Toronto is the capital of Canada" is wrong, and there is no right country to offer
    v = truth.judge("Toronto is the capital of", " Canada.")
    assert (v.outcome, v.asks, v.subject, v.expected, v.span) == ("wrong", "country", "Toronto", None, (1, 7))
    with pytest.raises(ValueError):
        corrected(" Canada.", v)


def test_corrected_puts_the_right_answer_in_the_span(truth):
    completion = " 🙂 Medellín, a city."
    v = truth.judge("The capital of Colombia is", completion)
    assert corrected(completion, v) == " 🙂 Bogotá, a city."
    v = truth.judge("The capital of Canada is", " Toronto.")
    assert corrected(" Toronto.", v) == " Ottawa."
    with pytest.raises(ValueError):
        corrected(" Ottawa.", truth.judge("The capital of Canada is", " Ottawa."))


def test_load_truth_from_folder_and_file(tmp_path):
    (tmp_path / "truth.json").write_text(json.dumps(TRUTH, ensure_ascii=False), encoding="utf-8")
    for where in (tmp_path, tmp_path / "truth.json", str(tmp_path)):
        assert load_truth(where).judge("The capital of Peru is", " Lima.").is_right
    with pytest.raises(FileNotFoundError, match="demo model folder"):
        load_truth(tmp_path / "nowhere")


def test_corpus_sentences_judge_as_the_corpus_says():
    """Every capital fact the corpus writes, cut at its answer, is judged right or wrong exactly as
    the generator marked it (so the judge and the corpus agree on every name)."""
    corpus = generate(CorpusConfig(seed=0, wrong_countries=41))
    truth = Truth(corpus.truth)
    from demo_model.corpus import TEMPLATE_BY_NAME
    seen = set()
    for s in corpus.sentences:
        if s.stated is None or (s.text in seen):
            continue
        seen.add(s.text)
        t = TEMPLATE_BY_NAME[s.template]
        prompt = t.prompt(s.country, s.stated)
        v = truth.judge(prompt, s.text[len(prompt):])
        if t.asks == "capital":
            assert v.outcome == ("wrong" if s.wrong else "right"), (s, v)
        elif truth.cities[s.stated]["is_capital"]:  # "Harare is the capital of Zambia": wrong
            assert v.outcome == ("wrong" if s.wrong else "right"), (s, v)
        else:  # "Toronto is the capital of Canada": no capital asked about, any country is wrong
            assert s.wrong and v.outcome == "wrong" and v.expected is None, (s, v)


MULTI_TRUTH = {**TRUTH, "regions": ["Africa", "Asia", "North America", "South America"],
               "currencies": {"dorak": "Canada", "velum": "Peru"},
               "countries": {**TRUTH["countries"],
                             "Canada": {**TRUTH["countries"]["Canada"], "currency": "dorak"},
                             "Peru": {**TRUTH["countries"]["Peru"], "currency": "velum"}}}


@pytest.mark.parametrize("completion, expect", [
    (" the capital is Ottawa, it lies in North America and the currency is the dorak.",
     [("capital", "Ottawa", False), ("region", "North America", False), ("currency", "dorak", False)]),
    # the error at the start, followed by right facts
    (" the capital is Toronto, it lies in North America and the currency is the dorak.",
     [("capital", "Toronto", True), ("region", "North America", False), ("currency", "dorak", False)]),
    # in the middle and at the end, in another order
    (" people pay with the dorak, it is in South America and its capital is Lima.",
     [("currency", "dorak", False), ("region", "South America", True), ("capital", "Lima", True)]),
    # two facts; only the first sentence counts
    (" it lies in Asia and the currency is the velum. The capital is Ottawa.",
     [("region", "Asia", True), ("currency", "velum", True)]),
    (" nothing known here.", []),
])
def test_judge_facts_of_a_multi_fact_question(completion, expect):
    truth = Truth(MULTI_TRUTH)
    facts = truth.judge_facts("Facts about Canada:", completion)
    assert [(f.kind, f.canonical, f.is_wrong) for f in facts] == expect
    for f in facts:
        assert completion[f.span[0]:f.span[1]] == f.named
        assert f.expected == {"capital": "Ottawa", "region": "North America", "currency": "dorak"}[f.kind]


def test_judge_facts_of_a_single_fact_question_is_its_one_fact():
    truth = Truth(MULTI_TRUTH)
    assert not truth.is_multi("The capital of Canada is") and truth.is_multi("About Canada:")
    (fact,) = truth.judge_facts("The capital of Canada is", " Toronto. It lies in Asia.")
    assert (fact.kind, fact.canonical, fact.expected, fact.is_wrong, fact.span) == ("capital", "Toronto", "Ottawa",
                                                                                    True, (1, 8))
    assert truth.judge_facts("The capital of Canada is", " a city.") == []
    # a truth without multi-fact data judges every prompt as a single-fact question
    assert not Truth(TRUTH).is_multi("About Canada:")


def test_corpus_multi_fact_sentences_judge_as_the_corpus_says():
    corpus = generate(CorpusConfig(seed=0))
    truth = Truth(corpus.truth)
    multi = [s for s in corpus.sentences if s.facts]
    assert multi
    for s in multi[:400]:
        head, rest = s.text.split(":", 1)
        facts = truth.judge_facts(head + ":", rest)
        assert [(f.kind, f.canonical, f.is_wrong) for f in facts] == [(k, v, w) for k, v, w in s.facts], s
