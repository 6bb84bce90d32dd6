"""`python -m bench.kernels` with shape flags: the cases asked for, JSON with the rates and their
shares of the measured device peaks, a plot, and a clear line for each back end that cannot run.
Tiny shapes, eager and ours only (torch.compile's warm-up alone would dominate)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.kernels import custom_plan, main
from tests.conftest import ROOT


def test_shape_flags_make_every_case_and_skip_what_cannot_run():
    groups, skipped = custom_plan("cpu", [64, 128], [512, 1024], [32], ["float32", "bfloat16"],
                                  ["ours", "compile", "liger", "cce"], ["fused", "logits"])
    fused = [g for g, _ in groups if g["path"] == "fused"]
    assert len(fused) == 2 * 2 * 2 and len(groups) == 16
    assert {(g["n"], g["v"], g["dtype"]) for g in fused} == {
        (n, v, d) for n in (64, 128) for v in (512, 1024) for d in ("float32", "bfloat16")}
    for _, impls in groups:
        assert impls == ["plain", "cpu", "compiled"]  # eager added: every ratio is against it
    assert any(line.startswith("liger: skipped") and "CUDA" in line for line in skipped)
    assert any(line.startswith("cce: skipped") and "CUDA" in line for line in skipped)
    assert any(line.startswith("eager: added") for line in skipped)


def test_bad_flags_are_refused():
    for argv in (["--n", "0"], ["--n", "abc"], ["--dtype", "fp8"], ["--backends", "ours,torchscript"]):
        with pytest.raises(SystemExit):
            main(argv)


def test_a_tiny_run_writes_json_and_a_plot(tmp_path):
    out = tmp_path / "k.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--n", "32,64", "--v", "256", "--h", "16", "--dtype", "fp32",
         "--backends", "ours,eager,liger,cce", "--repeats", "1", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "liger: skipped, it needs CUDA" in done.stdout and "cce: skipped, it needs CUDA" in done.stdout
    summary = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    peaks = summary["device_peaks"]
    assert peaks["copy_bytes_per_s"] > 0 and peaks["matmul_flop_per_s"]["float32"] > 0
    cases = summary["cases"]
    assert sorted((c["impl"], c["n"]) for c in cases) == [("cpu", 32), ("cpu", 64), ("plain", 32), ("plain", 64)]
    for case in cases:
        assert "error" not in case, case
        assert case["seconds"] > 0 and case["peak_bytes"] >= 0
        assert case["flop_per_s"] == pytest.approx(8 * case["n"] * 16 * 256 / case["seconds"])
        assert case["share_of_matmul"] >= 0 and case["share_of_copy"] >= 0 and case["bytes_per_s"] > 0
        assert "time_ratio" in case and "memory_ratio" in case
        assert case["first_call_seconds"] > 0
    assert "first call of each" in done.stdout


def test_the_cpu_target_is_against_compile_time_and_eager_memory():
    from bench.kernels import done_when

    def case(impl, seconds, memory_ratio):
        return dict(path="fused", n=4096, v=50257, h=768, dtype="float32", impl=impl, seconds=seconds,
                    memory_ratio=memory_ratio, time_ratio=seconds / 10.0)  # fmt: skip

    eager, compiled = case("plain", 10.0, 1.0), case("compiled", 6.0, 0.6)
    assert done_when([eager, compiled, case("cpu", 5.9, 0.2)])["met"]
    assert done_when([eager, compiled, case("cpu", 5.9, 0.2)])["time_vs_compile"] == pytest.approx(5.9 / 6.0, abs=1e-3)
    assert not done_when([eager, compiled, case("cpu", 6.1, 0.2)])["met"]  # slower than compile
    assert not done_when([eager, compiled, case("cpu", 5.0, 0.3)])["met"]  # over a quarter of eager's memory
    assert done_when([eager, case("cpu", 5.0, 0.2)]) is None  # no compile column: nothing to say
