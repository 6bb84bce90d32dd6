"""The policy engine on vLLM (`python -m policy_server --engine vllm`): the same contract as the
Hugging Face engine (policy_server/engine.py), with vLLM's AsyncLLM doing the model work.

VllmEngine is engine.py's Engine with VllmScheduler in place of scheduler.py's Scheduler: every
check a request passes, Tokenize, AlignSpans, and the events a stream carries (`Scheduler._emit`:
text pieces, stop strings, finish reasons) are the Hugging Face engine's own code, inherited; only
the model work differs. vLLM is imported here (and in vllm_worker.py, inside vLLM's workers) and
nowhere else, so the default path needs none of it; config.py refuses `--engine vllm` where it is
not installed, naming `make vllm`.

Generate: one AsyncLLM request per stream, `logprobs_mode="raw_logprobs"`, streamed in deltas.
- logprob, rank, alternatives: vLLM's raw (temperature 1, untruncated) logprobs of the sampled
  token and of the top num_alternatives (exact: the same log_softmax of the same logits).
- sampling_logprob: vLLM reports one kind of logprob per engine, so it is computed here from the
  raw ones with the Hugging Face engine's own function (policy_server/sampling.py): exactly the
  logprob at temperature 1 without truncation, 0 when greedy, from the top top_k raw logprobs for
  top-k, and from all V raw logprobs (vLLM returns the whole row) when the temperature is not 1
  without top-k, or with top-p. Exact, at a cost: V floats per token through vLLM's output path.
- Finish reasons, stop strings and streamed text are decided by the same decoder and rules as the
  Hugging Face engine; a stop string ends the request in vLLM (abort) after the token that
  completes it.
- Cancellation: closing the stream cancels its task; vLLM aborts the request.

Differences from the Hugging Face engine (README, "The policy server on vLLM"):
- The same seed gives the same tokens on the same engine, alone or batched, but not the same
  tokens as the Hugging Face engine: vLLM samples with its own random streams.
- rank counts the tokens whose logprob is >= the sampled token's (vLLM's), not > it: the two
  differ only for exactly tied logprobs.
- logprobs agree with the Hugging Face engine's on the same weights within 1e-3, not bit for bit
  (float32; vLLM's kernels sum in another order).
- Score needs prompt + completion < the model's length (vLLM wants room for one new token);
  the Hugging Face engine takes prompt + completion <= the model's length.
- candidate_token_ids in Score ask vLLM for the whole row of prompt logprobs (V floats per token).

Weight updates (UpdateWeights): vLLM holds one set of weights, so a stream cannot keep old weights
while new streams use new ones. The swap pauses admission instead: new Generate and Score calls
wait, running streams finish on the old weights, then the checked update (common/weights.py) is
merged into this process's copy of the model's state (checkpoint names, on the CPU: one copy of
the weights in host memory) and the whole state is written to a safetensors file that every worker
reloads through vLLM's in-place reload and the model's `load_weights` (policy_server/vllm_worker.py
says why the whole state), the prefix cache is reset, the version goes up and admission resumes.
So every token of a stream comes from the version its start announced; the price is that an update
waits for the longest running stream (docs/design.md, "Versions and staleness").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from common.adapters import UpdateAccumulator
from common.errors import Aborted, InvalidArgument, ResourceExhausted, Unavailable
from common.hf import LoadedModel, from_pretrained, resolve_dtype
from common.metrics import policy_meter
from common.spans import IncrementalDecoder, pieces_from_ids
from common.weights import WeightAccumulator, aliases, dtype_name, tensor_nbytes
from policy_server.adapters import AdapterMerger
from policy_server.api import GenerationStart, ModelInfo, ScoredToken, ScoreRequest, ScoreResult, UpdateResult
from policy_server.config import VLLM_INSTALL, EngineConfig
from policy_server.engine import Engine
from policy_server.sampling import Sample, SamplerState, SamplingParams, sampling_logprobs
from policy_server.scheduler import _DONE, GenerationStream, Scheduler, _Sequence

log = logging.getLogger(__name__)


class VllmScheduler(Scheduler):
    """The Hugging Face scheduler's interface (generate, run_job, running, steps, start, close) and
    its event rules (`_emit`: text pieces, stop strings, finish reasons), with vLLM's AsyncLLM doing
    the model work: one task per stream on the event loop instead of a thread, admission paused
    while weights are swapped."""

    def __init__(self, llm, tokenizer, config: EngineConfig, eos_ids, max_length: int, vocab_size: int):
        # Not Scheduler.__init__: no model and no thread in this process.
        self.llm = llm  # vllm AsyncLLM
        self.tokenizer = tokenizer
        self.config = config
        self.eos_ids = eos_ids
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.device = torch.device("cpu")  # where SamplerState keeps its generator (only its seed is used)
        self._piece_texts: dict[int, str] = {}  # token id -> text decoded alone (alternatives)
        self.meter = policy_meter()  # tokens, first tokens, update durations (common/metrics.py)
        self.version = 0
        self.steps = 0  # tokens sampled (vLLM's steps are its own)
        self._closing = False
        self._inflight = 0  # Generate / Score calls admitted or waiting for admission
        self._active = 0  # requests inside vLLM, all on self.version
        self._open = asyncio.Event()  # set: admission open (cleared while weights are swapped)
        self._open.set()
        self._idle = asyncio.Condition()  # notified when _active drops to 0
        self._update_lock = asyncio.Lock()  # one swap at a time
        self._tasks: set[asyncio.Task] = set()
        self._warm_up: asyncio.Task | None = None

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """On the serving event loop: a first short generation in the background, so that vLLM's
        warm-up (half a minute on a CPU) is not paid by the first client alone."""
        self._warm_up = asyncio.get_running_loop().create_task(self._generate_once())

    async def _generate_once(self) -> None:
        from vllm import SamplingParams as VllmSamplingParams

        warm = VllmSamplingParams(max_tokens=2, detokenize=False, logprobs=1, temperature=1.0, seed=0)
        async for _ in self.llm.generate({"prompt_token_ids": [0]}, warm, request_id=f"warm-up-{uuid.uuid4()}"):
            pass

    async def close(self) -> None:
        """Cancel every stream (their vLLM requests are aborted), then shut vLLM down."""
        self._closing = True
        for task in [self._warm_up, *self._tasks]:
            if task is not None:
                task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        self.llm.shutdown()  # on the loop: it cancels AsyncLLM's output task before the engine core goes

    @property
    def running(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        """Calls waiting for admission (vLLM queues what it cannot batch yet on its own side)."""
        return self._inflight - self._active

    # ---- admission ----------------------------------------------------------------------------

    def _reserve(self) -> None:
        """Count a call in (RESOURCE_EXHAUSTED past max_batch running + max_queue waiting)."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        waiting = self._inflight - self.config.max_batch
        if waiting >= self.config.max_queue:
            raise ResourceExhausted(f"{waiting} requests are waiting for a decoding slot; retry later")
        self._inflight += 1

    async def _enter(self) -> int:
        """Wait while weights are being swapped; returns the version this call runs on."""
        while not self._open.is_set():
            await self._open.wait()
        self._active += 1
        return self.version

    async def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            async with self._idle:
                self._idle.notify_all()

    # ---- Generate -----------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        """Start a checked request; must be called from the event loop that reads the stream."""
        self._reserve()
        loop = asyncio.get_running_loop()
        task: list[asyncio.Task] = []
        stream = GenerationStream(lambda: task[0].cancel(), loop)  # cancel(): abort the vLLM request
        sequence = _Sequence(stream=stream, generation_id=str(uuid.uuid4()), prompt_ids=prompt_ids,
                             sampler=SamplerState(params, self.device),
                             decoder=IncrementalDecoder(self.tokenizer, prompt_ids))
        task.append(loop.create_task(self._drive(sequence)))
        self._tasks.add(task[0])
        task[0].add_done_callback(self._tasks.discard)
        return stream

    def _push(self, stream: GenerationStream, item) -> None:
        stream._queue.put_nowait(item)  # on the event loop already: straight into the stream

    async def _drive(self, sequence: _Sequence) -> None:
        """One stream: wait for admission, run the vLLM request, turn its outputs into events."""
        stream, entered = sequence.stream, False
        try:
            sequence.version = await self._enter()
            entered = True
            self._push(stream, GenerationStart(
                sequence.generation_id, tuple(sequence.prompt_ids),
                self.tokenizer.decode(sequence.prompt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                sequence.version,
            ))
            params = sequence.params
            request = self._vllm_params(params, len(sequence.prompt_ids), sequence.sampler.seed)
            outputs = self.llm.generate({"prompt_token_ids": sequence.prompt_ids}, request,
                                        request_id=sequence.generation_id)
            async with contextlib.aclosing(outputs):  # leaving early (stop string, cancel) aborts it in vLLM
                async for output in outputs:
                    completion = output.outputs[0]
                    for token_id, logprobs in zip(completion.token_ids, completion.logprobs, strict=True):
                        self.steps += 1
                        if self._emit(sequence, self._sample(token_id, logprobs, params)):
                            return
                    if output.finished:
                        raise RuntimeError(f"vLLM ended generation {sequence.generation_id} after "
                                           f"{len(sequence.completion_ids)} tokens ({completion.finish_reason}) "
                                           "before the engine's own finish")
        except asyncio.CancelledError:
            log.info("generation %s cancelled after %d tokens", sequence.generation_id, len(sequence.completion_ids))
            self._push(stream, _DONE)
            raise
        except Exception as exc:  # noqa: BLE001 - this stream fails with it; the others go on
            log.exception("generation %s failed", sequence.generation_id)
            self._push(stream, exc)
        finally:
            self._inflight -= 1
            if entered:
                await self._leave()

    def _vllm_params(self, params: SamplingParams, prompt_len: int, seed: int):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            max_tokens=min(params.max_new_tokens, self.max_length - prompt_len),
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=seed % 2**63,  # vLLM takes a signed 64-bit seed
            ignore_eos=not params.stop_on_eos,
            stop_token_ids=sorted(self.eos_ids) if params.stop_on_eos else None,
            logprobs=logprobs_wanted(params, self.vocab_size),
            detokenize=False,  # the text comes from common.spans' decoder, as on the Hugging Face engine
            output_kind=RequestOutputKind.DELTA,
        )

    def _sample(self, token_id: int, logprobs: dict, params: SamplingParams) -> Sample:
        """A Sample (policy_server/sampling.py) from vLLM's {token id: Logprob} of one position."""
        mine = logprobs[token_id]
        n = params.num_alternatives
        ranked = sorted((lp.rank, i, lp.logprob) for i, lp in logprobs.items() if lp.rank is not None)
        alternatives = tuple((i, lp) for rank, i, lp in ranked if rank <= n)[:n]
        if params.temperature == 0.0:
            behavior = 0.0
        elif params.temperature == 1.0 and not params.truncates:
            behavior = mine.logprob
        else:
            row = torch.full((self.vocab_size,), float("-inf"))  # (V,) raw logprobs; absent: outside the top
            row[torch.tensor(list(logprobs.keys()))] = torch.tensor([lp.logprob for lp in logprobs.values()])
            behavior = float(sampling_logprobs(row, row, params)[token_id])
        return Sample(int(token_id), float(mine.logprob), behavior, int(mine.rank), alternatives)

    # ---- jobs (Score) and weight swaps ----------------------------------------------------------

    async def run_job(self, fn: Callable[[], object]):
        """Await the coroutine `fn()` returns, admitted like a stream (never during a swap)."""
        self._reserve()
        entered = False
        try:
            await self._enter()
            entered = True
            return await fn()
        finally:
            self._inflight -= 1
            if entered:
                await self._leave()

    async def swap(self, target: int, load: Callable[[], object]) -> None:
        """Pause admission, wait for every running request to finish on the current version, run
        `load` (the coroutine that loads the new weights into vLLM), reset the prefix cache, move
        to version `target`, resume."""
        async with self._update_lock:
            self._open.clear()
            try:
                if self._active:
                    log.info("weights: %d running stream(s) keep version %d; new calls wait until they finish",
                             self._active, self.version)
                async with self._idle:
                    await self._idle.wait_for(lambda: self._active == 0)
                if target <= self.version:
                    raise Aborted(f"the server moved to version {self.version} meanwhile; target {target} is stale",
                                  "header.target_version")
                started = time.perf_counter()
                await load()
                await self.llm.reset_prefix_cache()
                self.meter.update.observe(time.perf_counter() - started)  # cached KV blocks were computed by the old weights
                log.info("weights: version %d -> %d", self.version, target)
                self.version = target
            finally:
                self._open.set()


