"""The policy engine on vLLM (`python -m policy_server --engine vllm`): the same contract as the
Hugging Face engine (policy_server/engine.py), with vLLM's AsyncLLM doing the model work.

Everything a request is checked against, the tokenizer side (Tokenize, AlignSpans, pieces, stop
strings, finish reasons) and the events a stream carries are the Hugging Face engine's own code,
inherited; only the model side differs. vLLM is imported here and nowhere else, so the default
path needs none of it; `load` says how to install it when it is missing.

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
- Score needs prompt + completion < the model's length (vLLM wants room for one new token);
  the Hugging Face engine takes prompt + completion <= the model's length.
- candidate_token_ids in Score ask vLLM for the whole row of prompt logprobs (V floats per token).

Weight updates (UpdateWeights): vLLM holds one set of weights, so a stream cannot keep old weights
while new streams use new ones. The swap pauses admission instead: new Generate and Score calls
wait, running streams finish on the old weights, then the checked update (common/weights.py) is
written to a safetensors file that every worker loads through the model's `load_weights`
(policy_server/vllm_worker.py), the prefix cache is reset, the version goes up and admission
resumes. So every token of a stream comes from the version its start announced; the price is that
an update waits for the longest running stream (docs/design.md, "Versions and staleness").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from common.errors import Aborted, InvalidArgument, ResourceExhausted, Unavailable
from common.hf import LoadedModel, resolve_dtype
from common.spans import IncrementalDecoder, pieces_from_ids
from common.weights import WeightAccumulator, dtype_name, tensor_nbytes
from policy_server.api import GenerateRequest, ScoredToken, ScoreRequest, ScoreResult, UpdateResult
from policy_server.engine import _DONE, Engine, EngineConfig, GenerationStream, _Sequence
from policy_server.sampling import Sample, SamplerState, SamplingParams, sampling_logprobs

log = logging.getLogger(__name__)



class VllmStream(GenerationStream):
    """A GenerationStream fed from the event loop (the Hugging Face engine feeds it from its
    scheduler thread); `cancel()` cancels the task that drives the vLLM request."""

    def __init__(self, engine: VllmEngine, loop: asyncio.AbstractEventLoop):
        super().__init__(engine, loop)
        self.task: asyncio.Task | None = None

    def cancel(self) -> None:
        if not self.done and not self.cancelled:
            self.cancelled = True
            if self.task is not None:
                self.task.cancel()

    def _push(self, item) -> None:
        self._queue.put_nowait(item)


class VllmEngine(Engine):
    """Engine's interface (generate, score, tokenize, align_spans, model_info, begin_update,
    commit_update, start, stop_accepting, close) on vLLM's AsyncLLM. Create with `load` and use
    from one event loop: AsyncLLM lives on the loop that first uses it (`start`)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, specs: dict[str, torch.Tensor],
                 canonical: dict[str, str]):
        # Not Engine.__init__: no model in this process, only its description (meta tensors).
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.vocab_size = loaded.vocab_size
        self.max_length = min(loaded.max_length, config.max_model_len or loaded.max_length)
        self.eos_ids = loaded.eos_token_ids()
        self.version = 0
        self._canonical = canonical
        self._specs = specs
        unique = {name: specs[name] for name in set(canonical.values())}
        self._tensor_count = len(unique)
        self._parameter_bytes = sum(tensor_nbytes(t) for t in unique.values())
        self._piece_texts: dict[int, str] = {}
        self.llm = None  # vllm AsyncLLM, created by load()
        self._warm_up: asyncio.Task | None = None
        self._accepting = True
        self._closing = False
        self._inflight = 0  # Generate / Score calls admitted or waiting for admission
        self._active = 0  # requests inside vLLM (all on self.version)
        self._open = asyncio.Event()  # set: admission open (cleared while weights are swapped)
        self._open.set()
        self._idle = asyncio.Condition()  # notified when _active drops to 0
        self._update_lock = asyncio.Lock()  # one swap at a time
        self._tasks: set[asyncio.Task] = set()
        self.steps = 0

    # ---- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, config: EngineConfig) -> VllmEngine:
        """Describe the model (config, tokenizer, tensor names and shapes; no weights here) and
        start vLLM's engine core and workers, which load the weights (a minute on a CPU)."""
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            from policy_server.server import INSTALL_HINT

            raise RuntimeError(f"--engine vllm: vLLM is not installed in this Python ({exc}); {INSTALL_HINT}") from exc
        if config.threads:
            torch.set_num_threads(config.threads)
        loaded, specs, canonical = describe_model(config.model, config.device, config.dtype)
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
        engine = cls(loaded, config, specs, canonical)
        # Created here, off the event loop; AsyncLLM starts its output task on first use.
        engine.llm = AsyncLLM.from_engine_args(args)
        return engine

    # ---- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """On the serving event loop: a first short generation in the background, so that vLLM's
        warm-up (half a minute on a CPU) is not paid by the first client alone."""
        self._warm_up = asyncio.get_running_loop().create_task(self._generate_once())

    async def _generate_once(self) -> None:
        from vllm import SamplingParams as VllmSamplingParams

        warm = VllmSamplingParams(max_tokens=2, detokenize=False, logprobs=1, temperature=1.0, seed=0)
        async for _ in self.llm.generate({"prompt_token_ids": [0]}, warm, request_id=f"warm-up-{uuid.uuid4()}"):
            pass

    def stop_accepting(self) -> None:
        self._accepting = False

    async def close(self) -> None:
        self._accepting = False
        self._closing = True
        if self._warm_up is not None:
            self._warm_up.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)

    @property
    def running(self) -> int:
        return self._active

    # ---- admission ------------------------------------------------------------------------------

    def _reserve(self) -> None:
        """Synchronous part of admission: count the call (RESOURCE_EXHAUSTED past the limit)."""
        if not self._accepting or self._closing:
            raise Unavailable("the server is shutting down")
        if self.llm is None:
            raise Unavailable("the model is still loading")
        limit = self.config.max_batch + self.config.max_queue
        if self._inflight >= limit:
            raise ResourceExhausted(f"{self._inflight - self.config.max_batch} requests are waiting for a decoding "
                                    "slot; retry later")
        self._inflight += 1

    async def _enter(self) -> int:
        """Wait until no swap is in progress; returns the version this call runs on."""
        while not self._open.is_set():
            await self._open.wait()
        self._active += 1
        return self.version

    async def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            async with self._idle:
                self._idle.notify_all()

    # ---- Generate -------------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> VllmStream:
        prompt_ids = self._prompt_ids(request.prompt_text, request.prompt_token_ids)
        request.params.validate(self.config.max_new_tokens_limit, self.vocab_size)
        self._reserve()
        loop = asyncio.get_running_loop()
        stream = VllmStream(self, loop)
        sequence = _Sequence(
            stream=stream, generation_id=str(uuid.uuid4()), prompt_ids=prompt_ids,
            sampler=SamplerState(request.params, self.device), decoder=IncrementalDecoder(self.tokenizer, prompt_ids),
        )
        stream.task = loop.create_task(self._drive(sequence))
        self._tasks.add(stream.task)
        stream.task.add_done_callback(self._tasks.discard)
        return stream

    async def _drive(self, sequence: _Sequence) -> None:
        """One stream: wait for admission, run the vLLM request, turn its outputs into events."""
        stream = sequence.stream
        entered = False
        try:
            sequence.version = await self._enter()
            entered = True
            from policy_server.api import GenerationStart

            stream._push(GenerationStart(
                sequence.generation_id, tuple(sequence.prompt_ids),
                self.tokenizer.decode(sequence.prompt_ids, skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False),
                sequence.version,
            ))
            params = sequence.params
            want = logprobs_wanted(params, self.vocab_size)
            vllm_params = self._vllm_params(params, len(sequence.prompt_ids), want, sequence.sampler.seed)
            generator = self.llm.generate({"prompt_token_ids": sequence.prompt_ids}, vllm_params,
                                          request_id=sequence.generation_id)
            async with contextlib.aclosing(generator):
                async for output in generator:
                    completion = output.outputs[0]
                    for token_id, logprobs in zip(completion.token_ids, completion.logprobs, strict=True):
                        self.steps += 1
                        if self._emit(sequence, self._sample(token_id, logprobs, params)):
                            return  # closing the generator aborts the request in vLLM (stop strings)
                    if output.finished:
                        raise RuntimeError(f"vLLM ended generation {sequence.generation_id} after "
                                       f"{len(sequence.completion_ids)} tokens ({completion.finish_reason}) "
                                       "before the contract's finish")
        except asyncio.CancelledError:
            log.info("generation %s cancelled after %d tokens", sequence.generation_id, len(sequence.completion_ids))
            stream._push(_DONE)
            raise
        except Exception as exc:  # noqa: BLE001 - this stream fails with it; the others go on
            if not isinstance(exc, Unavailable):
                log.exception("generation %s failed", sequence.generation_id)
            stream._push(exc)
        finally:
            self._inflight -= 1
            if entered:
                await self._leave()

    def _vllm_params(self, params: SamplingParams, prompt_len: int, logprobs: int, seed: int):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            max_tokens=min(params.max_new_tokens, self.max_length - prompt_len),
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=seed % 2**63,  # vLLM takes a signed 64-bit seed; distinct seeds stay distinct per engine
            ignore_eos=not params.stop_on_eos,
            stop_token_ids=sorted(self.eos_ids) if params.stop_on_eos else None,
            logprobs=logprobs,
            detokenize=False,  # the text comes from common.spans' decoder, as on the HF engine
            output_kind=RequestOutputKind.DELTA,
        )

    def _sample(self, token_id: int, logprobs: dict, params: SamplingParams) -> Sample:
        """A Sample (policy_server/sampling.py) from vLLM's {token id: Logprob} of one position."""
        mine = logprobs[token_id]
        n = params.num_alternatives
        ranked = sorted(((lp.rank, i, lp.logprob) for i, lp in logprobs.items() if lp.rank is not None))
        alternatives = tuple((i, lp) for rank, i, lp in ranked if rank <= n)[:n]
        if params.temperature == 0.0:
            behavior = 0.0
        elif params.temperature == 1.0 and not params.truncates:
            behavior = mine.logprob
        else:
            row = torch.full((self.vocab_size,), float("-inf"))  # (V,) raw logprobs; absent = outside the top
            ids = torch.tensor(list(logprobs.keys()))  # (K,)
            row[ids] = torch.tensor([lp.logprob for lp in logprobs.values()])
            behavior = float(sampling_logprobs(row, row, params)[token_id])
        return Sample(int(token_id), float(mine.logprob), behavior, int(mine.rank), alternatives)

    # ---- Score ----------------------------------------------------------------------------------

    async def _submit_job(self, fn: Callable[[], object]):
        """Engine.score validates, then submits `lambda: self._score(...)`: run it admitted."""
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

    async def _score(self, prompt_ids: list[int], completion: list[int], request: ScoreRequest) -> ScoreResult:
        """Teacher forcing through vLLM's prompt logprobs over prompt + completion."""
        from vllm import SamplingParams as VllmSamplingParams

        total = len(prompt_ids) + len(completion)
        if total >= self.max_length:
            raise InvalidArgument(
                f"prompt + completion is {total} tokens; on the vLLM engine it must be below the model's maximum "
                f"{self.max_length} (vLLM needs room for one new token)",
                "completion_token_ids" if request.completion_token_ids else "completion_text")
        version = self.version
        n = request.num_alternatives
        want = self.vocab_size if request.candidate_token_ids else n
        params = VllmSamplingParams(max_tokens=1, prompt_logprobs=want, detokenize=False, temperature=0.0)
        result = None
        async for output in self.llm.generate({"prompt_token_ids": prompt_ids + completion}, params,
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
                alternatives=self._alternatives(*zip(*top, strict=True)) if top else (),
                candidate_logprobs=tuple(float(row[c].logprob) for c in request.candidate_token_ids),
            ))
        return ScoreResult(tuple(prompt_ids), tuple(tokens), float(sum(t.logprob for t in tokens)), text, version)

    # ---- UpdateWeights --------------------------------------------------------------------------

    def begin_update(self) -> WeightAccumulator:
        return WeightAccumulator(self._specs, self.version, self._canonical,
                                 max_total_bytes=self.config.max_update_bytes or None)

    async def commit_update(self, update: WeightAccumulator, sha256: str) -> UpdateResult:
        """Check everything, pause admission, let running streams finish, load into every worker,
        reset the prefix cache, bump the version, resume."""
        from safetensors.torch import save_file

        tensors = await asyncio.to_thread(update.commit, sha256)
        target = update.target_version
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
                folder = "/dev/shm" if Path("/dev/shm").is_dir() else None  # RAM, where there is one
                with tempfile.TemporaryDirectory(prefix="tokenfeedback-update-", dir=folder) as tmp:
                    path = str(Path(tmp) / "update.safetensors")
                    await asyncio.to_thread(save_file, {k: v.contiguous() for k, v in tensors.items()}, path)
                    await self.llm.collective_rpc("load_update", args=(path,))
                await self.llm.reset_prefix_cache()
                log.info("weights: version %d -> %d (%d tensors, %d bytes) loaded into vLLM", self.version, target,
                         len(tensors), sum(tensor_nbytes(t) for t in tensors.values()))
                self.version = target
            finally:
                self._open.set()
        return UpdateResult(target, len(tensors), update.bytes_received)

    # ---- what the model reports -----------------------------------------------------------------

    def model_info(self):
        info = super().model_info()
        from dataclasses import replace

        return replace(info, max_length=self.max_length, device=self.device_name)

    @property
    def device_name(self) -> str:
        from vllm.platforms import current_platform

        return current_platform.device_type


