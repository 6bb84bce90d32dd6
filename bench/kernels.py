"""Kernel benchmarks: forward + backward time and peak memory of the loss, against plain PyTorch
measured in the same run.

Two paths, each at several sizes (unlikelihood variant, beta = 0.1, about one annotation row per
four positions plus a replacement row for half of them, KL over every position):
- fused-linear: hidden [N, H] and lm_head [V, H] (policy and reference) -> loss, gradients of
  hidden and lm_head. The project's path on CPU is `kernels.fused_linear_token_loss(backend="cpu")`,
  on CUDA the Triton back end.
- logits: logits [N, V] and reference logits -> loss, gradient of the logits.

Baseline: plain PyTorch in eager mode (materialized fp32 logits, log_softmax of both heads,
gather, elementwise KL, autograd), and the same function under torch.compile where it compiles.
On a GPU also Liger Kernel and cut-cross-entropy when installed, on their nearest equivalents
(fused linear cross entropy, Liger's fused linear JSD against a teacher head): they compute less
than our loss (no full-vocabulary KL, or no weighted rows), so their figures bound ours from below.

How it is measured:
- time: wall time of forward + backward (CUDA: synchronized), median of repeats after a warm-up
  run of each (which also compiles torch.compile). All implementations of one size run in one
  process, interleaved round by round, so that changes in machine load hit them alike; the
  process CPU time is recorded next to the wall time.
- peak memory, CPU: every case runs in a fresh subprocess. The process's peak resident set
  (VmHWM in /proc/self/status) is reset by writing 5 to /proc/self/clear_refs just before the
  measured forward + backward, and the figure is VmHWM minus the resident set just before (inputs
  already allocated; the gradients returned count, like every temporary). glibc keeps freed
  small blocks and would hide them, so these subprocesses run with MALLOC_MMAP_THRESHOLD_=65536:
  every block of 64 KiB or more is its own mapping, returned to the system when freed, so the
  resident set follows live memory. Timing runs in another subprocess with the default malloc.
- peak memory, CUDA: torch.cuda.max_memory_allocated above the allocation before the run.

Ratios are against the eager baseline of the same size: time ratio < 1 is faster, memory ratio
< 1 is smaller. Every timed case also gets its achieved rates against the device's, measured on
the same device (CPU or GPU) at the start and at the end of the run, the better of the two:
FLOP/s (fused-linear: 8 N H V for our loss, policy and reference logits, grad hidden, grad W;
6 N H V for the cross-entropy-only baselines, which have no reference head) as a share of a
measured matmul of the case's dtype, and bytes moved per second (what the loss must read and
write at least: logits path 5 N V elements; fused-linear path the inputs once and their
gradients once, 3 (N H + V H) elements) as a share of a measured copy.

    python -m bench --only kernels [--quick]
    python -m bench.kernels [--quick]        # also writes bench/results/kernels.json and a PNG plot
    python -m bench.kernels --n 1024,4096,16384 --v 32000,128256 --h 2048,4096 --dtype bf16,fp32 \
        --backends ours,eager,compile,liger,cce [--path fused,logits] [--repeats 3] [--out FILE.json]

Back ends: ours (the Triton kernel on CUDA, kernels/cpu.py elsewhere), eager (plain PyTorch),
compile (the same under torch.compile), liger (Liger Kernel's fused linear cross entropy and
JSD), cce (cut-cross-entropy). The last two need CUDA and their packages; without them the run
says so and goes on without their columns.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BETA = 0.1
VARIANT = "unlikelihood"

# (N, V, H) for fused-linear, (N, V) for logits; H is ignored for logits
CPU_FUSED = [(1024, 50257, 768), (2048, 50257, 768), (4096, 50257, 768)]
CPU_FUSED_QUICK = [(4096, 50257, 768)]
CPU_LOGITS = [(1024, 50257), (4096, 50257)]
CPU_LOGITS_QUICK = [(1024, 50257)]
GPU_FUSED = [(n, v, h) for h in (768, 2048) for v in (32000, 50257, 128256) for n in (1024, 4096, 8192)]
GPU_FUSED_QUICK = [(n, 128256, 2048) for n in (1024, 4096)]
GPU_LOGITS = [(n, v) for v in (32000, 50257, 128256) for n in (1024, 4096, 8192)]
GPU_LOGITS_QUICK = [(n, 128256) for n in (1024, 4096)]


# ---- inputs and implementations ----------------------------------------------------------------


def make_inputs(path: str, n: int, v: int, h: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Random inputs of one case; the policy tensors require grad."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    rows = torch.arange(0, n, 4, device=device)  # (R0,) one annotated token every 4 positions
    index = torch.cat([rows, rows[::2]])  # (R,) plus a replacement row for every other one
    targets = torch.randint(0, v, index.shape, generator=g, device=device)
    weights = torch.where(torch.arange(index.numel(), device=device) % 3 == 0, -1.0, 1.0)
    weights[rows.numel() :] = 1.0  # replacements are good tokens
    inputs = dict(row_index=index, targets=targets, weights=weights)
    if path == "fused":
        inputs.update(
            hidden=randn(n, h).requires_grad_(),
            weight=randn(v, h, scale=h**-0.5).requires_grad_(),
            ref_hidden=randn(n, h),
            ref_weight=randn(v, h, scale=h**-0.5),
        )
    else:
        inputs.update(logits=randn(n, v, scale=2.0).requires_grad_(), ref_logits=randn(n, v, scale=2.0))
    return inputs


def plain_loss(logits, ref_logits, row_index, targets, weights):
    """The loss as one would write it in PyTorch: fp32 log-softmax of both, gather, KL."""
    logp = torch.log_softmax(logits.float(), -1)  # (N, V)
    logq = torch.log_softmax(ref_logits.float(), -1)  # (N, V)
    lp = logp[row_index, targets]  # (R,)
    rows = torch.where(weights >= 0, -weights * lp, weights * torch.log1p(-lp.exp()))
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (N,)
    return rows.mean() + BETA * kl.mean()


def plain_fused(hidden, weight, ref_hidden, ref_weight, row_index, targets, weights):
    logits = hidden @ weight.T  # (N, V)
    with torch.no_grad():
        ref_logits = ref_hidden @ ref_weight.T  # (N, V)
    return plain_loss(logits, ref_logits, row_index, targets, weights)


def ours_fused(backend):
    from kernels import fused_linear_token_loss

    def f(hidden, weight, ref_hidden, ref_weight, row_index, targets, weights):
        return fused_linear_token_loss(hidden, weight, ref_hidden, ref_weight, row_index, targets, weights,
                                       beta=BETA, variant=VARIANT, backend=backend)  # fmt: skip

    return f


def ours_logits(backend):
    from kernels import token_loss

    def f(logits, ref_logits, row_index, targets, weights):
        return token_loss(logits, ref_logits, row_index, targets, weights, beta=BETA, variant=VARIANT, backend=backend)

    return f


def liger_fused(kind):
    """Liger Kernel's nearest equivalents (cross entropy; JSD against the reference head)."""
    if kind == "flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss()
        return lambda hidden, weight, ref_hidden, ref_weight, row_index, targets, weights: ce(
            weight, hidden, torch.randint(0, weight.shape[0], (hidden.shape[0],), device=hidden.device)
        )
    from liger_kernel.transformers import LigerFusedLinearJSDLoss

    jsd = LigerFusedLinearJSDLoss()
    return lambda hidden, weight, ref_hidden, ref_weight, row_index, targets, weights: jsd(
        hidden, weight, ref_hidden, ref_weight
    )


