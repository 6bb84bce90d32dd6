"""The policy engine: a causal LM behind a batching scheduler, with scoring, spans and weight swaps.

Knows nothing of gRPC. Transports (service.py for gRPC, a Connect adapter, tests, benchmarks)
call it with the dataclasses of api.py from an asyncio event loop:

    engine = Engine.load(EngineConfig(model="data/demo-model"))
    engine.start()
    async for event in engine.generate(GenerateRequest(prompt_text="Paris is")): ...
    await engine.score(ScoreRequest(...)); engine.tokenize(...); engine.align_spans(...)
    update = engine.begin_update(); update.header(...); update.chunk(...); await engine.commit_update(update, sha)
    await engine.close()

All model work runs on one scheduler thread, in a loop of steps. A step: run queued jobs (Score,
weight swaps), drop cancelled sequences, prefill newly admitted requests one by one (each samples
its first token), then one forward for all running sequences of a model version (batch.py) and
one sampled token per sequence. So concurrent streams share one forward per decoding step.

Weight swap (policy.proto UpdateWeights): the new tensors are checked completely before anything
changes (common/weights.py), then swapped in at a step boundary by pointing the model's parameters
at the new tensors. Streams already running keep their version: the old tensors of every changed
name stay alive in `retired[version]` and their batch runs through torch.func.functional_call with
them, until the last of those streams ends. New streams start on the new version. Memory: one
extra copy of the changed tensors while old streams run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.func import functional_call
from transformers import DynamicCache

from common.adapters import UpdateAccumulator
from common.errors import Aborted, InvalidArgument, ResourceExhausted, Unavailable
from common.hf import LoadedModel, load_causal_lm
from common.spans import IncrementalDecoder, Span, align_spans, pieces_from_ids, pieces_from_text
from common.weights import WeightAccumulator, aliases, dtype_name, tensor_nbytes
from policy_server.adapters import AdapterMerger
from policy_server.api import (
    AlignResult,
    Alternative,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    GenerationEnd,
    GenerationStart,
    ModelInfo,
    ScoredToken,
    ScoreRequest,
    ScoreResult,
    TokenEvent,
    TokenizeResult,
    UpdateResult,
)
from policy_server.batch import Batch, cache_kwarg, output_cache
from policy_server.sampling import MAX_ALTERNATIVES, Sample, SamplerState, sample_rows

log = logging.getLogger(__name__)

MAX_CANDIDATES = 64  # ScoreRequest.candidate_token_ids per request


@dataclass(frozen=True)
class EngineConfig:
    model: str = "data/demo-model"  # local folder or hub id
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16
    max_batch: int = 16  # sequences decoded together in one forward
    max_queue: int = 256  # requests waiting for a slot before RESOURCE_EXHAUSTED
    max_new_tokens_limit: int = 512  # largest SamplingParams.max_new_tokens accepted
    # torch intra-op threads. 1 suits small models and shared machines (OpenMP threads that wait
    # for a busy core stall every op; the gRPC loop needs a core too); 0 keeps torch's default.
    threads: int = 1
    # Deliberate limits (issue 7): requests past them are refused with INVALID_ARGUMENT naming the
    # field, before any tokenizing or model work.
    max_prompt_tokens: int = 4096  # longest prompt (Generate, Score); the model's length caps it too
    max_text_chars: int = 65536  # longest text field (prompts, completions, Tokenize, AlignSpans)
    # largest UpdateWeights (header.total_bytes); 0: the model's size (each tensor at most once, at its size)
    max_update_bytes: int = 0


# ---- a generation stream, as a transport sees it --------------------------------------------

_DONE = object()  # end-of-stream marker on a stream's queue


class GenerationStream:
    """Async iterator of GenerateEvents for one request. `cancel()` frees the slot at the next
    step boundary (the scheduler never waits for a slow reader: events queue up here)."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop):
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.done = False

    def __aiter__(self) -> AsyncIterator[GenerateEvent]:
        return self

    async def __anext__(self) -> GenerateEvent:
        if self.done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _DONE:
            self.done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    def cancel(self) -> None:
        if not self.done and not self.cancelled:
            self.cancelled = True
            self._engine._wake()

    def _push(self, item) -> None:
        """From the scheduler thread: queued in the engine's outbox, delivered at the step's end."""
        self._engine._outbox.append((self, item))


