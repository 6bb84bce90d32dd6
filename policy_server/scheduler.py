"""The scheduler: one thread that runs all model work, in a loop of steps, and the streams it feeds.

A step: run queued jobs (Score, weight swaps), drop cancelled sequences, prefill the newly
admitted requests together (left-padded in one forward, in groups of similar length; each
samples its first token), then one forward for all running sequences of a model version
(batch.py) and one sampled token per sequence. So requests that arrive together share their
prefill, and concurrent streams share one forward per decoding step (docs/design.md, "Servers"). Events produced during a step are handed to
their event loops at its end, one wake-up per loop.

Rows fail alone: a sequence whose row cannot be sampled (non-finite logits or probabilities) or
whose token cannot be emitted ends with its own error status, and the step goes on for the others
(docs/design.md, "Errors and limits"). Only an error of the shared forward itself ends every
sequence of that batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from common.errors import ResourceExhausted, ServiceError, Unavailable, quote
from common.metrics import policy_meter
from common.spans import IncrementalDecoder
from policy_server.api import (
    Alternative,
    FinishReason,
    GenerateEvent,
    GenerationEnd,
    GenerationStart,
    TokenEvent,
)
from policy_server.batch import Batch, cache_kwarg, output_cache, takes_logits_to_keep
from policy_server.config import EngineConfig
from policy_server.sampling import Sample, SamplerState, SamplingParams, sample_rows
from policy_server.swap import ModelVersions

log = logging.getLogger(__name__)

_DONE = object()  # end-of-stream marker on a stream's queue


# ---- a generation stream, as a transport sees it --------------------------------------------


class GenerationStream:
    """Async iterator of GenerateEvents for one request. `cancel()` frees the slot at the next
    step boundary (the scheduler never waits for a slow reader: events queue up here)."""

    def __init__(self, wake: Callable[[], None], loop: asyncio.AbstractEventLoop):
        self._wake = wake
        self.loop = loop
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
            self._wake()


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
    queued_at: float = field(default_factory=time.monotonic)  # for the time to first token

    @property
    def params(self):
        return self.sampler.params


def _left_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask, position_ids) for prompts right-aligned in one (n, W) block;
    position_ids None when no prompt is padded (the model's own positions are the same)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # (n, W)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)  # (n, W)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    padded = any(len(p) != width for p in prompts)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0) if padded else None  # (n, W) each row from 0
    return ids.to(device), mask.to(device), positions.to(device) if padded else None


MAX_PADDING = 0.5  # a prefill group's padded block holds at most this share of padding tokens


def _length_groups(sequences: list[_Sequence]) -> list[list[_Sequence]]:
    """The admitted sequences in groups to prefill together: by prompt length, a new group where
    the padding would pass MAX_PADDING of the group's padded block."""
    groups: list[list[_Sequence]] = []
    group: list[_Sequence] = []
    real = 0
    for sequence in sorted(sequences, key=lambda s: len(s.prompt_ids)):
        length = len(sequence.prompt_ids)  # the longest so far: it sets the group's width
        if group and (real + length) < (1 - MAX_PADDING) * length * (len(group) + 1):
            groups.append(group)
            group, real = [], 0
        group.append(sequence)
        real += length
    if group:
        groups.append(group)
    return groups


# ---- the scheduler ---------------------------------------------------------------------------