def cce_fused(hidden, weight, ref_hidden, ref_weight, row_index, targets, weights):
    """cut-cross-entropy's linear_cross_entropy (cross entropy only, every position a label)."""
    from cut_cross_entropy import linear_cross_entropy

    labels = torch.randint(0, weight.shape[0], (hidden.shape[0],), device=hidden.device)
    return linear_cross_entropy(hidden, weight, labels)


def implementation(name: str, path: str):
    plain = plain_fused if path == "fused" else plain_loss
    if name == "plain":
        return plain
    if name == "compiled":
        return torch.compile(plain, dynamic=False)
    if name in ("cpu", "triton"):
        return ours_fused(name) if path == "fused" else ours_logits(name)
    if name in ("liger_flce", "liger_jsd"):
        return liger_fused(name.removeprefix("liger_"))
    if name == "cce":
        return cce_fused
    raise ValueError(f"implementation: unknown {name!r}")


# ---- measuring one case --------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _step(fn, inputs: dict) -> None:
    """One forward + backward, then drop the gradients (they are counted, then freed)."""
    loss = fn(**inputs)
    loss.backward()
    for t in inputs.values():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_memory(spec: dict) -> dict:
    """Peak memory of one forward + backward of one implementation; spec: path, impl, n, v, h,
    dtype, device. On CPU this wants a fresh process (see the module docstring)."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    inputs = make_inputs(spec["path"], spec["n"], spec["v"], spec["h"], dtype, device)
    fn = implementation(spec["impl"], spec["path"])
    if spec["impl"] in ("compiled", "cpu") or device == "cuda":
        _step(fn, inputs)  # warm-up: compiles (ours on CPU compiles its passes too), loads kernels
    gc.collect()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _step(fn, inputs)
        _sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before}
    before = _proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    _step(fn, inputs)
    return {"peak_bytes": _proc_status_bytes("VmHWM") - before}


def measure_times(spec: dict) -> dict:
    """Forward + backward wall time of several implementations on the same inputs, interleaved
    (one round runs each once) so that a change in machine load hits all of them alike.
    spec: path, n, v, h, dtype, device, impls, repeats. Returns {impl: {seconds, ...}}."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    inputs = make_inputs(spec["path"], spec["n"], spec["v"], spec["h"], dtype, device)
    fns, out, first = {}, {}, {}
    for impl in spec["impls"]:
        try:
            fns[impl] = implementation(impl, spec["path"])
            start = time.perf_counter()
            _step(fns[impl], inputs)  # warm-up; compiles what compiles (compiled, ours on CPU)
            _sync(device)
            first[impl] = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - e.g. torch.compile failing: record, time the others
            out[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            fns.pop(impl, None)
    walls = {impl: [] for impl in fns}
    cpus = {impl: [] for impl in fns}
    for _ in range(spec["repeats"]):
        for impl, fn in fns.items():
            gc.collect()
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(fn, inputs)
            _sync(device)
            walls[impl].append(time.perf_counter() - start)
            cpus[impl].append(time.process_time() - start_cpu)
    for impl in fns:
        out[impl] = {"seconds": statistics.median(walls[impl]), "seconds_all": walls[impl],
                     "cpu_seconds": statistics.median(cpus[impl]), "first_call_seconds": first[impl]}  # fmt: skip
    return out


def measure(spec: dict) -> dict:
    return measure_memory(spec) if spec["what"] == "memory" else measure_times(spec)


def measure_in_subprocess(spec: dict, env: dict | None = None, timeout: float = 1800) -> dict:
    """measure(spec) in a fresh `python -m bench.kernels --case`; errors come back as {'error': ...}."""
    cmd = [sys.executable, "-m", "bench.kernels", "--case", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})})  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def measure_group(group: dict, impls: list[str], repeats: int) -> list[dict]:
    """Every implementation at one size: memory one by one (fresh processes on CPU), then time
    interleaved in one process."""
    results = []
    cpu = group["device"] == "cpu"
    for impl in impls:
        spec = {**group, "impl": impl, "what": "memory"}
        if cpu:  # every block >= 64 KiB mmapped: freed memory leaves the resident set at once
            got = measure_in_subprocess(spec, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
        else:
            try:
                got = measure_memory(spec)
            except Exception as e:  # noqa: BLE001 - e.g. a baseline out of memory
                got = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            torch.cuda.empty_cache()
        results.append({**group, "impl": impl, **got})
    spec = {**group, "impls": impls, "repeats": repeats, "what": "time"}
    times = measure_in_subprocess(spec) if cpu else measure_times(spec)
    for r in results:
        got = times.get(r["impl"], {"error": times.get("error", "not timed")})
        if "error" in got and "error" in r:
            got = {"error": r["error"] + "; " + got["error"]}
        r.update(got)
    return results


# ---- device peaks ----------------------------------------------------------------------------------


def device_peaks(device: str, dtypes: list[str]) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and matmul rate (FLOP/s) per
    dtype, on `device`: the best of several runs of a large copy and a square matmul (GPU: 1 GiB,
    8192^2; CPU: 256 MiB, 2048^2, with the threads torch uses)."""
    gpu = device == "cuda"
    elements, size, repeats = (2**28, 8192, 10) if gpu else (2**26, 2048, 3)
    x = torch.empty(elements, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)

    def best(f):
        f()
        _sync(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            _sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    copy_s = best(lambda: y.copy_(x))
    peaks = {"copy_bytes_per_s": 2 * elements * 4 / copy_s, "matmul_flop_per_s": {}}
    x = y = None  # free the copy buffers before the matmuls
    for name in dtypes:
        a = torch.randn(size, size, device=device).to(getattr(torch, name))
        b = torch.randn(size, size, device=device).to(getattr(torch, name))
        peaks["matmul_flop_per_s"][name] = 2 * size**3 / best(lambda a=a, b=b: a @ b)
    return peaks


# FLOPs of one forward + backward at (N, H, V), fused-linear path: our loss and the plain one do
# the policy and reference logits, grad hidden and grad W (4 matmuls of 2 N H V); the
# cross-entropy-only baselines have no reference head (3 of them); Liger's JSD has both heads.
FUSED_MATMULS = {"plain": 4, "compiled": 4, "cpu": 4, "triton": 4, "liger_jsd": 4, "liger_flce": 3, "cce": 3}


# ---- the whole run ---------------------------------------------------------------------------------


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan(quick: bool, device: str) -> tuple[list[tuple[dict, list[str]]], int]:
    """The sizes, each with the implementations to run there, and the timing repeats."""
    groups = []
    if device == "cuda":
        dtype, repeats = "bfloat16", 5
        fused, logits = (GPU_FUSED_QUICK, GPU_LOGITS_QUICK) if quick else (GPU_FUSED, GPU_LOGITS)
        ours = "triton"
        extra = (["liger_flce", "liger_jsd"] if _installed("liger_kernel") else []) + (
            ["cce"] if _installed("cut_cross_entropy") else []
        )
    else:
        dtype, repeats = "float32", 2 if quick else 3
        fused, logits = (CPU_FUSED_QUICK, CPU_LOGITS_QUICK) if quick else (CPU_FUSED, CPU_LOGITS)
        ours, extra = "cpu", []
    for n, v, h in fused:
        groups.append((dict(path="fused", n=n, v=v, h=h, dtype=dtype, device=device), ["plain", "compiled", ours, *extra]))
    for n, v in logits:
        groups.append((dict(path="logits", n=n, v=v, h=0, dtype=dtype, device=device), ["plain", "compiled", ours]))
    return groups, repeats


def add_ratios(results: list[dict], peaks: dict | None) -> None:
    """time_ratio and memory_ratio against the eager baseline of the same size (same dtype);
    achieved FLOP/s and bytes/s with their shares of the device's measured rates."""
    base = {(r["path"], r["n"], r["v"], r["h"], r["dtype"]): r for r in results if r["impl"] == "plain"}
    for r in results:
        b = base.get((r["path"], r["n"], r["v"], r["h"], r["dtype"]))
        if b and "seconds" in r and "seconds" in b:
            r["time_ratio"] = round(r["seconds"] / b["seconds"], 3)
        if b and "peak_bytes" in r and b.get("peak_bytes"):
            r["memory_ratio"] = round(r["peak_bytes"] / b["peak_bytes"], 3)
        if not peaks or "seconds" not in r:
            continue
        itemsize = torch.finfo(getattr(torch, r["dtype"])).bits // 8
        n, v, h = r["n"], r["v"], r["h"]
        if r["path"] == "logits":
            moved = 5 * n * v * itemsize
        else:
            moved = 3 * (n * h + v * h) * itemsize
            r["flop_per_s"] = FUSED_MATMULS.get(r["impl"], 4) * 2 * n * h * v / r["seconds"]
            rate = peaks["matmul_flop_per_s"].get(r["dtype"])
            if rate:
                r["share_of_matmul"] = round(r["flop_per_s"] / rate, 3)
        r["bytes_per_s"] = moved / r["seconds"]
        r["share_of_copy"] = round(r["bytes_per_s"] / peaks["copy_bytes_per_s"], 3)


DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}
BACKENDS = ("ours", "eager", "compile", "liger", "cce")


