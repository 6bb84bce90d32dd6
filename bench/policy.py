"""Policy server throughput: tokens/s at 1, 4 and 16 concurrent streams, in-process and over gRPC.

Two ways to drive the same engine on the demo model, measured in one run, one after the other
(never at the same time, so they don't share the CPU; the two ways alternate run by run):
- in-process: `Engine.generate` from an asyncio loop in this process (the baseline: no transport);
- gRPC: the real server as a subprocess (`python -m policy_server`), N concurrent Generate streams
  from a grpc.aio client.
Every stream samples a fixed number of tokens (stop_on_eos off, seeded), so both ways do the
same work. Figures: aggregate tokens/s (all streams' tokens / wall time, the best run of each),
scaling vs 1 stream, gRPC/in-process as a ratio (1.0 = no transport overhead), and CPU time per
token (in-process: this process; gRPC: server + client processes), which a shared machine
disturbs less than wall-clock time. Time to the first token is reported too.

    python -m bench --only policy [--quick]
    python -m bench.policy --model PATH [--quick]      # the same on any model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "data" / "demo-model"
PROMPTS = ["Ottawa is the capital of", "Paris is the capital of", "The capital of Japan is", "Berlin is"]
STREAMS = (1, 4, 16)


def _params(pb_or_api, new_tokens: int, seed: int):
    return pb_or_api(max_new_tokens=new_tokens, seed=seed, temperature=1.0, stop_on_eos=False)


async def _in_process(engine, streams: int, new_tokens: int) -> tuple[float, float, int]:
    """(seconds, mean time to first token, tokens) for `streams` concurrent generations."""
    from policy_server.api import GenerateRequest, TokenEvent
    from policy_server.sampling import SamplingParams

    async def one(i: int) -> tuple[float, int]:
        request = GenerateRequest(prompt_text=PROMPTS[i % len(PROMPTS)],
                                  params=_params(SamplingParams, new_tokens, seed=i))
        first, count = None, 0
        async for event in engine.generate(request):
            if isinstance(event, TokenEvent):
                count += 1
                first = first or time.perf_counter()
        return first, count

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(streams)))
    seconds = time.perf_counter() - start
    return seconds, statistics.mean(f - start for f, _ in results), sum(c for _, c in results)


async def _over_grpc(address: str, streams: int, new_tokens: int) -> tuple[float, float, int]:
    import grpc

    import tokenfeedback.v1.policy_pb2 as pb
    import tokenfeedback.v1.policy_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PolicyServiceStub(channel)
        await stub.GetModelInfo(pb.GetModelInfoRequest())  # connection up before the clock starts

        async def one(i: int) -> tuple[float, int]:
            request = pb.GenerateRequest(prompt_text=PROMPTS[i % len(PROMPTS)],
                                         params=_params(pb.SamplingParams, new_tokens, seed=i))
            first, count = None, 0
            async for event in stub.Generate(request):
                if event.WhichOneof("event") == "token":
                    count += 1
                    first = first or time.perf_counter()
            return first, count

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(streams)))
        seconds = time.perf_counter() - start
    return seconds, statistics.mean(f - start for f, _ in results), sum(c for _, c in results)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(measure, pids: tuple[int, ...] = ()) -> tuple[float, float, int, float]:
    """(seconds, first token s, tokens, CPU seconds of this process and of `pids`) of one run."""
    cpu = _own_cpu() + sum(_process_cpu(p) for p in pids)
    seconds, first, tokens = asyncio.run(measure())
    return seconds, first, tokens, _own_cpu() + sum(_process_cpu(p) for p in pids) - cpu


def _summary(runs: list[tuple[float, float, int, float]]) -> dict:
    """Wall clock: the fastest run (on a shared machine the minimum is the least disturbed run).
    CPU: all runs' CPU seconds over all their tokens (what load on the machine changes least)."""
    seconds, first, tokens, _ = min(runs, key=lambda r: r[0])
    cpu_per_token = sum(r[3] for r in runs) / sum(r[2] for r in runs)
    return {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
            "first_token_ms": round(first * 1000, 2), "cpu_ms_per_token": round(cpu_per_token * 1000, 3),
            "runs": len(runs)}


