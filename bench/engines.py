"""The policy server's engines side by side: tokens/s at 1, 4, 16 and 64 concurrent Generate
streams over gRPC, for the Hugging Face engine (`--engine hf`) and the vLLM engine (`--engine
vllm`, run from the vLLM venv: `make vllm`) on the same model in one run, with Hugging Face's own
`generate` in this process at the same batch sizes as the baseline (no server, no transport: a
batch of prompts, left-padded, sampled together). Figures: aggregate tokens/s (the best of the
runs), each way's ratio to the baseline, and the vLLM/HF-engine ratio.

Every stream and every batch row samples the same fixed number of tokens (stop_on_eos off,
seeded, temperature 1), so all three do the same work. The three ways take turns run by run, so a
change in the machine's load hits all of them.

    python -m bench.engines [--model data/demo-model] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench.policy import DEFAULT_MODEL, PROMPTS, ROOT, generate_over_grpc

STREAMS = (1, 4, 16, 64)
VLLM_START_S = 900.0  # the vLLM server's start (engine core, worker, weights) on a loaded CPU


def _hf_generate(model, tokenizer, batch: int, new_tokens: int) -> tuple[float, int]:
    """(seconds, tokens) of one `generate` call over `batch` prompts (sampling, KV cache)."""
    import torch

    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)  # (B, L) left-padded
    torch.manual_seed(batch)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id)  # (B, L + new_tokens)
    seconds = time.perf_counter() - start
    return seconds, int(out.shape[0] * (out.shape[1] - inputs["input_ids"].shape[1]))


def run(quick: bool = False, model: str | Path = DEFAULT_MODEL) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.process import start_server, vllm_python

    model = str(model)
    if not Path(model).exists():
        raise FileNotFoundError(f"{model} is missing: build it with `make model`")
    repeats = 2 if quick else 3
    torch.set_num_threads(1)  # as the servers' engines (--threads 1)
    tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    longest = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    max_length = hf_model.config.n_positions if hasattr(hf_model.config, "n_positions") else 2048
    new_tokens = min(16 if quick else 32, max_length - longest - 1)
    ways = ("generate", "hf", "vllm")
    runs: dict[tuple[str, int], list[tuple[float, int]]] = {(w, n): [] for w in ways for n in STREAMS}
    common = ["--model", model, "--port", "0", "--host", "127.0.0.1", "--max-batch", str(max(STREAMS)),
              "--max-new-tokens-limit", str(new_tokens)]
    with start_server("policy_server", ["--engine", "vllm", *common], name="policy-vllm", cwd=ROOT,
                      python=vllm_python(ROOT), timeout=VLLM_START_S) as vllm, \
            start_server("policy_server", common, name="policy-hf", cwd=ROOT) as hf:
        for address in (hf.address, vllm.address):  # warm-up (vLLM's first requests are slow)
            asyncio.run(generate_over_grpc(address, 4, 4))
        _hf_generate(hf_model, tokenizer, 2, 4)
        for _ in range(repeats):
            for n in STREAMS:
                runs["generate", n].append(_hf_generate(hf_model, tokenizer, n, new_tokens))
                for way, server in (("hf", hf), ("vllm", vllm)):
                    seconds, _, tokens = asyncio.run(generate_over_grpc(server.address, n, new_tokens))
                    runs[way, n].append((seconds, tokens))

    rows = []
    for n in STREAMS:
        best = {w: max(t / s for s, t in runs[w, n]) for w in ways}
        rows.append({"streams": n, **{f"{w}_tokens_per_s": round(best[w], 1) for w in ways},
                     "hf_vs_generate": round(best["hf"] / best["generate"], 3),
                     "vllm_vs_generate": round(best["vllm"] / best["generate"], 3),
                     "vllm_vs_hf": round(best["vllm"] / best["hf"], 3)})
    print(f"engines: {model} (float32, CPU), {new_tokens} tokens per stream, best of {repeats}")
    print(f"{'streams':>7} {'generate tok/s':>14} {'hf gRPC tok/s':>13} {'vllm gRPC tok/s':>15} "
          f"{'hf/generate':>11} {'vllm/generate':>13} {'vllm/hf':>8}")
    for r in rows:
        print(f"{r['streams']:>7} {r['generate_tokens_per_s']:>14.1f} {r['hf_tokens_per_s']:>13.1f} "
              f"{r['vllm_tokens_per_s']:>15.1f} {r['hf_vs_generate']:>11.3f} {r['vllm_vs_generate']:>13.3f} "
              f"{r['vllm_vs_hf']:>8.3f}")
    return {"model": model, "tokens_per_stream": new_tokens, "repeats": repeats, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.model), indent=2))


if __name__ == "__main__":
    main()