def _peaks_line(what: str, peaks: dict) -> str:
    rates = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks["matmul_flop_per_s"].items())
    return f"{what}: copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s; matmul {rates}"


def custom_plan(device: str, ns: list[int], vs: list[int], hs: list[int], dtypes: list[str], backends: list[str],
                paths: list[str]) -> tuple[list[tuple[dict, list[str]]], list[str]]:
    """Every (path, dtype, V, H, N) asked for, with the back ends that can run here; also the
    lines saying which were skipped and why."""
    impls, skipped = [], []
    for name in backends:
        if name == "ours":
            impls.append("triton" if device == "cuda" else "cpu")
        elif name == "eager":
            impls.append("plain")
        elif name == "compile":
            impls.append("compiled")
        else:
            module, extra, made = {"liger": ("liger_kernel", "liger-kernel", ["liger_flce", "liger_jsd"]),
                                   "cce": ("cut_cross_entropy", "cut-cross-entropy", ["cce"])}[name]
            if device != "cuda":
                skipped.append(f"{name}: skipped, it needs CUDA and this run is on {device}")
            elif not _installed(module):
                skipped.append(f"{name}: skipped, {module} is not installed (pip install {extra})")
            else:
                impls += made
    if "plain" not in impls:
        impls.insert(0, "plain")  # the baseline of every ratio
        skipped.append("eager: added, every ratio is against it")
    groups = []
    for path in paths:
        for dtype in dtypes:
            for v in vs:
                for h in (hs if path == "fused" else [0]):
                    for n in ns:
                        here = [i for i in impls if path == "fused" or i in ("plain", "compiled", "cpu", "triton")]
                        groups.append((dict(path=path, n=n, v=v, h=h, dtype=dtype, device=device), here))
    return groups, skipped