class Scheduler:
    def __init__(self, versions: ModelVersions, tokenizer, config: EngineConfig, eos_ids: Sequence[int],
                 max_length: int, vocab_size: int):
        self.versions = versions
        self.model = versions.model
        self.device = versions.device
        self.tokenizer = tokenizer
        self.config = config
        self.eos_ids = eos_ids
        self.max_length = max_length
        self.vocab_size = vocab_size
        self._cache_kwarg = cache_kwarg(self.model)
        self._last_logits_only = takes_logits_to_keep(self.model)  # prefill computes (n, 1, V) logits, not (n, W, V)
        self._piece_texts: dict[int, str] = {}  # token id -> text decoded alone (alternatives)
        # shared with the scheduler thread, under _cond:
        self._cond = threading.Condition()
        self._pending: deque[_Sequence] = deque()
        self._jobs: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._closing = False
        self._outbox: list[tuple[GenerationStream, object]] = []  # events of this step, scheduler thread only
        # owned by the scheduler thread:
        self._batches: dict[int, Batch] = {}  # model version -> its running sequences
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding forwards run (for benchmarks and tests)
        self.prefills = 0  # prefill forwards run (one per group of prompts prefilled together)
        self.meter = policy_meter()  # tokens and first tokens (common/metrics.py)

    def warm_up(self) -> None:
        """One prefill, one batched step and one removal: fails at load, not on the first request,
        when the model's cache does not fit the batching scheme."""
        with torch.inference_mode():
            version = self.versions.version
            batch = Batch(version, self.device)
            ids, mask, positions = _left_padded([[0, 1, 2], [3]], self.device)  # (2, 3) each
            ids = ids % self.vocab_size
            out = self.forward(ids, mask, positions, DynamicCache(config=self.model.config), version, last_only=True)
            batch.merge(Batch.prefilled(version, self.device, [object(), object()], output_cache(out), mask))
            inputs = batch.step_inputs([4, 5])
            out = self.forward(inputs.input_ids, inputs.attention_mask, inputs.position_ids, batch.cache, version)
            batch.advance(inputs, output_cache(out))
            batch.keep([1])

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="policy-scheduler", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Cancel whatever still runs and stop the scheduler thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def running(self) -> int:
        return sum(len(b) for b in self._batches.values())

    @property
    def queued(self) -> int:
        """Requests waiting for a decoding slot."""
        return len(self._pending)

    # ---- what the engine hands in ----------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        """Queue a checked request; must be called from the event loop that reads the stream."""
        stream = GenerationStream(self.wake, asyncio.get_running_loop())
        sequence = _Sequence(
            stream=stream,
            generation_id=str(uuid.uuid4()),
            prompt_ids=prompt_ids,
            sampler=SamplerState(params, self.device),
            decoder=IncrementalDecoder(self.tokenizer, prompt_ids),
        )
        with self._cond:
            if len(self._pending) >= self.config.max_queue:
                raise ResourceExhausted(f"{len(self._pending)} requests are waiting for a decoding slot; retry later")
            self._pending.append(sequence)
            self._cond.notify_all()
        return stream

    async def run_job(self, fn: Callable[[], object]):
        """Run `fn` on the scheduler thread at the next step boundary; its result or exception."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._jobs.append((fn, future))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    def running_on(self, version: int) -> int:
        """Streams decoding on `version` (scheduler thread: for a weight swap)."""
        return len(self._batches.get(version, ()))

    # ---- the thread -------------------------------------------------------------------------

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

    def _push(self, stream: GenerationStream, item) -> None:
        """An event (or error, or _DONE) for `stream`, delivered at the step's end."""
        self._outbox.append((stream, item))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not per event."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in self._outbox:
            by_loop.setdefault(stream.loop, []).append((stream, item))
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
        self._prefill([s for s in admitted if not s.stream.cancelled])
        self._flush()  # first tokens out before the batch's decoding step
        for version, batch in list(self._batches.items()):
            if len(batch):
                try:
                    self._decode(batch)
                except Exception as exc:  # noqa: BLE001
                    log.exception("decoding step failed")
                    for sequence in batch.rows:
                        self._push(sequence.stream, exc)
                    batch.keep([])
            if not len(batch) and version != self.versions.version:
                del self._batches[version]
        self.versions.release(self._batches)
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

    def forward(self, input_ids, attention_mask, position_ids, cache, version: int, use_cache: bool = True,
                last_only: bool = False):
        """The model's forward at `version` (scheduler thread only); `last_only`: logits of the
        last position only, where the model can skip the others."""
        kwargs = {"input_ids": input_ids, "use_cache": use_cache}
        if last_only and self._last_logits_only:
            kwargs["logits_to_keep"] = 1
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        return self.versions.forward(version, **kwargs)

    def _prefill(self, sequences: list[_Sequence]) -> None:
        """Start the admitted sequences: their GenerationStart, then one forward per group of
        similar prompt lengths. A group whose forward fails is retried prompt by prompt, so one
        prompt the model cannot run fails alone."""
        version = self.versions.version
        for sequence in sequences:
            sequence.version = version
            self._push(sequence.stream, GenerationStart(
                sequence.generation_id, tuple(sequence.prompt_ids),
                self.tokenizer.decode(sequence.prompt_ids, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False),
                version,
            ))
        for group in _length_groups(sequences):
            try:
                self._prefill_group(group, version)
            except Exception as exc:  # noqa: BLE001 - these requests fail, the others go on
                if len(group) == 1:
                    log.exception("prefill failed")
                    self._push(group[0].stream, exc)
                    continue
                log.warning("prefill of %d prompts together failed (%s: %s); prefilling each alone", len(group),
                            type(exc).__name__, exc)
                for sequence in group:
                    try:
                        self._prefill_group([sequence], version)
                    except Exception as alone:  # noqa: BLE001
                        log.exception("prefill failed")
                        self._push(sequence.stream, alone)

    def _prefill_group(self, group: list[_Sequence], version: int) -> None:
        """One forward over the group's prompts, left-padded; each samples its first token, and
        those that go on join the running batch of `version`."""
        ids, mask, positions = _left_padded([s.prompt_ids for s in group], self.device)  # (n, W) each
        out = self.forward(ids, mask, positions, DynamicCache(config=self.model.config), version, last_only=True)
        self.prefills += 1
        samples = sample_rows(out.logits[:, -1, :], [s.sampler for s in group])  # logits (n, V)
        keep = [i for i, (s, sample) in enumerate(zip(group, samples, strict=True)) if not self._take(s, sample)]
        prefilled = Batch.prefilled(version, self.device, group, output_cache(out), mask)
        prefilled.keep(keep)
        self._batches.setdefault(version, Batch(version, self.device)).merge(prefilled)

    def _decode(self, batch: Batch) -> None:
        inputs = batch.step_inputs([s.completion_ids[-1] for s in batch.rows])
        out = self.forward(inputs.input_ids, inputs.attention_mask, inputs.position_ids, batch.cache, batch.version)
        batch.advance(inputs, output_cache(out))
        self.steps += 1
        samples = sample_rows(out.logits[:, -1, :], [s.sampler for s in batch.rows])  # logits (B, V)
        keep = [i for i, (s, sample) in enumerate(zip(batch.rows, samples, strict=True)) if not self._take(s, sample)]
        batch.keep(keep)

    def _take(self, sequence: _Sequence, sample: Sample | ServiceError) -> bool:
        """Emit a row's sampled token; True when its sequence is done: finished, or failed alone
        (its stream gets the error, the other rows are not affected)."""
        try:
            if isinstance(sample, ServiceError):
                raise sample
            return self._emit(sequence, sample)
        except Exception as exc:  # noqa: BLE001 - this sequence ends, the others go on
            error = exc if isinstance(exc, ServiceError) else ServiceError(
                f"internal error in this stream: {type(exc).__name__}: {quote(str(exc), 200)}")
            log.warning("generation %s failed after %d tokens: %s", sequence.generation_id,
                        len(sequence.completion_ids), error)
            self._push(sequence.stream, error)
            return True

    def _emit(self, sequence: _Sequence, sample: Sample) -> bool:
        """Stream one token (and the end when it is the last). Returns True when finished."""
        sequence.completion_ids.append(sample.token_id)
        params = sequence.params
        count = len(sequence.completion_ids)
        self.meter.tokens.inc()
        if count == 1:
            self.meter.first_token.observe(time.monotonic() - sequence.queued_at)
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
        self._push(sequence.stream, TokenEvent(
            position=count - 1, token_id=sample.token_id, text=piece.text, char_start=piece.char_start,
            char_end=piece.char_end, logprob=sample.logprob, sampling_logprob=sample.sampling_logprob,
            alternatives=self.alternatives(*zip(*sample.alternatives, strict=True)) if sample.alternatives else (),
            rank=sample.rank, model_version=sequence.version,
        ))
        if finish is None:
            return False
        self._push(sequence.stream, GenerationEnd(
            finish_reason=finish, stop_sequence=stop, prompt_tokens=len(sequence.prompt_ids),
            completion_tokens=count, completion_text=sequence.decoder.text, model_version=sequence.version,
        ))
        self._push(sequence.stream, _DONE)
        return True

    def alternatives(self, ids: Sequence[int], logprobs: Sequence[float]) -> tuple[Alternative, ...]:
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
                self._push(sequence.stream, error)
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
