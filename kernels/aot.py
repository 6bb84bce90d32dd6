"""Compile every Triton kernel ahead of time for sm_80 and sm_90, no GPU needed, and report
registers and spills.

The Triton interpreter forgives what the compiler does not (types, layouts, shapes of scalars);
compiling with `triton.compile` for a `GPUTarget` catches that on a machine without a GPU.
Registers and spill bytes come from `ptxas -v` (the ptxas bundled with Triton) run on the compiled
PTX; shared memory and warps from the compiled metadata.

    python -m kernels.aot          # table on stdout; exit status 1 if any kernel fails to compile
    python -m kernels.aot --json   # one JSON object per compiled specialization instead

The compiler must see Triton's real language functions, not the interpreter's: a process with
TRITON_INTERPRET=1 (the test suite without a GPU sets it) gets the interpreter's everywhere once
triton is imported. `compile_isolated` therefore runs this module in a child process with that
switch removed and its own empty cache folder, so a result never depends on an earlier run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ARCHS = (80, 90)


@dataclass(frozen=True)
class Spec:
    """One specialization of a kernel: what the launch wrapper can produce."""

    kernel: str
    logits: str  # Triton dtype of the logits pointers
    variant: int
    has_behavior: bool
    block_v: int
    num_warps: int


@dataclass
class Compiled:
    arch: int
    spec: Spec
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes of shared memory
    error: str = ""


def specs() -> list[Spec]:
    """Every variant for fp32 and bf16 logits at the large-vocabulary launch configuration, and
    the smallest configuration once."""
    from kernels.triton_loss import MAX_BLOCK_V, _launch_config

    big = _launch_config(1 << 20)
    assert big[0] == MAX_BLOCK_V
    out = [
        Spec("_token_loss_kernel", dtype, variant, variant == 2, *big)
        for dtype in ("bf16", "fp32")
        for variant in (0, 1, 2)
    ]
    out.append(Spec("_token_loss_kernel", "bf16", 1, False, *_launch_config(1)))
    return out


def _jit_function():
    """The kernel as a JITFunction, also when TRITON_INTERPRET=1 made it an interpreted one."""
    from triton.runtime.jit import JITFunction

    from kernels import triton_loss

    kernel = triton_loss._token_loss_kernel
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _signature(spec: Spec) -> tuple[dict, dict]:
    sig = {
        "z_ptr": f"*{spec.logits}", "r_ptr": f"*{spec.logits}", "g_ptr": f"*{spec.logits}",
        "z_stride": "i32", "r_stride": "i32", "g_stride": "i32",
        "offsets_ptr": "*i64", "target_ptr": "*i64", "weight_ptr": "*fp32", "behavior_ptr": "*fp32",
        "kl_weight_ptr": "*fp32", "row_loss_ptr": "*fp32", "kl_ptr": "*fp32",
        "row_a_ptr": "*fp32", "row_exact_ptr": "*fp32", "row_c_ptr": "*fp32",
        "row_max_ptr": "*fp32", "row_logsum_ptr": "*fp32",
        "V": "i32", "inv_rows": "fp32", "clip_eps": "fp32",
        "VARIANT": "constexpr", "HAS_BEHAVIOR": "constexpr", "BLOCK_V": "constexpr",
    }  # fmt: skip
    constexprs = {"VARIANT": spec.variant, "HAS_BEHAVIOR": spec.has_behavior, "BLOCK_V": spec.block_v}
    return sig, constexprs


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas -v printed no register/spill line:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_one(spec: Spec, arch: int) -> Compiled:
    """Compile one specialization for one architecture; errors are returned, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs = _signature(spec)
    pointer_args = [i for i, (k, v) in enumerate(sig.items()) if v.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_args}  # torch allocations are 16-aligned
    try:
        src = ASTSource(fn=_jit_function(), signature=sig, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps, "num_stages": 1}
        )
        regs, stores, loads = _ptxas_usage(compiled.asm["ptx"], arch)
        return Compiled(arch, spec, regs, stores, loads, compiled.metadata.shared)
    except Exception as e:  # noqa: BLE001 - reported per kernel, the caller decides
        return Compiled(arch, spec, -1, -1, -1, -1, error=f"{type(e).__name__}: {e}")


def compile_all(archs: tuple[int, ...] = ARCHS) -> list[Compiled]:
    return [compile_one(spec, arch) for arch in archs for spec in specs()]


def format_table(results: list[Compiled]) -> str:
    lines = [f"{'arch':>6} {'kernel':<20} {'logits':<6} {'variant':>7} {'behav':>5} {'BLOCK_V':>7} "
             f"{'warps':>5} {'regs':>5} {'spill st/ld B':>14} {'smem B':>7}  status"]  # fmt: skip
    for r in results:
        s = r.spec
        status = "ok" if not r.error else "FAILED: " + r.error.splitlines()[0][:200]
        lines.append(
            f"sm_{r.arch:<3} {s.kernel:<20} {s.logits:<6} {s.variant:>7} {s.has_behavior!s:>5} {s.block_v:>7} "
            f"{s.num_warps:>5} {r.registers:>5} {f'{r.spill_stores}/{r.spill_loads}':>14} {r.shared:>7}  {status}"
        )
    return "\n".join(lines)


def compile_isolated(archs: tuple[int, ...], cache_dir: str, timeout: float = 900) -> list[Compiled]:
    """compile_all in a child process without TRITON_INTERPRET, with `cache_dir` as its Triton
    cache (pass an empty folder: nothing from an earlier run can stand in for a compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache_dir
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [sys.executable, "-m", "kernels.aot", "--json"] + [f"--arch={a}" for a in archs]
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        raise RuntimeError(f"python -m kernels.aot exited {done.returncode}:\n{done.stderr[-4000:]}")
    return [_from_json(json.loads(line)) for line in done.stdout.splitlines() if line.startswith("{")]


def _from_json(d: dict) -> Compiled:
    return Compiled(**{**d, "spec": Spec(**d["spec"])})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability (default: 80 and 90)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels.aot: TRITON_INTERPRET=1 is set; the compiler needs it unset", file=sys.stderr)
        return 2
    results = compile_all(tuple(args.arch) if args.arch else ARCHS)
    if args.json:
        for r in results:
            print(json.dumps(dataclasses.asdict(r)))
    else:
        print(format_table(results))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