def run(quick: bool, groups: list[tuple[dict, list[str]]] | None = None, repeats: int | None = None,
        device: str | None = None, plot_path: Path = RESULTS / "kernels.png") -> dict:
    """Measure `groups` (default: the plan for `quick`), print a table, plot; returns the summary."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if groups is None:
        groups, default_repeats = plan(quick, device)
        repeats = repeats or default_repeats
    repeats = repeats or 3
    dtypes = sorted({g["dtype"] for g, _ in groups})
    peaks = device_peaks(device, dtypes)
    print(_peaks_line("device peaks at the start", peaks), flush=True)
    results = []
    load_before = os.getloadavg()[0]
    for group, impls in groups:
        got = measure_group(group, impls, repeats)
        add_ratios(got, peaks)
        results += got
        for r in got:
            print(_row(r), flush=True)
    # Measured again at the end; the better of the two is the device's rate (on a shared machine
    # a single measurement can catch a busy moment and make every share look too good).
    again = device_peaks(device, dtypes)
    print(_peaks_line("device peaks at the end", again), flush=True)
    peaks = {"copy_bytes_per_s": max(peaks["copy_bytes_per_s"], again["copy_bytes_per_s"]),
             "matmul_flop_per_s": {k: max(v, again["matmul_flop_per_s"][k]) for k, v in peaks["matmul_flop_per_s"].items()}}
    add_ratios(results, peaks)
    summary = {
        "device": device,
        "threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "beta": BETA,
        "variant": VARIANT,
        "device_peaks": peaks,
        "cases": results,
    }
    print()
    print(format_table(results))
    firsts = [f"{r['impl']} {r['first_call_seconds']:.1f} s" for r in results if "first_call_seconds" in r]
    print("first call of each (compiling included; the table is steady state): " + ", ".join(firsts))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(summary, plot_path)
    print(f"plot: {plot_path}")
    target = done_when(results)
    if target:
        summary["done_when_cpu_fused_4096_50257_768"] = target
        print(f"\nCPU fused-linear N=4096 V=50257 H=768: memory {target['memory_ratio']}x of eager PyTorch, "
              f"time {target['time_vs_compile']}x of torch.compile (target: <= 0.25x memory, <= 1.0x time: "
              f"{'met' if target['met'] else 'not met'})")  # fmt: skip
    return summary


def done_when(results: list[dict]) -> dict | None:
    """The CPU target: ours at N=4096 V=50257 H=768 (fp32 fused-linear) no slower than torch.compile
    of the plain loss, in at most a quarter of eager PyTorch's peak memory."""
    key = ("fused", 4096, 50257, 768, "float32")
    at = {r["impl"]: r for r in results if (r["path"], r["n"], r["v"], r["h"], r["dtype"]) == key}
    ours, compiled = at.get("cpu", {}), at.get("compiled", {})
    if "memory_ratio" not in ours or "seconds" not in ours or "seconds" not in compiled:
        return None
    vs_compile = round(ours["seconds"] / compiled["seconds"], 3)
    return {
        "memory_ratio": ours["memory_ratio"],
        "time_ratio": ours.get("time_ratio"),
        "time_vs_compile": vs_compile,
        "met": ours["memory_ratio"] <= 0.25 and vs_compile <= 1.0,
    }


