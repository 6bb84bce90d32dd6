"""Trainer throughput: durable ingestion, training tokens/s, publish time per MB.

Three measurements, each against a baseline taken in the same run:
- ingestion: annotations/s acknowledged by a real trainer subprocess over gRPC (SQLite WAL,
  synchronous=FULL: every acknowledged request is on disk), one request after the other with
  1 and 256 sequences per request; baseline: the store alone in this process (the same SQLite
  commits, no validation, no transport).
- training: tokens/s (prompt + completion tokens through policy and reference, forward and
  backward, optimizer step) of `PolicyTrainer.step` on the demo model and on a GPT-2-small-sized
  model (random weights, 124M parameters); baseline: the same step with the kernel's plain PyTorch
  back end (full [N, V] logits).
- publishing: seconds per MB of weights sent with UpdateWeights to a real policy server
  subprocess (header, chunks, commit with SHA-256, swap) on the demo model, and in a full run on
  a GPT-2-small-sized model (random weights); baseline: building the same chunks and checksum in
  this process without sending them.

    python -m bench --only trainer [--quick]
    python -m bench.trainer --model PATH [--quick]

On a CPU shared with other work, OMP_NUM_THREADS=1 gives stable figures (two OpenMP threads on
an oversubscribed 2-core machine made a demo-model step 8x slower, 2.8 s instead of 0.35 s).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "data" / "demo-model"


# ---- ingestion -------------------------------------------------------------------------------


def _sequences(count: int, start: int, vocab: int):
    import tokenfeedback.v1.trainer_pb2 as pb

    return [
        pb.AnnotatedSequence(
            annotation_id=f"bench-{start + i}", prompt_token_ids=[(7 * i + k) % vocab for k in range(16)],
            completion_token_ids=[(11 * i + k) % vocab for k in range(32)], annotator_id="bench",
            token_labels=[pb.TokenLabel(position=3, weight=-1.0, replacement_token_id=(11 * i + 4) % vocab),
                          pb.TokenLabel(position=9, weight=1.0)],
        )
        for i in range(count)
    ]


def _store_baseline(folder: Path, batch: int, requests: int) -> float:
    """Annotations/s of AnnotationStore.insert alone (same durability), in this process."""
    from trainer_server.rows import Annotation, Row
    from trainer_server.store import AnnotationStore

    store = AnnotationStore(folder / f"baseline-{batch}.sqlite", sync="full")
    rows = (Row(3, 1, -1.0), Row(3, 2, 1.0, True), Row(9, 4, 1.0))
    start = time.perf_counter()
    for r in range(requests):
        store.insert([Annotation(f"b-{r}-{i}", tuple(range(16)), tuple(range(32)), 0, rows) for i in range(batch)])
    seconds = time.perf_counter() - start
    store.close()
    return batch * requests / seconds


def bench_ingest(model: Path, quick: bool) -> dict:
    import grpc

    import tokenfeedback.v1.trainer_pb2 as pb
    import tokenfeedback.v1.trainer_pb2_grpc as pb_grpc
    from common.process import start_server

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    plan = {1: 40 if quick else 300, 256: 2 if quick else 12}  # batch size -> requests
    folder = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    out = {}
    try:
        server = start_server("trainer_server", ["--model", str(model), "--data", str(folder / "data"), "--port", "0",
                                                 "--sync", "full", "--max-seq-len", "512"], name="trainer", cwd=ROOT)
        try:
            stub = pb_grpc.TrainerServiceStub(grpc.insecure_channel(server.address))
            next_id = 0
            for batch, requests in plan.items():
                stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=_sequences(batch, 10**9, vocab)))  # warm-up
                requests_data = [_sequences(batch, next_id + r * batch, vocab) for r in range(requests)]
                next_id += batch * requests
                start = time.perf_counter()
                for sequences in requests_data:
                    reply = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=sequences), timeout=120)
                    assert all(r.status == pb.SUBMIT_STATUS_ACCEPTED for r in reply.results)
                seconds = time.perf_counter() - start
                grpc_rate = batch * requests / seconds
                store_rate = _store_baseline(folder, batch, requests)
                out[f"batch_{batch}"] = {
                    "requests": requests,
                    "annotations_per_s": round(grpc_rate, 1),
                    "ms_per_request": round(1000 * seconds / requests, 2),
                    "store_only_annotations_per_s": round(store_rate, 1),
                    "grpc_vs_store_only": round(grpc_rate / store_rate, 3),
                }
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


# ---- training --------------------------------------------------------------------------------


def _examples(vocab: int, sequences: int, prompt: int, completion: int, seed: int = 0):
    import torch

    from trainer_server.rows import Row
    from trainer_server.training import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sequences):
        ids = torch.randint(0, vocab, (prompt + completion,), generator=g).tolist()
        rows = tuple(Row(t, ids[prompt + t], -1.0 if t % 2 else 1.0) for t in range(0, completion, 4))
        out.append(Example(tuple(ids[:prompt]), tuple(ids[prompt:]), rows))
    return out


def _train_rate(model, backend: str | None, examples, steps: int) -> dict:
    import torch

    from kernels import fused_linear_token_loss
    from trainer_server.distributed import Collective
    from trainer_server.training import PolicyTrainer, StepParams

    policy = copy.deepcopy(model).requires_grad_(True)
    trainer = PolicyTrainer(policy, copy.deepcopy(model), Collective(), learning_rate=1e-5)
    trainer.loss_fn = functools.partial(fused_linear_token_loss, backend=backend)
    params = StepParams(variant="unlikelihood", beta=0.1, learning_rate=1e-5)
    trainer.step(examples, params)  # warm-up (allocations, optimizer state)
    times = []
    for _ in range(steps):
        result = trainer.step(examples, params)
        times.append(result.seconds)
    seconds = statistics.median(times)
    del trainer, policy
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"step_s": round(seconds, 4), "tokens_per_s": round(result.tokens / seconds, 1), "tokens": result.tokens}


def bench_training(model_dir: Path, quick: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    out = {}
    demo = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)).eval()
    cases = [
        ("demo", demo, _examples(demo.config.vocab_size, 16, 24, 24), 3 if quick else 8),
        ("gpt2_small_random", gpt2, _examples(50257, 2 if quick else 4, 32, 32), 1 if quick else 2),
    ]
    for name, model, examples, steps in cases:
        fused = _train_rate(model, None, examples, steps)
        plain = _train_rate(model, "reference", examples, steps)
        out[name] = {
            "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "sequences": len(examples),
            "fused": fused,
            "plain_pytorch": plain,
            "fused_vs_plain_speed": round(fused["tokens_per_s"] / plain["tokens_per_s"], 3),
        }
    return out


# ---- publishing ------------------------------------------------------------------------------


async def _publish_rounds(address: str, tensors: dict, rounds: int) -> list[tuple[float, int]]:
    from trainer_server.publish import Publisher, Snapshot

    publisher = Publisher((address,), 4 * 1024 * 1024, timeout=300, retry=0.5)
    await publisher.start()
    try:
        await asyncio.sleep(0)
        out = []
        for version in range(1, rounds + 1):
            start = time.perf_counter()
            states = await publisher.publish(Snapshot(version, tensors))
            seconds = time.perf_counter() - start
            state = states[address]
            assert state.model_version == version, f"publish {version} failed: {state.last_error}"
            out.append((seconds, state.last_publish_bytes))
        return out
    finally:
        await publisher.stop()


def _publish_one(model_dir: Path, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM

    from common.process import start_server
    from common.weights import iter_chunks, summarize_state_dict, unique_tensors

    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    tensors = {k: v.detach().clone() for k, v in unique_tensors(model.state_dict()).items()}
    del model
    server = start_server("policy_server", ["--model", str(model_dir), "--port", "0"], name="policy", cwd=ROOT,
                          timeout=600)
    try:
        timings = asyncio.run(_publish_rounds(server.address, tensors, rounds + 1))[1:]  # first: warm-up
    finally:
        server.stop()
    seconds = statistics.median(t for t, _ in timings)
    megabytes = timings[0][1] / 1e6
    start = time.perf_counter()
    for _ in range(rounds):
        summarize_state_dict(tensors)
        for chunk in iter_chunks(tensors):
            bytes(chunk.data)
    local = (time.perf_counter() - start) / rounds
    return {
        "megabytes": round(megabytes, 2),
        "publish_s": round(seconds, 4),
        "s_per_MB": round(seconds / megabytes, 5),
        "MB_per_s": round(megabytes / seconds, 1),
        "serialize_only_s_per_MB": round(local / megabytes, 5),
        "publish_vs_serialize_only": round(seconds / local, 2),
    }


def bench_publish(model_dir: Path, quick: bool) -> dict:
    """The demo model; in a full run also a GPT-2-small-sized body (12 layers, 768 wide) with the
    demo model's vocabulary, saved to a temporary folder so a policy server can load it."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = {"demo": _publish_one(model_dir, 2 if quick else 5)}
    if not quick:
        folder = Path(tempfile.mkdtemp(prefix="bench-gpt2-"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            torch.manual_seed(0)
            config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=len(tokenizer), n_positions=1024,
                                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
            GPT2LMHeadModel(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            out["gpt2_small_body"] = _publish_one(folder, 3)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return out


# ---- entry points ----------------------------------------------------------------------------


def run(quick: bool = False, model: str | Path = DEFAULT_MODEL) -> dict:
    model = Path(model)
    if not (model / "config.json").exists():
        raise FileNotFoundError(f"{model}: no model (run `make model`)")
    results = {"model": str(model)}
    for name, bench in (("ingest", bench_ingest), ("training", bench_training), ("publish", bench_publish)):
        start = time.perf_counter()
        results[name] = bench(model, quick)
        print(f"{name} ({time.perf_counter() - start:.0f} s): {json.dumps(results[name], indent=1)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the demo model)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and steps")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.model), indent=2))


if __name__ == "__main__":
    main()
