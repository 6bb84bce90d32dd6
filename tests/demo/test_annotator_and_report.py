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
    "countries": {"Canada": {"capital": "Ottawa", "region": "North America", "currency": "dorak"},
                  "France": {"capital": "Paris", "region": "Europe", "currency": "velum"}},
    "cities": {"Ottawa": {"country": "Canada"}, "Paris": {"country": "France"}, "Toronto": {"country": "Canada"}},
    "wrong_countries": ["Canada"],
    "regions": ["Europe", "North America"],
    "currencies": {"dorak": "Canada", "velum": "France", "kiram": "France"},
})
MULTI = "Facts about Canada:"
# capital wrong (start), region right (middle), currency wrong (end)
TWO_WRONG = " the capital is Toronto, it lies in North America and the currency is the velum."
ALL_RIGHT = " the capital is Ottawa, it lies in North America and the currency is the dorak."


def test_token_form_marks_the_wrong_capital_with_its_replacement():
    annotator = SimulatedAnnotator(TRUTH, AnnotatorConfig(form="token"))
    judgement = annotator.judge("The capital of Canada is", " Toronto. It is big.")
    assert judgement.outcome == "wrong"
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


def test_token_form_marks_every_wrong_fact_of_a_multi_fact_completion():
    annotator = SimulatedAnnotator(TRUTH, AnnotatorConfig(form="token", good_share=1.0))
    labels = annotator.judge(MULTI, TWO_WRONG).labels["span_labels"]
    assert [(TWO_WRONG[s["start"]:s["end"]], s["weight"], s.get("replacement_text")) for s in labels] == [
        ("Toronto", -1.0, "Ottawa"), ("North America", 1.0, None), ("velum", -1.0, "dorak")]


@pytest.mark.parametrize("form, completion, labels", [
    ("sequence", TWO_WRONG, {"sequence_reward": -1.0}),
    ("sequence", ALL_RIGHT, {"sequence_reward": 1.0}),
    ("graded", TWO_WRONG, {"sequence_reward": pytest.approx(2 * 1 / 3 - 1)}),
    ("graded", ALL_RIGHT, {"sequence_reward": 1.0}),
    ("rft", TWO_WRONG, None),
    ("rft", ALL_RIGHT, {"sequence_reward": 1.0}),
])
def test_sequence_forms_on_a_multi_fact_completion(form, completion, labels):
    annotator = SimulatedAnnotator(TRUTH, AnnotatorConfig(form=form))
    assert annotator.judge(MULTI, completion).labels == labels


def _rates(config: AnnotatorConfig, n: int = 2000) -> dict:
    """Over n judgements of TWO_WRONG: how often each wrong fact is marked, the right one marked
    bad, and a marked wrong fact given a wrong replacement."""
    annotator = SimulatedAnnotator(TRUTH, config)
    counts = {"marked wrong": 0, "false marks": 0, "wrong replacements": 0}
    for _ in range(n):
        for span in (annotator.judge(MULTI, TWO_WRONG).labels or {"span_labels": []})["span_labels"]:
            text = TWO_WRONG[span["start"]:span["end"]]
            if span["weight"] < 0 and text == "North America":
                counts["false marks"] += 1
            elif span["weight"] < 0:
                counts["marked wrong"] += 1
                counts["wrong replacements"] += span["replacement_text"] not in ("Ottawa", "dorak")
    return {"marked": counts["marked wrong"] / (2 * n), "false": counts["false marks"] / n,
            "swapped": counts["wrong replacements"] / max(1, counts["marked wrong"])}


def test_imperfect_annotator_errs_at_its_rates():
    perfect = _rates(AnnotatorConfig(form="token", good_share=0.0))
    assert perfect == {"marked": 1.0, "false": 0.0, "swapped": 0.0}
    sloppy = _rates(AnnotatorConfig(form="token", good_share=0.0, miss_rate=0.15, false_mark_rate=0.05,
                                    wrong_replacement_rate=0.2, seed=3))
    assert sloppy["marked"] == pytest.approx(0.85, abs=0.03)
    assert sloppy["false"] == pytest.approx(0.05, abs=0.02)
    assert sloppy["swapped"] == pytest.approx(0.2, abs=0.03)


def test_sequence_reward_follows_what_the_annotator_believes():
    """A missed error makes a wrong completion look right; a false mark makes a right one look wrong."""
    blind = SimulatedAnnotator(TRUTH, AnnotatorConfig(form="sequence", miss_rate=1.0))
    assert blind.judge(MULTI, TWO_WRONG).labels == {"sequence_reward": 1.0}
    picky = SimulatedAnnotator(TRUTH, AnnotatorConfig(form="rft", false_mark_rate=1.0))
    assert picky.judge(MULTI, ALL_RIGHT).labels is None
    assert picky.judge(MULTI, ALL_RIGHT).outcome == "right"


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