def _row(r: dict) -> str:
    t = f"{r['seconds'] * 1e3:10.1f}" if "seconds" in r else f"{'-':>10}"
    m = f"{r['peak_bytes'] / 2**20:10.0f}" if "peak_bytes" in r else f"{'-':>10}"
    tr = f"{r['time_ratio']:7.2f}" if "time_ratio" in r else f"{'':>7}"
    mr = f"{r['memory_ratio']:7.3f}" if "memory_ratio" in r else f"{'':>7}"
    flops = f"{r['flop_per_s'] / 1e9:9.1f}" if "flop_per_s" in r else f"{'':>9}"
    mm = f"{r['share_of_matmul']:6.0%}" if "share_of_matmul" in r else f"{'':>6}"
    gbs = f"{r['bytes_per_s'] / 1e9:8.2f}" if "bytes_per_s" in r else f"{'':>8}"
    bw = f"{r['share_of_copy']:6.0%}" if "share_of_copy" in r else f"{'':>6}"
    err = f"  ERROR {r['error']}" if "error" in r else ""
    return (f"{r['path']:<7}{r['impl']:<11}{r['n']:>6}{r['v']:>8}{r['h']:>6} {r['dtype']:<9}"
            f"{t}{m}{tr}{mr}{flops}{mm}{gbs}{bw}{err}")  # fmt: skip