class VllmEngine(Engine):
    """Engine (engine.py) with VllmScheduler for the model work: the same checks, Tokenize,
    AlignSpans and events; Score through vLLM's prompt logprobs; updates through vLLM's reload."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, llm, specs: dict[str, torch.Tensor],
                 canonical: dict[str, str], state: dict[str, torch.Tensor]):
        # Not Engine.__init__: the model lives in vLLM's workers; here only its description.
        self.config = config
        self.loaded = loaded
        self.model = loaded.model  # meta tensors: config and shapes
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.vocab_size = loaded.vocab_size
        self.max_length = min(loaded.max_length, config.max_model_len or loaded.max_length)
        self.scheduler = VllmScheduler(llm, self.tokenizer, config, loaded.eos_token_ids(), self.max_length,
                                       self.vocab_size)
        self._specs = specs  # name -> meta tensor: what an update is checked against
        self._canonical = canonical  # tied names -> the name their tensor travels under
        self._state = state  # canonical name -> current tensor (CPU): what every update reloads in full
        self._adapters = AdapterMerger()  # LoRA adapter updates -> merged weights, as on the HF engine
        self._tensor_count = len(state)
        self._parameter_bytes = sum(tensor_nbytes(t) for t in state.values())
        self._accepting = True

    @classmethod
    def load(cls, config: EngineConfig) -> VllmEngine:
        """Read the model (config, tokenizer, weights on the CPU: what updates merge into) and start
        vLLM's engine core and workers, which load it themselves (a minute or more on a CPU)."""
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise RuntimeError(f"--engine vllm: vLLM is not installed in this Python ({exc}); {VLLM_INSTALL}") from exc
        if config.threads:
            torch.set_num_threads(config.threads)
        loaded, specs, canonical, state = describe_model(config.model, config.device, config.dtype)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU (vLLM's default: 4)
        args = AsyncEngineArgs(
            model=config.model,
            dtype=dtype_name(loaded.dtype),
            max_model_len=min(loaded.max_length, config.max_model_len or loaded.max_length),
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_num_seqs=config.max_batch,
            logprobs_mode="raw_logprobs",  # the contract's logprob: temperature 1, no truncation
            max_logprobs=loaded.vocab_size,  # whole rows, for sampling_logprob and Score's candidates
            worker_extension_cls="policy_server.vllm_worker.WeightLoader",
            enforce_eager=loaded.device.type == "cpu",  # no graph capture on a CPU (it only costs start-up)
            disable_log_stats=True,
            seed=0,
        )
        # Created off the event loop; AsyncLLM starts its output task on first use.
        return cls(loaded, config, AsyncLLM.from_engine_args(args), specs, canonical, state)

    @property
    def version(self) -> int:
        return self.scheduler.version

    # ---- Score --------------------------------------------------------------------------------

    async def _score(self, prompt_ids: list[int], completion: list[int], request: ScoreRequest) -> ScoreResult:
        """Teacher forcing through vLLM's prompt logprobs over prompt + completion (run admitted,
        by Engine.score through run_job)."""
        from vllm import SamplingParams as VllmSamplingParams

        total = len(prompt_ids) + len(completion)
        if total >= self.max_length:
            raise InvalidArgument(
                f"prompt + completion is {total} tokens; on the vLLM engine it must be below the model's maximum "
                f"{self.max_length} (vLLM needs room for one new token)",
                "completion_token_ids" if request.completion_token_ids else "completion_text")
        version, n = self.version, request.num_alternatives
        params = VllmSamplingParams(max_tokens=1, prompt_logprobs=self.vocab_size if request.candidate_token_ids else n,
                                    detokenize=False, temperature=0.0)
        result = None
        async for output in self.scheduler.llm.generate({"prompt_token_ids": prompt_ids + completion}, params,
                                                        request_id=f"score-{uuid.uuid4()}"):
            result = output
        rows = result.prompt_logprobs[len(prompt_ids):]  # one {token id: Logprob} per completion token
        text, pieces = pieces_from_ids(self.tokenizer, completion, prompt_ids)
        tokens = []
        for t, (piece, row) in enumerate(zip(pieces, rows, strict=True)):
            mine = row[completion[t]]
            ranked = sorted((lp.rank, i, lp.logprob) for i, lp in row.items() if lp.rank is not None)
            top = [(i, lp) for rank, i, lp in ranked if rank <= n][:n]
            tokens.append(ScoredToken(
                position=t, token_id=piece.token_id, text=piece.text, char_start=piece.char_start,
                char_end=piece.char_end, logprob=float(mine.logprob), rank=int(mine.rank),
                alternatives=self.scheduler.alternatives(*zip(*top, strict=True)) if top else (),
                candidate_logprobs=tuple(float(row[c].logprob) for c in request.candidate_token_ids),
            ))
        return ScoreResult(tuple(prompt_ids), tuple(tokens), float(sum(t.logprob for t in tokens)), text, version)

    # ---- UpdateWeights ------------------------------------------------------------------------

    def begin_update(self) -> WeightAccumulator:
        """Full tensors or LoRA adapter factors (common/adapters.py), as on the HF engine."""
        return UpdateAccumulator(self._specs, self.version, self._canonical,
                                 max_total_bytes=self.config.max_update_bytes or None)

    async def commit_update(self, update: WeightAccumulator, sha256: str) -> UpdateResult:
        """Check everything, then swap (VllmScheduler.swap): the whole state, with the update
        merged in, reloaded by every worker."""
        from safetensors.torch import save_file

        tensors = await asyncio.to_thread(update.commit, sha256)
        target = update.target_version
        # adapter factors become merged weights W = B + up @ down (policy_server/adapters.py)
        tensors, adapter_base = self._adapters.resolve(tensors, self._state)
        state = {**self._state, **tensors}

        async def load() -> None:
            folder = "/dev/shm" if Path("/dev/shm").is_dir() else None  # RAM, where there is one
            with tempfile.TemporaryDirectory(prefix="tokenfeedback-update-", dir=folder) as tmp:
                path = str(Path(tmp) / "state.safetensors")
                await asyncio.to_thread(save_file, {k: v.contiguous() for k, v in state.items()}, path)
                await self.scheduler.llm.collective_rpc("load_update", args=(path,))
            self._state = state
            self._adapters.applied(adapter_base)
            log.info("weights: %d tensors (%d bytes) changed, the whole state reloaded into vLLM", len(tensors),
                     sum(tensor_nbytes(t) for t in tensors.values()))

        await self.scheduler.swap(target, load)
        return UpdateResult(target, len(tensors), update.bytes_received)

    def model_info(self) -> ModelInfo:
        from vllm.platforms import current_platform

        return replace(super().model_info(), device=current_platform.device_type)


def logprobs_wanted(params: SamplingParams, vocab_size: int) -> int:
    """How many raw logprobs per token to ask vLLM for: the alternatives, and whatever
    sampling_logprob needs (nothing at temperature 0 or 1 untruncated, the top top_k for top-k
    alone, the whole row otherwise)."""
    if params.temperature == 0.0 or (params.temperature == 1.0 and not params.truncates):
        need = 0
    elif params.top_k > 0 and params.top_p >= 1.0:
        need = min(params.top_k, vocab_size)
    else:
        need = vocab_size
    return max(params.num_alternatives, need)


def describe_model(name: str, device: str, dtype: str
                   ) -> tuple[LoadedModel, dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """The model as this process needs it: config and tokenizer (a LoadedModel whose module is left
    on the meta device), its state dict as meta tensors (what an update is checked against), tied
    names mapped to the name their tensor travels under, and the weights on the CPU under those
    names (what updates merge into)."""
    resolved_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    tokenizer, model = from_pretrained(name, resolved_dtype)
    weights = model.state_dict()
    canonical = aliases(weights)
    state = {n: t for n, t in weights.items() if canonical[n] == n}
    specs = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in weights.items()}
    model.to("meta")  # the module stays for its config and its output layer's shape; `state` keeps the weights
    return LoadedModel(name, model, tokenizer, resolved_device, resolved_dtype), specs, canonical, state
