"""The demo model a fresh clone builds is pinned: README's figures are measured on it, so a change
to the corpus generator or the trainer that changes the model must be noticed here (and README's
tables regenerated: `make experiment`, `make claims`, `make demo DEMO_ARGS=--readme`).

- the default corpus's digest is recorded (any change to what the generator writes fails at once);
- data/demo-model, when built (make model; make test builds it first), must hold today's recipe,
  its recorded weights digest, and self-check figures within a tolerance of the recorded ones;
- two builds of one recipe give the same bytes (training is deterministic: one CPU thread, fixed
  seeds), checked on a short build.

When a change is meant to change the model: rebuild (`make model`), rerun the README commands,
and update the values below from data/demo-model/build.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo_model.build import BuildConfig, build, corpus_digest, is_complete, recipe, weights_digest
from demo_model.corpus import CorpusConfig, generate
from demo_model.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "data" / "demo-model"

CORPUS_SHA256 = "7db38a1eb12f571fc5f504662701f630c3c2cb363e7c5211e82a74c1827ceca4"
WEIGHTS_SHA256 = "ec564e3d85ce20e598cf774c6f6e47610493862f7c352774169a60205c28e773"
# Self-check figures of the pinned build (build.json "self_check"), and how far another machine's
# build (other CPU kernels can round differently) may land from them.
SELF_CHECK = {"multi_error_rate": 0.146, "single_error_rate": 0.161, "heldout_perplexity": 3.082}
TOLERANCE = {"multi_error_rate": 0.03, "single_error_rate": 0.03, "heldout_perplexity": 0.05}


def test_default_corpus_is_the_pinned_one():
    assert corpus_digest(generate(CorpusConfig()).texts) == CORPUS_SHA256, (
        "the default corpus changed: rebuild the model (make model), regenerate README's figures, and "
        "update CORPUS_SHA256 / WEIGHTS_SHA256 / SELF_CHECK in this file"
    )


@pytest.fixture(scope="module")
def built() -> dict:
    if not is_complete(MODEL):
        pytest.skip(f"{MODEL} is not built (make model; make test builds it first)")
    return json.loads((MODEL / "build.json").read_text())


def test_built_model_has_todays_recipe(built):
    assert built["recipe"] == recipe(BuildConfig(out=MODEL)), (
        f"{MODEL} was built with another recipe: run `make model`"
    )


def test_built_model_is_the_pinned_one(built):
    check = built["self_check"]
    got = {"multi_error_rate": check["eval"]["multi"]["error_rate"],
           "single_error_rate": check["eval"]["single"]["error_rate"],
           "heldout_perplexity": check["heldout_perplexity"]}
    for key, value in SELF_CHECK.items():
        assert abs(got[key] - value) <= TOLERANCE[key], (key, got, SELF_CHECK)
    assert weights_digest(MODEL) == built["weights_sha256"], "model.safetensors changed after the build"
    if built["weights_sha256"] != WEIGHTS_SHA256:
        pytest.fail(f"the weights differ from the pinned build ({built['weights_sha256']} != {WEIGHTS_SHA256}) "
                    f"while the self-check figures agree within tolerance: another CPU or package version? "
                    f"figures: {got}")


def test_the_same_recipe_builds_the_same_bytes(tmp_path):
    def one(out: Path) -> str:
        cfg = BuildConfig(out=out, corpus=CorpusConfig(seed=5, repeats=3, multi_repeats=2),
                          train=TrainConfig(seed=5, steps=6, batch_size=4, threads=1), check_samples=0)
        build(cfg, log=lambda _: None)
        return weights_digest(out)

    assert one(tmp_path / "a") == one(tmp_path / "b")