def _deliver(items: list[tuple[GenerationStream, object]]) -> None:
    """On the event loop: one call per step for all of its streams' events."""
    for stream, item in items:
        stream._queue.put_nowait(item)


@dataclass
class _Sequence:
    """A running generation, owned by the scheduler thread."""

    stream: GenerationStream
    generation_id: str
    prompt_ids: list[int]
    sampler: SamplerState
    decoder: IncrementalDecoder
    version: int = 0
    completion_ids: list[int] = field(default_factory=list)

    @property
    def params(self):
        return self.sampler.params


# ---- the engine ------------------------------------------------------------------------------


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.vocab_size = loaded.vocab_size
        self.max_length = loaded.max_length
        self.eos_ids = loaded.eos_token_ids()
        self.version = 0
        state = self.model.state_dict()
        self._canonical = aliases(state)  # tied names -> the name their tensor travels under
        # What an update is checked against: names, dtypes, shapes (meta tensors hold no memory).
        self._specs = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in state.items()}
        self._tensor_count, self._parameter_bytes = loaded.parameter_summary()
        self._adapters = AdapterMerger()  # LoRA updates -> merged weights (common/adapters.py)
        self._cache_kwarg = cache_kwarg(self.model)
        self._piece_texts: dict[int, str] = {}  # token id -> text decoded alone (alternatives)
        # shared with the scheduler thread, under _cond:
        self._cond = threading.Condition()
        self._pending: deque[_Sequence] = deque()
        self._jobs: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._closing = False
        self._accepting = True
        self._outbox: list[tuple[GenerationStream, object]] = []  # events of this step, scheduler thread only
        # owned by the scheduler thread:
        self._batches: dict[int, Batch] = {}  # model version -> its running sequences
        self._retired: dict[int, dict[str, torch.Tensor]] = {}  # old version -> its changed tensors
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding forwards run (for benchmarks and tests)

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        if config.threads:
            torch.set_num_threads(config.threads)
        engine = cls(load_causal_lm(config.model, config.device, config.dtype), config)
        engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """One prefill, one batched step and one removal: fails at load, not on the first request,
        when the model's cache does not fit the batching scheme."""
        with torch.inference_mode():
            batch = Batch(self.version, self.device)
            for prompt in ([0, 1, 2], [3]):
                ids = torch.tensor([prompt], device=self.device) % self.vocab_size  # (1, L)
                out = self._forward(ids, torch.ones_like(ids), None, DynamicCache(config=self.model.config), self.version)
                batch.add(object(), output_cache(out), len(prompt))
            inputs = batch.step_inputs([4, 5])
            out = self._forward(inputs.input_ids, inputs.attention_mask, inputs.position_ids, batch.cache, self.version)
            batch.advance(inputs, output_cache(out))
            batch.keep([1])

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="policy-scheduler", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """Draining: new Generate calls get UNAVAILABLE; running streams go on."""
        self._accepting = False

    async def close(self) -> None:
        """Cancel whatever still runs and stop the scheduler thread."""
        self._accepting = False
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> int:
        return sum(len(b) for b in self._batches.values())

    # ---- Generate -----------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> GenerationStream:
        """Validate and queue a request; must be called from the event loop that reads the
        stream. Raises InvalidArgument (nothing queued) or Unavailable / ResourceExhausted."""
        prompt_ids = self._prompt_ids(request.prompt_text, request.prompt_token_ids)
        request.params.validate(self.config.max_new_tokens_limit, self.vocab_size)
        if not self._accepting:
            raise Unavailable("the server is shutting down")
        stream = GenerationStream(self, asyncio.get_running_loop())
        sequence = _Sequence(
            stream=stream,
            generation_id=str(uuid.uuid4()),
            prompt_ids=prompt_ids,
            sampler=SamplerState(request.params, self.device),
            decoder=IncrementalDecoder(self.tokenizer, prompt_ids),
        )
        with self._cond:
            if len(self._pending) >= self.config.max_queue:
                raise ResourceExhausted(f"{len(self._pending)} requests are waiting for a decoding slot; retry later")
            self._pending.append(sequence)
            self._cond.notify_all()
        return stream

    def _prompt_ids(self, text: str, ids: Sequence[int], field: str = "prompt") -> list[int]:
        """Exactly one of text / ids, every id in the vocabulary, room for one new token."""
        text_field, ids_field = f"{field}_text", f"{field}_token_ids"
        if text and ids:
            raise InvalidArgument(f"give exactly one of {text_field} and {ids_field}, not both", text_field)
        if not text and not ids:
            raise InvalidArgument(f"empty prompt: give {text_field} or {ids_field}", text_field)
        limit = self.config.max_prompt_tokens
        if text:
            self._check_text(text, text_field)
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
            if not ids:
                raise InvalidArgument("tokenizes to no tokens", text_field)
            used = text_field
        else:
            used = ids_field
        if len(ids) > limit:
            raise InvalidArgument(f"{len(ids)} tokens; the server's limit is {limit} (--max-prompt-tokens)", used)
        if used == ids_field:
            self._check_ids(ids, ids_field)
        if len(ids) >= self.max_length:
            raise InvalidArgument(
                f"{len(ids)} tokens; the model's maximum length is {self.max_length} (prompt + at least one new token)",
                used,
            )
        return [int(i) for i in ids]

    def _check_text(self, text: str, field: str) -> None:
        """Texts are tokenized on the caller's time; a huge one would stall everybody else."""
        if len(text) > self.config.max_text_chars:
            raise InvalidArgument(f"{len(text)} characters; the server's limit is {self.config.max_text_chars} "
                                  "(--max-text-chars)", field)

    def _check_length(self, count: int, field: str) -> None:
        """Token id lists and span lists longer than the model's length cannot describe a sequence."""
        if count > self.max_length:
            raise InvalidArgument(f"{count} entries; at most the model's length {self.max_length}", field)

    def _check_ids(self, ids: Sequence[int], field: str) -> None:
        for index, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise InvalidArgument(f"{token} is outside the vocabulary [0, {self.vocab_size})", f"{field}[{index}]")

    # ---- Score --------------------------------------------------------------------------------

    async def score(self, request: ScoreRequest) -> ScoreResult:
        prompt_ids = self._prompt_ids(request.prompt_text, request.prompt_token_ids)
        if request.completion_text and request.completion_token_ids:
            raise InvalidArgument("give exactly one of completion_text and completion_token_ids", "completion_text")
        if request.completion_text:
            self._check_text(request.completion_text, "completion_text")
            completion = self.tokenizer(request.completion_text, add_special_tokens=False)["input_ids"]
            if not completion:
                raise InvalidArgument("tokenizes to no tokens", "completion_text")
        elif request.completion_token_ids:
            completion = list(request.completion_token_ids)
            self._check_ids(completion, "completion_token_ids")
        else:
            raise InvalidArgument("empty completion: give completion_text or completion_token_ids", "completion_text")
        if len(prompt_ids) + len(completion) > self.max_length:
            raise InvalidArgument(
                f"prompt + completion is {len(prompt_ids) + len(completion)} tokens; the model's maximum is "
                f"{self.max_length}", "completion_token_ids" if request.completion_token_ids else "completion_text")
        if not 0 <= request.num_alternatives <= MAX_ALTERNATIVES:
            raise InvalidArgument(f"must be in [0, {MAX_ALTERNATIVES}], got {request.num_alternatives}",
                                  "num_alternatives")
        if len(request.candidate_token_ids) > MAX_CANDIDATES:
            raise InvalidArgument(f"at most {MAX_CANDIDATES}, got {len(request.candidate_token_ids)}",
                                  "candidate_token_ids")
        self._check_ids(request.candidate_token_ids, "candidate_token_ids")
        completion = [int(i) for i in completion]
        return await self._submit_job(lambda: self._score(prompt_ids, completion, request))

    def _score(self, prompt_ids: list[int], completion: list[int], request: ScoreRequest) -> ScoreResult:
        """On the scheduler thread: one forward over prompt + completion (teacher forcing)."""
        ids = torch.tensor([prompt_ids + completion], device=self.device)  # (1, P + C)
        out = self._forward(ids, torch.ones_like(ids), None, None, self.version, use_cache=False)
        start = len(prompt_ids) - 1  # logits at position i predict token i + 1
        logits = out.logits[0, start : start + len(completion)].float()  # (C, V)
        logprobs = torch.log_softmax(logits, dim=-1)  # (C, V)
        targets = torch.tensor(completion, device=self.device)  # (C,)
        token_lps = logprobs.gather(1, targets[:, None])  # (C, 1)
        ranks = ((logprobs > token_lps).sum(dim=1) + 1).tolist()  # (C,)
        token_lps = token_lps[:, 0].tolist()
        n = request.num_alternatives
        top = torch.topk(logprobs, n, dim=-1) if n else None  # (C, n)
        top_ids, top_lps = (top.indices.tolist(), top.values.tolist()) if top is not None else (None, None)
        if request.candidate_token_ids:
            candidates = torch.tensor(request.candidate_token_ids, device=self.device)  # (K,)
            cand = logprobs.index_select(1, candidates).tolist()  # (C, K)
        else:
            cand = [[] for _ in completion]
        text, pieces = pieces_from_ids(self.tokenizer, completion, prompt_ids)
        tokens = tuple(
            ScoredToken(
                position=t, token_id=piece.token_id, text=piece.text, char_start=piece.char_start,
                char_end=piece.char_end, logprob=token_lps[t], rank=int(ranks[t]),
                alternatives=self._alternatives(top_ids[t], top_lps[t]) if n else (),
                candidate_logprobs=tuple(cand[t]),
            )
            for t, piece in enumerate(pieces)
        )
        return ScoreResult(tuple(prompt_ids), tokens, float(sum(token_lps)), text, self.version)

    # ---- Tokenize, AlignSpans, GetModelInfo (no model needed) ------------------------------------

    def tokenize(self, text: str = "", token_ids: Sequence[int] = (), add_special_tokens: bool = False) -> TokenizeResult:
        if text and token_ids:
            raise InvalidArgument("give exactly one of text and token_ids", "text")
        self._check_text(text, "text")
        self._check_length(len(token_ids), "token_ids")
        if token_ids:
            self._check_ids(token_ids, "token_ids")
            decoded, pieces = pieces_from_ids(self.tokenizer, [int(i) for i in token_ids])
            return TokenizeResult(tuple(pieces), decoded)
        _, pieces = pieces_from_text(self.tokenizer, text, add_special_tokens)
        return TokenizeResult(tuple(pieces), text)

    def align_spans(self, text: str, token_ids: Sequence[int], spans: Sequence[Span]) -> AlignResult:
        self._check_text(text, "text")
        self._check_length(len(token_ids), "token_ids")
        self._check_length(len(spans), "spans")
        if token_ids:
            self._check_ids(token_ids, "token_ids")
            decoded, pieces = pieces_from_ids(self.tokenizer, [int(i) for i in token_ids])
            if text and text != decoded:
                raise InvalidArgument(f"differs from the decoded token_ids ({decoded[:80]!r})", "text")
            text = decoded
        else:
            _, pieces = pieces_from_text(self.tokenizer, text)
        return AlignResult(tuple(align_spans(text, pieces, spans, "spans")), tuple(pieces), text)

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_name=self.loaded.name,
            vocab_size=self.vocab_size,
            special_tokens=tuple(self.loaded.special_tokens()),
            max_length=self.max_length,
            max_new_tokens=self.config.max_new_tokens_limit,
            model_version=self.version,
            dtype=dtype_name(self.loaded.dtype),
            device=str(self.device),
            tensor_count=self._tensor_count,
            parameter_bytes=self._parameter_bytes,
        )

    # ---- UpdateWeights ------------------------------------------------------------------------

    def begin_update(self) -> WeightAccumulator:
        """An accumulator for one update (header, chunks, commit), checked against the model; it
        takes full tensors or LoRA adapter factors (common/adapters.py)."""
        return UpdateAccumulator(self._specs, self.version, self._canonical,
                                 max_total_bytes=self.config.max_update_bytes or None)

    async def commit_update(self, update: WeightAccumulator, sha256: str) -> UpdateResult:
        """Check totals and checksum, then swap at the next step boundary. Nothing changes unless
        everything is right."""
        tensors = await asyncio.to_thread(update.commit, sha256)
        target = update.target_version
        version = await self._submit_job(lambda: self._swap_update(target, tensors))
        return UpdateResult(version, len(tensors), update.bytes_received)

    def _swap_update(self, target: int, tensors: dict[str, torch.Tensor]) -> int:
        """On the scheduler thread: adapter factors become merged weights, then the swap."""
        if target <= self.version:  # checked again by _swap; here before any merging work
            raise Aborted(f"the server moved to version {self.version} meanwhile; target {target} is stale",
                          "header.target_version")
        full, base = self._adapters.resolve(tensors, self.model.state_dict())
        version = self._swap(target, full)
        self._adapters.applied(base)
        return version

    def _swap(self, target: int, tensors: dict[str, torch.Tensor]) -> int:
        """On the scheduler thread, between steps."""
        if target <= self.version:
            raise Aborted(f"the server moved to version {self.version} meanwhile; target {target} is stale",
                          "header.target_version")
        new = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        current = self.model.state_dict(keep_vars=True)
        old = {name: current[name].detach() for name in new}  # keeps the old storage alive
        for retired in self._retired.values():
            for name, tensor in old.items():
                retired.setdefault(name, tensor)
        if len(self._batches.get(self.version, ())):
            self._retired[self.version] = dict(old)
        for name, tensor in new.items():
            self._set_tensor(name, tensor)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("weights: version %d -> %d (%d tensors, %d bytes); %d running stream(s) keep version %d",
                 self.version, target, len(new), sum(tensor_nbytes(t) for t in new.values()),
                 len(self._batches.get(self.version, ())), self.version)
        self.version = target
        return target

    def _set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        owner_name, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr].data = tensor  # tied modules share this Parameter
        elif attr in owner._buffers:
            owner._buffers[attr] = tensor
        else:
            raise AssertionError(f"{name} is neither a parameter nor a buffer")

    # ---- the scheduler thread -----------------------------------------------------------------

    async def _submit_job(self, fn: Callable[[], object]):
        if self._closing:
            raise Unavailable("the server is shutting down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._jobs.append((fn, future))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        if self.config.threads:  # OpenMP thread counts are per calling thread: set it where the model runs
            torch.set_num_threads(self.config.threads)
        try:
            with torch.inference_mode():
                while self._step():
                    self._flush()
        except BaseException:  # noqa: BLE001 - logged; streams get the error instead of hanging
            log.exception("scheduler thread died")
            raise
        finally:
            self._fail_all(Unavailable("the server is shutting down"))
            self._flush()

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not per event."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in self._outbox:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for stream, _ in items:
                    stream.cancelled = True

    def _step(self) -> bool:
        with self._cond:
            while not (self._closing or self._pending or self._jobs or self.running):
                self._cond.wait()
            if self._closing:
                return False
            jobs = list(self._jobs)
            self._jobs.clear()
            free = self.config.max_batch - self.running
            admitted = [self._pending.popleft() for _ in range(min(free, len(self._pending)))]
        for fn, future in jobs:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - goes back to the caller
                    future.set_exception(exc)
        self._drop_cancelled()
        for sequence in admitted:
            if sequence.stream.cancelled:
                continue
            try:
                self._prefill(sequence)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                log.exception("prefill failed")
                sequence.stream._push(exc)
        self._flush()  # first tokens out before the batch's decoding step
        for version, batch in list(self._batches.items()):
            if len(batch):
                try:
                    self._decode(batch)
                except Exception as exc:  # noqa: BLE001
                    log.exception("decoding step failed")
                    for sequence in batch.rows:
                        sequence.stream._push(exc)
                    batch.keep([])
            if not len(batch) and version != self.version:
                del self._batches[version]
        for version in list(self._retired):
            if version not in self._batches:
                del self._retired[version]
        return True

    def _drop_cancelled(self) -> None:
        for batch in self._batches.values():
            keep = []
            for i, sequence in enumerate(batch.rows):
                if sequence.stream.cancelled:
                    log.info("generation %s cancelled after %d tokens", sequence.generation_id,
                             len(sequence.completion_ids))
                else:
                    keep.append(i)
            batch.keep(keep)
        with self._cond:
            self._pending = deque(s for s in self._pending if not s.stream.cancelled)

    def _forward(self, input_ids, attention_mask, position_ids, cache, version: int, use_cache: bool = True):
        kwargs = {"input_ids": input_ids, "use_cache": use_cache}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        if version == self.version:
            return self.model(**kwargs)
        # An older version still has running streams: the same module with its old tensors.
        return functional_call(self.model, self._retired[version], (), kwargs, tie_weights=True, strict=False)

    def _prefill(self, sequence: _Sequence) -> None:
        sequence.version = self.version
        sequence.stream._push(GenerationStart(
            sequence.generation_id, tuple(sequence.prompt_ids),
            self.tokenizer.decode(sequence.prompt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
            sequence.version,
        ))
        ids = torch.tensor([sequence.prompt_ids], device=self.device)  # (1, P)
        out = self._forward(ids, torch.ones_like(ids), None, DynamicCache(config=self.model.config), sequence.version)
        [sample] = sample_rows(out.logits[:, -1, :], [sequence.sampler])  # logits (1, V)
        if self._emit(sequence, sample):
            return
        batch = self._batches.setdefault(self.version, Batch(self.version, self.device))
        batch.add(sequence, output_cache(out), len(sequence.prompt_ids))

    def _decode(self, batch: Batch) -> None:
        inputs = batch.step_inputs([s.completion_ids[-1] for s in batch.rows])
        out = self._forward(inputs.input_ids, inputs.attention_mask, inputs.position_ids, batch.cache, batch.version)
        batch.advance(inputs, output_cache(out))
        self.steps += 1
        samples = sample_rows(out.logits[:, -1, :], [s.sampler for s in batch.rows])  # logits (B, V)
        keep = [i for i, (s, sample) in enumerate(zip(batch.rows, samples, strict=True)) if not self._emit(s, sample)]
        batch.keep(keep)

    def _emit(self, sequence: _Sequence, sample: Sample) -> bool:
        """Stream one token (and the end when it is the last). Returns True when finished."""
        sequence.completion_ids.append(sample.token_id)
        params = sequence.params
        count = len(sequence.completion_ids)
        finish = None
        if params.stop_on_eos and sample.token_id in self.eos_ids:
            finish = FinishReason.EOS
        elif count >= params.max_new_tokens or len(sequence.prompt_ids) + count >= self.max_length:
            finish = FinishReason.LENGTH
        before = len(sequence.decoder.text)
        piece = sequence.decoder.push(sample.token_id, final=finish is not None)
        stop = ""
        if finish is None and params.stop and piece.text:
            text = sequence.decoder.text
            for s in params.stop:
                if s in text[max(0, before - len(s) + 1) :]:
                    finish, stop = FinishReason.STOP, s
                    break
        sequence.stream._push(TokenEvent(
            position=count - 1, token_id=sample.token_id, text=piece.text, char_start=piece.char_start,
            char_end=piece.char_end, logprob=sample.logprob, sampling_logprob=sample.sampling_logprob,
            alternatives=self._alternatives(*zip(*sample.alternatives, strict=True)) if sample.alternatives else (),
            rank=sample.rank, model_version=sequence.version,
        ))
        if finish is None:
            return False
        sequence.stream._push(GenerationEnd(
            finish_reason=finish, stop_sequence=stop, prompt_tokens=len(sequence.prompt_ids),
            completion_tokens=count, completion_text=sequence.decoder.text, model_version=sequence.version,
        ))
        sequence.stream._push(_DONE)
        return True

    def _alternatives(self, ids: Sequence[int], logprobs: Sequence[float]) -> tuple[Alternative, ...]:
        return tuple(Alternative(int(i), self._piece_text(int(i)), float(lp)) for i, lp in zip(ids, logprobs, strict=True))

    def _piece_text(self, token_id: int) -> str:
        text = self._piece_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            self._piece_texts[token_id] = text
        return text

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), deque()
            jobs, self._jobs = list(self._jobs), deque()
        for batch in self._batches.values():
            pending.extend(batch.rows)
            batch.keep([])
        for sequence in pending:
            if not sequence.stream.done:
                sequence.stream._push(error)
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