def run(quick: bool = False, model: str | Path = DEFAULT_MODEL, device: str = "auto") -> dict:
    from common.process import start_server
    from policy_server.engine import Engine, EngineConfig

    model = str(model)
    if not Path(model).exists() and model == str(DEFAULT_MODEL):
        raise FileNotFoundError(f"{model} is missing: build it with `make model`")
    repeats = 3 if quick else 7
    engine = Engine.load(EngineConfig(model=model, device=device, max_batch=max(STREAMS)))
    # Tokens per stream: as many as the model's context allows after the longest prompt, at most 64.
    longest = max(len(engine.tokenizer(p)["input_ids"]) for p in PROMPTS)
    new_tokens = min(16 if quick else 64, engine.max_length - longest)
    info = engine.model_info()
    runs: dict[tuple[str, int], list] = {(way, n): [] for way in ("in_process", "grpc") for n in STREAMS}
    engine.start()
    try:
        with start_server("policy_server", ["--model", model, "--port", "0", "--device", device,
                                            "--max-batch", str(max(STREAMS))], name="policy", cwd=ROOT) as server:
            asyncio.run(_in_process(engine, 2, 4))  # warm-up both
            asyncio.run(_over_grpc(server.address, 2, 4))
            # Alternate the two ways run by run, so that a change in the machine's load hits both.
            for _ in range(repeats):
                for n in STREAMS:
                    runs["in_process", n].append(_timed(lambda n=n: _in_process(engine, n, new_tokens)))
                    runs["grpc", n].append(_timed(lambda n=n: _over_grpc(server.address, n, new_tokens),
                                                  (server.proc.pid,)))
    finally:
        asyncio.run(engine.close())

    rows = []
    for n in STREAMS:
        local, remote = _summary(runs["in_process", n]), _summary(runs["grpc", n])
        rows.append({"streams": n, "in_process": local, "grpc": remote,
                     "grpc_vs_in_process": round(remote["tokens_per_s"] / local["tokens_per_s"], 3),
                     "grpc_cpu_vs_in_process": round(remote["cpu_ms_per_token"] / local["cpu_ms_per_token"], 3)})
    for row in rows:
        row["scaling_in_process"] = round(row["in_process"]["tokens_per_s"] / rows[0]["in_process"]["tokens_per_s"], 2)
        row["scaling_grpc"] = round(row["grpc"]["tokens_per_s"] / rows[0]["grpc"]["tokens_per_s"], 2)
    print(f"policy: {info.model_name} ({info.dtype} on {info.device}, {info.parameter_bytes / 1e6:.1f} MB), "
          f"{new_tokens} tokens per stream, best of {repeats}")
    print(f"{'streams':>7} {'in-proc tok/s':>13} {'gRPC tok/s':>10} {'gRPC/in-proc':>12} {'scale in-proc':>13} "
          f"{'scale gRPC':>10} {'CPU ms/tok in-proc':>18} {'gRPC':>6} {'CPU gRPC/in-proc':>16} {'1st tok ms gRPC':>15}")
    for r in rows:
        local, remote = r["in_process"], r["grpc"]
        print(f"{r['streams']:>7} {local['tokens_per_s']:>13.1f} {remote['tokens_per_s']:>10.1f} "
              f"{r['grpc_vs_in_process']:>12.3f} {r['scaling_in_process']:>13.2f} {r['scaling_grpc']:>10.2f} "
              f"{local['cpu_ms_per_token']:>18.3f} {remote['cpu_ms_per_token']:>6.3f} "
              f"{r['grpc_cpu_vs_in_process']:>16.3f} {remote['first_token_ms']:>15.1f}")
    return {"model": info.model_name, "dtype": info.dtype, "device": info.device,
            "tokens_per_stream": new_tokens, "repeats": repeats, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.model, args.device), indent=2))


if __name__ == "__main__":
    main()
