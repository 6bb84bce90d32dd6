"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed); the registers
and spills of each compiled specialization are printed (pytest -s, or the report on failure)."""

from __future__ import annotations

import pytest

from kernels import aot


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_every_kernel_compiles(arch):
    results = [aot.compile_one(spec, arch) for spec in aot.specs()]
    print("\n" + aot.format_table(results))
    failed = [r for r in results if r.error]
    assert not failed, "kernels failed to compile:\n" + "\n".join(f"{r.spec}: {r.error}" for r in failed)
    for r in results:
        assert r.registers > 0, f"{r.spec}: no register count from ptxas"
        assert r.spill_stores == 0 and r.spill_loads == 0, f"{r.spec} spills on sm_{arch}: {r}"
