"""The simulated annotator and the report helpers, on hand-written inputs."""

from __future__ import annotations

import json

import pytest

from demo.annotator import AnnotatorConfig, SimulatedAnnotator
from demo.measure import distinct_n
from demo.report import markdown_table, mean_std, replace_between_markers
from demo_model.judge import Truth

TRUTH = Truth({
    "format": "tokenfeedback-demo-truth/1",
    "countries": {"Canada": {"capital": "Ottawa"}, "France": {"capital": "Paris"}},
    "cities": {"Ottawa": {"country": "Canada"}, "Paris": {"country": "France"}, "Toronto": {"country": "Canada"}},
    "wrong_countries": ["Canada"],
})


def test_token_form_marks_the_wrong_capital_with_its_replacement():
    annotator = SimulatedAnnotator(TRUTH, AnnotatorConfig(form="token"))
    judgement = annotator.judge("The capital of Canada is", " Toronto. It is big.")
    assert judgement.verdict.is_wrong
    assert judgement.labels == {"span_labels": [
        {"start": 1, "end": 8, "weight": -1.0, "text": "Toronto", "replacement_text": "Ottawa"}]}


def test_token_form_without_replacements():
    annotator = SimulatedAnnotator(TRUTH, AnnotatorConfig(form="token", replacements=False))
    span = annotator.judge("The capital of Canada is", " Paris.").labels["span_labels"][0]
    assert "replacement_text" not in span and span["weight"] == -1.0


@pytest.mark.parametrize("good_share, expect_label", [(0.0, False), (1.0, True)])
def test_token_form_marks_right_answers_good_at_the_configured_share(good_share, expect_label):
    annotator = SimulatedAnnotator(TRUTH, AnnotatorConfig(form="token", good_share=good_share))
    labels = annotator.judge("The capital of Canada is", " Ottawa.").labels
    assert (labels == {"span_labels": [{"start": 1, "end": 7, "weight": 1.0}]}) if expect_label else labels is None


@pytest.mark.parametrize("completion, reward", [(" Toronto.", -1.0), (" Ottawa.", 1.0), (" a city.", None)])
def test_sequence_form_gives_one_reward_per_answer(completion, reward):
    annotator = SimulatedAnnotator(TRUTH, AnnotatorConfig(form="sequence"))
    labels = annotator.judge("The capital of Canada is", completion).labels
    assert labels == (None if reward is None else {"sequence_reward": reward})


def test_markers_are_replaced_not_appended():
    text = "# Title\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\ntail\n"
    once = replace_between_markers(text, "results", "new table")
    assert once == "# Title\n\n<!-- results:start -->\nnew table\n<!-- results:end -->\n\ntail\n"
    assert replace_between_markers(once, "results", "new table") == once
    appended = replace_between_markers("# Title\n", "other", "x")
    assert appended.endswith("<!-- other:start -->\nx\n<!-- other:end -->\n")


def test_summary_helpers():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert distinct_n(["a b a b", "a b"]) == pytest.approx(2 / 4)
    table = markdown_table(["arm", "x"], [["token | h=1", 0.12345]])
    assert table.splitlines() == ["| arm | x |", "|---|---|", "| token \\| h=1 | 0.123 |"]
    json.dumps(table)
