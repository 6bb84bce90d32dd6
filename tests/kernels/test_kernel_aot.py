"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed); the registers
and spills of each compiled specialization are printed (pytest -s, or the report on failure).

The suite runs with TRITON_INTERPRET=1 (no GPU), which replaces Triton's language functions in
this process; the compile therefore runs in a child process without it and with an empty cache
folder of its own, so it passes or fails the same way on a new machine as on a warm one.
"""

from __future__ import annotations

import pytest

from kernels import aot


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_every_kernel_compiles(arch, tmp_path):
    results = aot.compile_isolated((arch,), cache_dir=str(tmp_path / "triton-cache"))
    print("\n" + aot.format_table(results))
    assert len(results) == len(aot.specs()), f"expected {len(aot.specs())} results, got {len(results)}"
    failed = [r for r in results if r.error]
    assert not failed, "kernels failed to compile:\n" + "\n".join(f"{r.spec}: {r.error}" for r in failed)
    for r in results:
        assert r.registers > 0, f"{r.spec}: no register count from ptxas"
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.spec} spills on sm_{arch}: {r}"
    assert any((tmp_path / "triton-cache").iterdir()), "the child compiled into another cache folder"


def test_refuses_to_run_under_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--arch", "80"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err