def logprobs_wanted(params: SamplingParams, vocab_size: int) -> int:
    """How many raw logprobs per token to ask vLLM for: the alternatives, and whatever
    sampling_logprob needs (nothing at temperature 0 or 1 untruncated, the top top_k for top-k,
    the whole row otherwise)."""
    if params.temperature == 0.0 or (params.temperature == 1.0 and not params.truncates):
        need = 0
    elif params.top_k > 0 and params.top_p >= 1.0:
        need = min(params.top_k, vocab_size)
    else:
        need = vocab_size
    return max(params.num_alternatives, need)


def describe_model(name: str, device: str, dtype: str) -> tuple[LoadedModel, dict[str, torch.Tensor], dict[str, str]]:
    """The model without its weights: config, tokenizer, and its state dict as meta tensors (what an
    update is checked against), with tied names mapped to the name their tensor travels under."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    resolved_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    local = Path(name).exists()
    if not local and (name.startswith((".", "/")) or name.count("/") > 1):
        raise FileNotFoundError(f"model folder {name!r} does not exist (build the demo model with `make model`)")
    kwargs = {"local_files_only": True} if local else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    config = AutoConfig.from_pretrained(name, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolved_dtype)
    with contextlib.suppress(OSError):  # eos ids the folder's generation_config.json adds
        model.generation_config = GenerationConfig.from_pretrained(name, **kwargs)
    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    canonical = {n: first.setdefault(id(t), n) for n, t in state.items()}  # tied parameters are one object
    specs = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in state.items()}
    return LoadedModel(name, model, tokenizer, resolved_device, resolved_dtype), specs, canonical
