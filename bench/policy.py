"""Policy server throughput: tokens/s at 1, 4 and 16 concurrent streams, in-process and over gRPC.

Two ways to drive the same engine on the demo model, measured in one run, one after the other
(never at the same time, so they don't share the CPU):
- in-process: `Engine.generate` from an asyncio loop in this process (the baseline: no transport);
- gRPC: the real server as a subprocess (`python -m policy_server`), N concurrent Generate streams
  from a grpc.aio client.
Every stream samples a fixed number of tokens (stop_on_eos off, seeded), so both ways do the
same work. Figures: aggregate tokens/s (all streams' tokens / wall time, best of the repeats),
scaling vs 1 stream, and gRPC/in-process as a ratio (1.0 = no transport overhead). Time to the
first token is reported too.

    python -m bench --only policy [--quick]
    python -m bench.policy --model PATH [--quick]      # the same on any model
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def _best(measure, repeats: int) -> dict:
    """Run `measure()` (a coroutine factory) `repeats` times; keep the fastest run."""
    runs = [asyncio.run(measure()) for _ in range(repeats)]
    seconds, first, tokens = min(runs, key=lambda r: r[0])
    return {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
            "first_token_ms": round(first * 1000, 2)}


def _measure_in_process(engine, new_tokens: int, repeats: int) -> dict[int, dict]:
    engine.start()
    try:
        asyncio.run(_in_process(engine, 2, 4))  # warm-up
        return {n: _best(lambda n=n: _in_process(engine, n, new_tokens), repeats) for n in STREAMS}
    finally:
        asyncio.run(engine.close())


def run(quick: bool = False, model: str | Path = DEFAULT_MODEL, device: str = "auto") -> dict:
    from common.process import start_server
    from policy_server.engine import Engine, EngineConfig

    model = str(model)
    if not Path(model).exists() and model == str(DEFAULT_MODEL):
        raise FileNotFoundError(f"{model} is missing: build it with `make model`")
    repeats = 2 if quick else 3
    config = EngineConfig(model=model, device=device, max_batch=max(STREAMS))
    engine = Engine.load(config)
    # Tokens per stream: as many as the model's context allows after the longest prompt, at most 64.
    longest = max(len(engine.tokenizer(p)["input_ids"]) for p in PROMPTS)
    new_tokens = min(16 if quick else 64, engine.max_length - longest)
    info = engine.model_info()

    in_process = _measure_in_process(engine, new_tokens, repeats)
    del engine  # free the model before the server loads its own

    over_grpc = {}
    with start_server("policy_server", ["--model", model, "--port", "0", "--device", device,
                                        "--max-batch", str(max(STREAMS))], name="policy", cwd=ROOT) as server:
        asyncio.run(_over_grpc(server.address, 2, 4))  # warm-up
        for n in STREAMS:
            over_grpc[n] = _best(lambda n=n: _over_grpc(server.address, n, new_tokens), repeats)

    rows = []
    for n in STREAMS:
        rows.append({
            "streams": n,
            "in_process": in_process[n],
            "grpc": over_grpc[n],
            "grpc_vs_in_process": round(over_grpc[n]["tokens_per_s"] / in_process[n]["tokens_per_s"], 3),
            "scaling_in_process": round(in_process[n]["tokens_per_s"] / in_process[1]["tokens_per_s"], 2),
            "scaling_grpc": round(over_grpc[n]["tokens_per_s"] / over_grpc[1]["tokens_per_s"], 2),
        })
    print(f"policy: {info.model_name} ({info.dtype} on {info.device}, {info.parameter_bytes / 1e6:.1f} MB), "
          f"{new_tokens} tokens per stream, best of {repeats}")
    print(f"{'streams':>7} {'in-process tok/s':>17} {'gRPC tok/s':>11} {'gRPC/in-proc':>12} "
          f"{'scale (in-proc)':>15} {'scale (gRPC)':>12} {'1st token ms (gRPC)':>19}")
    for r in rows:
        print(f"{r['streams']:>7} {r['in_process']['tokens_per_s']:>17.1f} {r['grpc']['tokens_per_s']:>11.1f} "
              f"{r['grpc_vs_in_process']:>12.3f} {r['scaling_in_process']:>15.2f} {r['scaling_grpc']:>12.2f} "
              f"{r['grpc']['first_token_ms']:>19.1f}")
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
