"""The default demo model is what the demo needs: right on the facts the corpus always states,
wrong at about the corpus's rate on the facts it sometimes gets wrong (sampling at temperature 1),
and greedy decoding right almost everywhere. Uses the repository's data/demo-model when it was
built with today's default recipe (make model), otherwise builds one (about a minute or two)."""

from pathlib import Path

import pytest

from demo_model.build import BuildConfig, build, is_complete, recipe
from demo_model.evaluate import EvalConfig, evaluate, load, sample
from demo_model.judge import load_truth
from demo_model.prompts import heldout

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import json

    repo_model = ROOT / "data" / "demo-model"
    if is_complete(repo_model):
        built = json.loads((repo_model / "build.json").read_text())
        if built["recipe"] == recipe(BuildConfig(out=repo_model)):
            return repo_model
    out = tmp_path_factory.mktemp("quality") / "demo-model"
    build(BuildConfig(out=out, check_samples=0), log=lambda _: None)
    return out


def test_error_rates_at_temperature_one(model_dir):
    model, tok = load(model_dir)
    result = evaluate(model, tok, heldout(model_dir), load_truth(model_dir), EvalConfig(samples=8, seed=11))
    ev = result["eval"]
    # the demo needs a clearly nonzero starting error rate, near what the corpus puts in
    assert 0.08 <= ev["all"]["error_rate"] <= 0.30, ev
    assert abs(ev["wrong_fact"]["error_rate"] - ev["wrong_fact"]["corpus_error_rate"]) < 0.08, ev
    # and the facts the corpus never gets wrong are (nearly) never wrong
    assert ev["other"]["error_rate"] < 0.04, ev
    assert ev["all"]["none_rate"] < 0.03, ev
    assert 1.0 < result["heldout_perplexity"] < 6.0, result
    # multi-fact completions state two or three facts, wrong at about the corpus's rate
    multi = ev["multi"]
    assert 2.0 <= multi["facts_per_completion"] <= 3.0, multi
    assert abs(multi["error_rate"] - multi["corpus_error_rate"]) < 0.05, multi


def test_greedy_names_the_right_capital(model_dir):
    model, tok = load(model_dir)
    held, truth = heldout(model_dir), load_truth(model_dir)
    prompts = held.eval_prompts
    completions = sample(model, tok, [p.prompt for p in prompts], EvalConfig(samples=1, temperature=0))
    right = [(facts := truth.judge_facts(p.prompt, c[0])) != [] and not any(f.is_wrong for f in facts)
             for p, c in zip(prompts, completions, strict=True)]
    assert sum(right) / len(right) >= 0.95, [(p.prompt, c) for p, c, r in zip(prompts, completions, right, strict=True) if not r]
    kenya = sample(model, tok, ["The capital of Kenya is"], EvalConfig(samples=1, temperature=0))[0][0]
    assert kenya.startswith(" Nairobi"), kenya
