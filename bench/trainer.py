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
- modes (trainer_server/model.py): on the GPT-2-small-sized model built from config, side by
  side, fp32 full, bf16 full, LoRA (fp32 base) and LoRA on a bf16 base: memory resident after the
  first step (weights, reference, optimizer state), peak memory during a step and during a publish
  (gathering what is sent, the header's SHA-256 pass and the chunks), bytes per publish, and time
  per token. Memory: on a GPU torch's peak counter; on the CPU the process's resident set sampled
  every millisecond, above what the process held before the model was built. Each mode runs in a
  fresh process, so one mode's freed memory does not hide another's.
- against torch.compile: the trainer's fp32 step per token on the same model and batch against a
  plain PyTorch step (full [N, V] logits, the plain loss of kernels/reference.py, AdamW) compiled
  with torch.compile, in the same run.

    python -m bench --only trainer [--quick]
    python -m bench.trainer --model PATH [--quick] [--sections modes,compiled]

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


# ---- modes: fp32, bf16, LoRA (memory per step and per publish, bytes per publish) ----------------

GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
MODES = {  # name -> ModelMode fields
    "fp32_full": dict(precision="fp32"),
    "bf16_full": dict(precision="bf16"),
    "lora_r8_fp32": dict(precision="fp32", lora_rank=8, lora_alpha=16.0),
    "lora_r8_bf16": dict(precision="bf16", lora_rank=8, lora_alpha=16.0),
}


class PeakMemory:
    """Peak memory while the block runs: torch's counter on a GPU; on the CPU the resident set of
    this process, sampled every millisecond by a thread. `peak` in bytes."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak = 0

    def __enter__(self):
        import threading

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        self._stop = threading.Event()
        self.peak = current_memory()

        def sample():
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, current_memory())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_memory())


def current_memory() -> int:
    """Bytes in use now: CUDA memory allocated, or the process's resident set."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def _mode_figures(name: str, steps: int, sequences: int) -> dict:
    """One mode in this (fresh) process: see the module docstring."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.weights import iter_chunks
    from trainer_server.api import Snapshot
    from trainer_server.distributed import Collective
    from trainer_server.model import ModelMode, prepare
    from trainer_server.training import PolicyTrainer, StepParams

    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    before = current_memory()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL)).to(device)
    prepared = prepare(model, ModelMode(**MODES[name]))
    trainer = PolicyTrainer(prepared, None, Collective(), learning_rate=1e-5)
    examples = _examples(GPT2_SMALL["vocab_size"], sequences, 32, 32)
    params = StepParams(variant="unlikelihood", beta=0.1, learning_rate=1e-5)
    trainer.step(examples, params)  # warm-up: optimizer state, allocator
    resident = current_memory() - before
    times = []
    with PeakMemory() as step_peak:
        for _ in range(steps):
            result = trainer.step(examples, params)
            times.append(result.seconds)
    with PeakMemory() as publish_peak:
        snapshot = Snapshot(1, prepared.published())
        tensors, summary = snapshot.for_dtype("float32")  # what a CPU policy server (fp32) is sent
        for chunk in iter_chunks(tensors):
            bytes(chunk.data)  # the publisher copies each chunk into its message
    seconds = statistics.median(times)
    mb = 1 / 2**20
    return {
        "trainable_parameters_M": round(sum(p.numel() for p in trainer.params) / 1e6, 2),
        "resident_MiB": round(resident * mb),
        "step_peak_MiB": round((step_peak.peak - before) * mb),
        "publish_peak_MiB": round((publish_peak.peak - before) * mb),
        "publish_bytes": summary.total_bytes,
        "publish_MiB": round(summary.total_bytes * mb, 2),
        "step_s": round(seconds, 3),
        "ms_per_token": round(1000 * seconds / result.tokens, 3),
        "loss": round(result.loss, 4),
    }


def _in_fresh_process(fn, *args):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def bench_modes(model_dir: Path, quick: bool) -> dict:
    """fp32 full, bf16 full and LoRA side by side on the GPT-2-small-sized model (module docstring)."""
    steps, sequences = (1, 2) if quick else (2, 4)
    out = {"model": "GPT-2 small from config (124M parameters, random weights)",
           "batch": f"{sequences} sequences x 64 tokens", "memory": _memory_kind()}
    for name in MODES:
        out[name] = _in_fresh_process(_mode_figures, name, steps, sequences)
        print(f"  {name}: {out[name]}", flush=True)
    return out


def _memory_kind() -> str:
    import torch

    if torch.cuda.is_available():
        return "CUDA memory allocated (torch peak counter)"
    return "CPU resident set above the process before the model (sampled every 1 ms)"


# ---- the trainer's step against plain PyTorch under torch.compile --------------------------------


def _compiled_figures(steps: int, sequences: int) -> dict:
    """Seconds per step and per token: PolicyTrainer.step (fp32 full) and a plain PyTorch step
    compiled with torch.compile, on the same model and batch, in this process."""
    import os

    # compile in this process: on a shared, oversubscribed CPU the pool of compile workers starved
    # (20 minutes without progress); one thread compiled the tiny model's step in about 3 minutes
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from kernels.reference import fused_linear_token_loss as plain_loss
    from trainer_server.distributed import Collective
    from trainer_server.training import PolicyTrainer, StepParams, pack

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    examples = _examples(GPT2_SMALL["vocab_size"], sequences, 32, 32)
    params = StepParams(variant="unlikelihood", beta=0.1, learning_rate=1e-5)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL)).to(device).eval()

    def timed(step) -> float:
        step()  # warm-up (and compilation)
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    trainer = PolicyTrainer(copy.deepcopy(base), copy.deepcopy(base), Collective(), learning_rate=1e-5)
    ours = timed(lambda: trainer.step(examples, params))
    tokens = sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    trainer = None  # its memory goes before the baseline runs

    policy, reference = copy.deepcopy(base).requires_grad_(True), copy.deepcopy(base).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=True)
    inputs = pack(examples, 0, device)

    def loss_fn(ids, mask, gather, row_index, targets, weights):
        hidden = policy.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
        with torch.no_grad():
            ref_hidden = reference.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
        width = hidden.shape[-1]
        return plain_loss(hidden.reshape(-1, width)[gather], policy.lm_head.weight,
                          ref_hidden.reshape(-1, width)[gather], reference.lm_head.weight,
                          row_index, targets, weights, beta=params.beta, variant=params.variant)

    compiled = torch.compile(loss_fn, dynamic=False)

    def plain_step():
        optimizer.zero_grad(set_to_none=False)
        compiled(inputs.ids, inputs.mask, inputs.gather, inputs.row_index, inputs.targets, inputs.weights).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()

    start = time.perf_counter()
    plain_step()  # the first call compiles
    compile_s = time.perf_counter() - start
    baseline = timed(plain_step)
    return {
        "tokens_per_step": tokens,
        "trainer_ms_per_token": round(1000 * ours / tokens, 3),
        "compiled_plain_ms_per_token": round(1000 * baseline / tokens, 3),
        "trainer_vs_compiled_time": round(ours / baseline, 3),
        "compile_s": round(compile_s, 1),
    }


def bench_compiled(model_dir: Path, quick: bool) -> dict:
    steps, sequences = (1, 2) if quick else (3, 4)
    return _in_fresh_process(_compiled_figures, steps, sequences)


# ---- entry points ----------------------------------------------------------------------------


SECTIONS = ("ingest", "training", "publish", "modes", "compiled")


def run(quick: bool = False, model: str | Path = DEFAULT_MODEL, sections: tuple[str, ...] = SECTIONS) -> dict:
    model = Path(model)
    if set(sections) & {"ingest", "training", "publish"} and not (model / "config.json").exists():
        raise FileNotFoundError(f"{model}: no model (run `make model`)")
    results = {"model": str(model)}
    benches = {"ingest": bench_ingest, "training": bench_training, "publish": bench_publish, "modes": bench_modes,
               "compiled": bench_compiled}
    for name in sections:
        bench = benches[name]
        start = time.perf_counter()
        results[name] = bench(model, quick)
        print(f"{name} ({time.perf_counter() - start:.0f} s): {json.dumps(results[name], indent=1)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the demo model)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and steps")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    print(json.dumps(run(args.quick, args.model, sections), indent=2))


if __name__ == "__main__":
    main()