def format_table(results: list[dict]) -> str:
    head = (f"{'path':<7}{'impl':<11}{'N':>6}{'V':>8}{'H':>6} {'dtype':<9}{'ms':>10}{'peak MiB':>10}"
            f"{'time x':>7}{'mem x':>7}{'GFLOP/s':>9}{'of mm':>6}{'GB/s':>8}{'of bw':>6}")
    return "\n".join([head, *(_row(r) for r in results)])


def plot(summary: dict, path: Path) -> None:
    """Time and peak memory against N, one line per implementation, per path and (V, H)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [r for r in summary["cases"] if "seconds" in r]
    groups = sorted({(r["path"], r["v"], r["h"], r["dtype"]) for r in cases})
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False)
    for row, (p, v, h, dtype) in enumerate(groups):
        for impl in sorted({r["impl"] for r in cases if (r["path"], r["v"], r["h"], r["dtype"]) == (p, v, h, dtype)}):
            pts = sorted((r["n"], r["seconds"], r.get("peak_bytes")) for r in cases
                         if (r["path"], r["v"], r["h"], r["dtype"], r["impl"]) == (p, v, h, dtype, impl))  # fmt: skip
            axes[row][0].plot([q[0] for q in pts], [q[1] * 1e3 for q in pts], marker="o", label=impl)
            mem = [q for q in pts if q[2] is not None]
            axes[row][1].plot([q[0] for q in mem], [q[2] / 2**20 for q in mem], marker="o", label=impl)
        title = f"{p} V={v}" + (f" H={h}" if p == "fused" else "") + f" {dtype} ({summary['device']})"
        for col, label in enumerate(("fwd+bwd ms", "peak extra MiB")):
            axes[row][col].set(title=title, xlabel="N (positions)", ylabel=label)
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(choices) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip().lower() for x in text.split(",") if x.strip()]
        unknown = [x for x in names if x not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(choices)}")
        return names

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the done-when size only (CPU), two sizes (GPU)")
    parser.add_argument("--n", type=_ints, help="positions N, comma-separated (e.g. 1024,4096,16384)")
    parser.add_argument("--v", type=_ints, help="vocabulary sizes V (default 50257)")
    parser.add_argument("--h", type=_ints, help="hidden sizes H of the fused-linear path (default 768)")
    parser.add_argument("--dtype", type=_names(tuple(DTYPES)), help="bf16, fp16, fp32 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--backends", type=_names(BACKENDS), help=f"from {', '.join(BACKENDS)} (default all)")
    parser.add_argument("--path", type=_names(("fused", "logits")), help="fused (default), logits, or both")
    parser.add_argument("--repeats", type=int, help="timed runs per case, median reported (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels.json", help="JSON results (%(default)s)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case, print JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure(json.loads(args.case))))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    groups = None
    if any(x is not None for x in (args.n, args.v, args.h, args.dtype, args.backends, args.path)):
        dtypes = [DTYPES[d] for d in (args.dtype or (["bf16"] if device == "cuda" else ["fp32"]))]
        groups, skipped = custom_plan(device, args.n or [4096], args.v or [50257], args.h or [768],
                                      list(dict.fromkeys(dtypes)), args.backends or list(BACKENDS),
                                      args.path or ["fused"])
        for line in skipped:
            print(line, flush=True)
    summary = run(args.quick, groups, args.repeats, device, args.out.with_suffix(".png"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
