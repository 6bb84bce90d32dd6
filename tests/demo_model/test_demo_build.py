"""Building the demo model folder: a real (tiny, few-step) build into tmp_path, loaded back with
the Auto classes, reused, refused on a different recipe, never left half-written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo_model import build as build_mod
from demo_model.build import REQUIRED, BuildConfig, build, is_complete
from demo_model.corpus import CorpusConfig
from demo_model.judge import load_truth
from demo_model.prompts import heldout
from demo_model.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def tiny(out: Path, **kw) -> BuildConfig:
    """A build that takes seconds: a small corpus and a few steps (a bad model, a real one)."""
    return BuildConfig(
        out=out,
        corpus=CorpusConfig(seed=1, repeats=4, wrong_share=0.25),
        train=TrainConfig(seed=1, steps=kw.pop("steps", 12), batch_size=8, threads=1, log_every=4),
        check_samples=kw.pop("check_samples", 1),
        **kw,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "demo"
    lines: list[str] = []
    build(tiny(out), log=lines.append)
    return out, lines


def test_folder_is_complete_and_loads(built):
    out, lines = built
    assert is_complete(out)
    for f in REQUIRED:
        assert (out / f).is_file(), f
    assert any(line.startswith("step ") and "loss" in line and "elapsed" in line for line in lines), lines
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.n_positions == tok.model_max_length == 64
    ids = tok("The capital of Kenya is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
    assert out_ids.shape[0] == 1 and ids.shape[1] < out_ids.shape[1] <= ids.shape[1] + 5
    assert tok.decode(out_ids[0, : ids.shape[1]]) == "The capital of Kenya is"


def test_truth_heldout_and_build_record(built):
    out, _ = built
    truth = load_truth(out)
    assert truth.data["corpus"]["seed"] == 1 and truth.data["corpus"]["wrong_share"] == 0.25
    held = heldout(out)
    assert held.eval_prompts and held.generalization_prompts and held.heldout_sentences
    assert held.wrong_fact_prompts and all(p.wrong_fact for p in held.wrong_fact_prompts)
    for p in held.eval_prompts:
        v = truth.judge(p.prompt, " " + p.answer + ".")
        assert v.is_right and v.country == p.country, (p, v)
    record = json.loads((out / "build.json").read_text())
    assert record["recipe"] == build_mod.recipe(tiny(out))
    assert record["train"]["final_loss"] > 0
    check = record["self_check"]
    assert 0.0 <= check["eval"]["all"]["error_rate"] <= 1.0 and check["heldout_perplexity"] > 1.0


def test_reuse_and_refusal(built):
    out, _ = built
    before = (out / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    build(tiny(out), log=lines.append)
    assert any("reusing" in line for line in lines), lines
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(SystemExit, match="different recipe"):
        build(tiny(out, steps=13), log=lambda _: None)
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(build_mod, "train", boom)
    out = tmp_path / "demo"
    with pytest.raises(RuntimeError, match="killed"):
        build(tiny(out), log=lambda _: None)
    assert [p.name for p in tmp_path.iterdir()] == [".demo.lock"]  # no model, no temporary folder


def test_stale_temporary_folders_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f".demo.tmp-{pid}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    other = tmp_path / f".other.tmp-{pid}"  # another folder's leftovers are not ours to remove
    other.mkdir()
    lines: list[str] = []
    build(tiny(tmp_path / "demo", steps=2, check_samples=0), log=lines.append)
    assert not stale.exists() and other.exists()
    assert any("interrupted build" in line for line in lines), lines


def test_force_rebuild_replaces_an_incomplete_folder(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a half-copied folder might hold
    assert not is_complete(out)
    build(tiny(out, steps=2, check_samples=0), log=lambda _: None)
    assert is_complete(out)
    assert json.loads((out / "build.json").read_text())["self_check"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]  # no temp or old folders left


def test_command_line(tmp_path):
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "demo_model", "--out", str(out), "--seed", "2", "--steps", "2",
           "--threads", "1", "--check-samples", "0", "--wrong-share", "0.2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "step     2/2" in r.stdout and is_complete(out)
    assert load_truth(out).data["corpus"]["wrong_share"] == 0.2
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "reusing" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(cmd[:-1] + ["0.3"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and "--force" in r.stderr


def test_concurrent_builds_build_once(tmp_path):
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "demo_model", "--out", str(out), "--steps", "30", "--threads", "1",
           "--check-samples", "0"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    stdouts = [o for o, _ in outputs]
    assert sum("step    30/30" in o for o in stdouts) == 1, stdouts  # one trained
    assert sum("reusing" in o for o in stdouts) == 1, stdouts  # the other waited and reused
    assert is_complete(out)


def test_replace_stale_rebuilds_a_folder_of_another_recipe(tmp_path):
    out = tmp_path / "m"
    build(tiny(out, steps=2, check_samples=0), log=lambda _: None)
    other = BuildConfig(out=out, corpus=CorpusConfig(seed=1, repeats=4, wrong_share=0.5),
                        train=TrainConfig(seed=1, steps=2, batch_size=8, threads=1), check_samples=0,
                        replace_stale=True)
    lines: list[str] = []
    build(other, log=lines.append)
    assert any("another recipe" in line and "rebuilding" in line for line in lines), lines
    assert json.loads((out / "build.json").read_text())["recipe"]["corpus"]["wrong_share"] == 0.5