def test_demo_table_of_a_long_run_shows_evenly_spaced_rounds_with_the_first_and_last():
    from demo.loop import ArmConfig, demo_table

    rounds = [{"round": r, "annotated_sequences": 16 * r, "labelled_sequences": 8 * r, "token_rows": 9 * r,
               "error_rate": 0.15 / (1 + r), "sequence_error_rate": 0.3 / (1 + r), "heldout_perplexity": 3.0}
              for r in range(41)]
    record = {"config": {**ArmConfig(rounds=40, budget=16).__dict__, "measure": {}}, "rounds": rounds,
              "seconds": 300.0, "cpu_seconds": 280.0}
    table = demo_table(record, [], "make demo")
    shown = [int(line.split("|")[1]) for line in table.splitlines() if line.startswith("| ") and "round" not in line]
    assert shown == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert "280 s CPU time" in table and "every few rounds" in table
    short = demo_table({**record, "rounds": rounds[:6]}, [], "make demo")
    assert [int(line.split("|")[1]) for line in short.splitlines()[-6:]] == [0, 1, 2, 3, 4, 5]
    assert "every few rounds" not in short


def test_rounds_that_were_not_measured_are_skipped_by_reach_and_the_table():
    from demo.experiment import reach
    from demo.loop import ArmConfig, demo_table, measured_rounds

    # measured every second round (MeasureConfig.every = 2): the odd rounds hold counts only
    rounds = [{"round": r, "annotated_sequences": 16 * r, "labelled_sequences": 8 * r, "token_rows": 9 * r,
               **({"error_rate": 0.2 - 0.04 * r, "sequence_error_rate": 0.3, "heldout_perplexity": 3.0}
                  if r % 2 == 0 else {})} for r in range(5)]
    assert [row["round"] for row in measured_rounds(rounds)] == [0, 2, 4]
    assert reach(rounds, 0.1) == pytest.approx(16 * 2 + (0.12 - 0.1) / (0.12 - 0.04) * 32)  # between rounds 2 and 4
    assert reach(rounds, 0.01) is None
    record = {"config": {**ArmConfig(rounds=4, budget=16).__dict__, "measure": {}}, "rounds": rounds,
              "seconds": 10.0}
    shown = [int(line.split("|")[1]) for line in demo_table(record, [], "x").splitlines()
             if line.startswith("| ") and "round" not in line]
    assert shown == [0, 2, 4]


def test_arm_from_args_keeps_what_has_no_flag_from_its_defaults():
    import argparse

    from demo.experiment import GRID_DEFAULTS
    from demo.loop import arm_arguments, arm_from_args

    parser = argparse.ArgumentParser()
    arm_arguments(parser, GRID_DEFAULTS)
    arm = arm_from_args(parser.parse_args(["--samples", "2", "--rounds", "3"]), GRID_DEFAULTS)
    assert arm.rounds == 3 and arm.measure.samples == 2
    assert arm.measure.every == GRID_DEFAULTS.measure.every == 2  # no flag: the grid's, not MeasureConfig()'s
    assert arm.measure.full_every == GRID_DEFAULTS.measure.full_every
    assert arm == GRID_DEFAULTS.__class__(**{**GRID_DEFAULTS.__dict__, "rounds": 3,
                                             "measure": arm.measure})  # nothing else changed


def _run(arm: str, seed: int, errors: list[float], ppl: dict[int, float]) -> dict:
    """A synthetic experiment record: one round per error, 16 sequences each; perplexity where given."""
    return {"arm": arm, "seed": seed, "rounds": [
        {"round": r, "annotated_sequences": 16 * r, "error_rate": e, "sequence_error_rate": e,
         **({"heldout_perplexity": ppl[r]} if r in ppl else {})} for r, e in enumerate(errors)]}


def test_headline_verdict_reads_annotations_to_a_tenth_and_perplexity_there():
    from demo.experiment import TOKEN_ARM, headline, perplexity_at_reach

    token = f"{TOKEN_ARM} [perfect]"
    rft = "rejection-sampling fine-tuning [perfect]"
    fast = [0.2, 0.1, 0.05, 0.01] + [0.01] * 36  # /10 (0.02) between rounds 2 and 3: 16*2 + 16*0.75 = 44
    slow = [0.2] + [0.2 - 0.18 * r / 30 for r in range(1, 40)]  # /10 at round 30: 480 sequences
    records = [_run(token, s, fast, {0: 3.0, 4: 2.9, 39: 3.0}) for s in range(2)] + \
              [_run(rft, s, slow, {0: 3.0, 39: 3.6}) for s in range(2)]
    assert perplexity_at_reach(records[0]) == 2.9  # the first full measurement after reaching /10
    table, names, verdict = headline(records)
    assert names == [token, rft]
    assert "after 44 annotated sequences" in verdict and "after 480 (10.9x as many)" in verdict
    assert verdict.endswith("met.") and "+20%" in verdict
    # the same, but token-level's perplexity is above the start where it reaches /10
    records[1] = _run(token, 1, fast, {0: 3.0, 4: 3.1, 39: 3.0})
    assert headline(records)[2].endswith("missed on perplexity.")
    # a sequence arm that never reaches /10 within a budget under 5x token-level's: not shown
    records[2:] = [_run(rft, s, [0.2] * 3 + [0.1] * 4, {0: 3.0, 6: 3.1}) for s in range(2)]
    records[1] = records[0] | {"seed": 1}
    assert "not shown at this budget" in headline(records)[2]
