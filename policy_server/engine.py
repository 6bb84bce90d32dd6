"""The policy engine: a causal LM behind a batching scheduler, with scoring, spans and weight swaps.

Knows nothing of gRPC. Transports (convert.py, bound to gRPC and Connect; tests; benchmarks) call
it with the dataclasses of api.py from an asyncio event loop:

    engine = Engine.load(EngineConfig(model="data/demo-model"))
    engine.start()
    async for event in engine.generate(GenerateRequest(prompt_text="Paris is")): ...
    await engine.score(ScoreRequest(...)); engine.tokenize(...); engine.align_spans(...)
    update = engine.begin_update(); update.header(...); update.chunk(...); await engine.commit_update(update, sha)
    await engine.close()

This is the facade: it checks every request (bad input raises InvalidArgument naming the field,
before any model work; docs/design.md, "Errors and limits") and hands the work to the scheduler
(scheduler.py: the one thread that runs the model, batching concurrent streams) and to the weight
swap (swap.py: updates checked completely, then swapped in between steps).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import torch

from common.errors import InvalidArgument, Unavailable, quote
from common.hf import LoadedModel, load_causal_lm
from common.spans import Span, align_spans, pieces_from_ids, pieces_from_text
from common.weights import WeightAccumulator, dtype_name
from policy_server.api import (
    AlignResult,
    GenerateRequest,
    ModelInfo,
    ScoredToken,
    ScoreRequest,
    ScoreResult,
    TokenizeResult,
    UpdateResult,
)
from policy_server.config import EngineConfig
from policy_server.sampling import MAX_ALTERNATIVES
from policy_server.scheduler import GenerationStream, Scheduler
from policy_server.swap import ModelVersions

log = logging.getLogger(__name__)

MAX_CANDIDATES = 64  # ScoreRequest.candidate_token_ids per request

__all__ = ["MAX_CANDIDATES", "Engine", "EngineConfig", "GenerationStream"]


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.vocab_size = loaded.vocab_size
        self.max_length = loaded.max_length
        self.versions = ModelVersions(self.model, self.device, config.max_update_bytes)
        self.scheduler = Scheduler(self.versions, self.tokenizer, config, loaded.eos_token_ids(), self.max_length,
                                   self.vocab_size)
        self._tensor_count, self._parameter_bytes = loaded.parameter_summary()
        self._accepting = True

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        if config.threads:
            torch.set_num_threads(config.threads)
        engine = cls(load_causal_lm(config.model, config.device, config.dtype), config)
        engine.scheduler.warm_up()
        return engine

    @property
    def version(self) -> int:
        """The version new streams start on."""
        return self.versions.version

    @property
    def steps(self) -> int:
        """Decoding forwards run so far (benchmarks and tests)."""
        return self.scheduler.steps

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def queued(self) -> int:
        return self.scheduler.queued

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.scheduler.start()

    def stop_accepting(self) -> None:
        """Draining: new Generate calls get UNAVAILABLE; running streams go on."""
        self._accepting = False

    async def close(self) -> None:
        """Cancel whatever still runs and stop the scheduler thread."""
        self._accepting = False
        await self.scheduler.close()

    # ---- Generate -----------------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> GenerationStream:
        """Validate and queue a request; must be called from the event loop that reads the
        stream. Raises InvalidArgument (nothing queued) or Unavailable / ResourceExhausted."""
        prompt_ids = self._prompt_ids(request.prompt_text, request.prompt_token_ids)
        request.params.validate(self.config.max_new_tokens_limit, self.vocab_size)
        if not self._accepting:
            raise Unavailable("the server is shutting down")
        return self.scheduler.generate(prompt_ids, request.params)

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
        return await self.scheduler.run_job(lambda: self._score(prompt_ids, completion, request))

    def _score(self, prompt_ids: list[int], completion: list[int], request: ScoreRequest) -> ScoreResult:
        """On the scheduler thread: one forward over prompt + completion (teacher forcing)."""
        ids = torch.tensor([prompt_ids + completion], device=self.device)  # (1, P + C)
        out = self.scheduler.forward(ids, torch.ones_like(ids), None, None, self.version, use_cache=False)
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
                alternatives=self.scheduler.alternatives(top_ids[t], top_lps[t]) if n else (),
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
                raise InvalidArgument(f"differs from the decoded token_ids ({quote(decoded)})", "text")
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
        """An accumulator for one update (header, chunks, commit), checked against the model."""
        return self.versions.begin_update()

    async def commit_update(self, update: WeightAccumulator, sha256: str) -> UpdateResult:
        """Check totals and checksum, then swap at the next step boundary. Nothing changes unless
        everything is right."""
        tensors = await asyncio.to_thread(update.commit, sha256)
        target = update.target_version
        version = await self.scheduler.run_job(
            lambda: self.versions.swap(target, tensors, self.scheduler.running_on(self.versions.version)))
        return UpdateResult(version, len(tensors), update.bytes_received)
