"""A short version of `make demo` (one round, few samples) end to end, against real servers on the
demo model: the pipeline (sample over the stream -> annotate -> submit -> train -> publish ->
measure -> JSON and plot) must run, not the conclusions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "data" / "demo-model"


@pytest.fixture(scope="module")
def demo_model() -> Path:
    if not (DEMO_MODEL / "build.json").is_file():
        pytest.skip(f"{DEMO_MODEL} is not built (make model; make test builds it first)")
    return DEMO_MODEL


def run_module(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root; it must exit 0."""
    run = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"{module} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


@pytest.mark.slow
def test_one_round_of_the_demo_loop(demo_model, tmp_path):
    out = tmp_path / "results"
    run = run_module("demo", "--model", str(demo_model), "--rounds", "1", "--budget", "24", "--steps", "2",
                     "--samples", "1", "--out", str(out), timeout=600)
    record = json.loads((out / "demo.json").read_text())
    assert (out / "demo.png").stat().st_size > 1000
    first, last = record["rounds"]
    assert first["round"] == 0 and first["model_version"] == 0 and first["annotated_sequences"] == 0
    assert last["annotated_sequences"] == 24
    assert 0 < last["labelled_sequences"] <= 24
    assert last["token_rows"] >= last["labelled_sequences"]  # a labelled sequence gives at least one row
    assert last["model_version"] == 1, "the trained weights were not published to the policy server"
    for row in record["rounds"]:
        assert 0 <= row["error_rate"] <= 1 and 0 <= row["distinct2"] <= 1 and 0 <= row["single_error_rate"] <= 1
        assert 1 < row["heldout_perplexity"] < 1000
        assert 1 <= row["facts_per_completion"] <= 3  # multi-fact completions state two or three facts
    assert last["train_kl"] >= 0 and last["train_loss"] == last["train_loss"]  # finite, not NaN
    assert "error rate" in run.stdout and "targets:" in run.stdout
    # the run reports its CPU time (this process and both servers, counted once they have exited)
    assert record["cpu_seconds"] > 0 and "s CPU (servers included)" in run.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)  # 16 short runs: minutes on a loaded 2-core machine (the subprocess's own limit)
def test_claims_quick_runs_every_comparison(demo_model, tmp_path):
    """`make claims QUICK=1`: every comparison's arms run, and the tables, plots and JSON appear."""
    run = run_module("demo.claims", "--model", str(demo_model), "--quick", "--no-readme", "--out", str(tmp_path),
                     timeout=900)
    record = json.loads((tmp_path / "claims.json").read_text())
    names = {rec["arm"] for rec in record["records"]}
    for arms in record["comparisons"].values():
        assert set(arms) <= names
    assert len(record["comparisons"]) == 3
    for png in ["KL-penalty.png", "online-vs-offline.png", "horizon.png", "degeneration.png"]:
        assert (tmp_path / png).stat().st_size > 1000, png
    for title in record["comparisons"]:
        assert f"#### {title}" in run.stdout
    horizon = record["comparisons"]["3. horizon"]
    assert len(horizon) == 2 * (1 + 3 * 2)  # token and sequence rewards; h=1, and h=2, 4, full x gamma 1, 0.9
    assert len(record["comparisons"]["1. KL penalty"]) == 5
    # --only reruns one comparison; claims.json keeps the others' records
    run_module("demo.claims", "--model", str(demo_model), "--quick", "--no-readme", "--out", str(tmp_path),
               "--only", "2", timeout=900)
    again = json.loads((tmp_path / "claims.json").read_text())
    assert list(again["comparisons"]) == list(record["comparisons"])
    assert {r["arm"] for r in again["records"]} == names and len(again["records"]) == len(record["records"])
    assert again["seeds"] == {title: [0] for title in record["comparisons"]}


@pytest.mark.slow
@pytest.mark.timeout(900)  # 10 short runs, as above
def test_experiment_quick_runs_every_arm(demo_model, tmp_path):
    """`make experiment QUICK=1`: every arm under both annotators runs; headline and tables appear."""
    run = run_module("demo.experiment", "--model", str(demo_model), "--quick", "--no-readme", "--out", str(tmp_path),
                     timeout=900)
    record = json.loads((tmp_path / "experiment.json").read_text())
    assert len(record["arms"]) == 10 and {r["arm"] for r in record["records"]} == set(record["arms"])
    for png in ["headline.png", "experiment-perfect.png", "experiment-realistic.png"]:
        assert (tmp_path / png).stat().st_size > 1000, png
    assert "#### perfect annotator" in run.stdout and "#### realistic annotator" in run.stdout
