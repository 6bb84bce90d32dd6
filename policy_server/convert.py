"""PolicyService's RPCs, written once: protobuf <-> engine types, one method per RPC.

`PolicyHandler` is what both transports serve (common/rpc.py's binder): service.py binds it as the
grpc.aio servicer, connect.py as the Connect service. Each method converts the protobuf request to
the engine's dataclasses (api.py), calls the engine, and converts the answer back; errors are the
engine's `common.errors.ServiceError`s, mapped to status codes by the binder (docs/design.md,
"Errors and limits"). A client that cancels a Generate stream closes `generate`; its `finally`
turns that into an engine cancel, which frees the decoding slot at the next step boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import tokenfeedback.v1.common_pb2 as common_pb2
import tokenfeedback.v1.policy_pb2 as policy_pb2
from common.errors import InvalidArgument, Unavailable
from common.spans import Piece, Span
from policy_server import api
from policy_server.engine import Engine
from policy_server.sampling import SamplingParams

DESCRIPTOR = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"]
SERVICE_NAME = DESCRIPTOR.full_name
DEFAULT_MAX_NEW_TOKENS = 32  # SamplingParams.max_new_tokens = 0 means this
LARGE_CHUNK = 64 * 1024  # update chunks above this size are copied and hashed on a worker thread

FINISH_REASONS = {
    api.FinishReason.LENGTH: policy_pb2.FINISH_REASON_LENGTH,
    api.FinishReason.EOS: policy_pb2.FINISH_REASON_EOS,
    api.FinishReason.STOP: policy_pb2.FINISH_REASON_STOP,
}


# ---- protobuf -> engine ----------------------------------------------------------------------


def sampling_params(msg: policy_pb2.SamplingParams) -> SamplingParams:
    if msg.max_new_tokens < 0:
        raise InvalidArgument(f"must be >= 0, got {msg.max_new_tokens}", "params.max_new_tokens")
    return SamplingParams(
        max_new_tokens=msg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_on_eos=msg.stop_on_eos if msg.HasField("stop_on_eos") else True,
        num_alternatives=msg.num_alternatives,
    )


def generate_request(msg: policy_pb2.GenerateRequest) -> api.GenerateRequest:
    return api.GenerateRequest(msg.prompt_text, tuple(msg.prompt_token_ids), sampling_params(msg.params))


def score_request(msg: policy_pb2.ScoreRequest) -> api.ScoreRequest:
    return api.ScoreRequest(
        prompt_text=msg.prompt_text,
        prompt_token_ids=tuple(msg.prompt_token_ids),
        completion_text=msg.completion_text,
        completion_token_ids=tuple(msg.completion_token_ids),
        num_alternatives=msg.num_alternatives,
        candidate_token_ids=tuple(msg.candidate_token_ids),
    )


# ---- engine -> protobuf ----------------------------------------------------------------------


def alternatives_pb(alternatives) -> list[common_pb2.TokenAlternative]:
    return [common_pb2.TokenAlternative(token_id=a.token_id, text=a.text, logprob=a.logprob) for a in alternatives]


def piece_pb(piece: Piece) -> common_pb2.TokenPiece:
    return common_pb2.TokenPiece(token_id=piece.token_id, text=piece.text, char_start=piece.char_start,
                                 char_end=piece.char_end)


def event_pb(event: api.GenerateEvent) -> policy_pb2.GenerateEvent:
    if isinstance(event, api.TokenEvent):
        return policy_pb2.GenerateEvent(token=policy_pb2.TokenEvent(
            position=event.position, token_id=event.token_id, text=event.text, char_start=event.char_start,
            char_end=event.char_end, logprob=event.logprob, sampling_logprob=event.sampling_logprob,
            alternatives=alternatives_pb(event.alternatives), rank=event.rank, model_version=event.model_version,
        ))
    if isinstance(event, api.GenerationStart):
        return policy_pb2.GenerateEvent(start=policy_pb2.GenerationStart(
            generation_id=event.generation_id, prompt_token_ids=event.prompt_token_ids,
            prompt_text=event.prompt_text, model_version=event.model_version,
        ))
    return policy_pb2.GenerateEvent(end=policy_pb2.GenerationEnd(
        finish_reason=FINISH_REASONS[event.finish_reason], stop_sequence=event.stop_sequence,
        prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
        completion_text=event.completion_text, model_version=event.model_version,
    ))


def score_pb(result: api.ScoreResult) -> policy_pb2.ScoreResponse:
    return policy_pb2.ScoreResponse(
        prompt_token_ids=result.prompt_token_ids,
        tokens=[
            policy_pb2.ScoredToken(
                position=t.position, token_id=t.token_id, text=t.text, char_start=t.char_start,
                char_end=t.char_end, logprob=t.logprob, rank=t.rank, alternatives=alternatives_pb(t.alternatives),
                candidate_logprobs=t.candidate_logprobs,
            )
            for t in result.tokens
        ],
        total_logprob=result.total_logprob,
        completion_text=result.completion_text,
        model_version=result.model_version,
    )


def tokenize_pb(result: api.TokenizeResult) -> policy_pb2.TokenizeResponse:
    return policy_pb2.TokenizeResponse(tokens=[piece_pb(p) for p in result.tokens], text=result.text)


def align_pb(result: api.AlignResult) -> policy_pb2.AlignSpansResponse:
    return policy_pb2.AlignSpansResponse(
        spans=[policy_pb2.SpanAlignment(token_positions=a.token_positions, start=a.start, end=a.end)
               for a in result.spans],
        tokens=[piece_pb(p) for p in result.tokens],
        text=result.text,
    )


def model_info_pb(info: api.ModelInfo) -> policy_pb2.ModelInfo:
    return policy_pb2.ModelInfo(
        model_name=info.model_name, vocab_size=info.vocab_size,
        special_tokens=[policy_pb2.SpecialToken(role=r, text=t, token_id=i) for r, t, i in info.special_tokens],
        max_length=info.max_length, max_new_tokens=info.max_new_tokens, model_version=info.model_version,
        dtype=info.dtype, device=info.device, tensor_count=info.tensor_count, parameter_bytes=info.parameter_bytes,
    )


# ---- the RPCs --------------------------------------------------------------------------------


class PolicyHandler:
    """Serves once `engine` is set (the server binds first and loads the model after, so health
    can say NOT_SERVING meanwhile); before that every RPC answers UNAVAILABLE."""

    def __init__(self, engine: Engine | None = None):
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise Unavailable("the model is still loading")
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine = engine

    async def generate(self, request: policy_pb2.GenerateRequest):
        stream = self.engine.generate(generate_request(request))
        try:
            async for event in stream:
                yield event_pb(event)
        finally:
            stream.cancel()  # client gone or handler cancelled: free the slot (no-op when finished)

    async def score(self, request: policy_pb2.ScoreRequest) -> policy_pb2.ScoreResponse:
        return score_pb(await self.engine.score(score_request(request)))

    async def tokenize(self, request: policy_pb2.TokenizeRequest) -> policy_pb2.TokenizeResponse:
        return tokenize_pb(self.engine.tokenize(request.text, tuple(request.token_ids), request.add_special_tokens))

    async def align_spans(self, request: policy_pb2.AlignSpansRequest) -> policy_pb2.AlignSpansResponse:
        spans = [Span(s.start, s.end, s.text) for s in request.spans]
        return align_pb(self.engine.align_spans(request.text, tuple(request.token_ids), spans))

    async def get_model_info(self, request: policy_pb2.GetModelInfoRequest) -> policy_pb2.ModelInfo:
        return model_info_pb(self.engine.model_info())

    async def update_weights(self, requests: AsyncIterator[policy_pb2.WeightUpdateMessage],
                             ) -> policy_pb2.UpdateWeightsResponse:
        """Header, chunks, commit. Anything wrong, or a stream that ends without a commit, leaves
        the model as it was (the accumulator holds the tensors until the commit checks out;
        docs/design.md, "Weights wire format")."""
        update = self.engine.begin_update()
        seen_header = False
        async for message in requests:
            part = message.WhichOneof("part")
            if part == "header":
                update.header(message.header.target_version, message.header.tensor_count, message.header.total_bytes)
                seen_header = True
            elif part == "chunk":
                c = message.chunk
                if len(c.data) > LARGE_CHUNK:  # copy and hash off the event loop
                    await asyncio.to_thread(update.chunk, c.name, c.dtype, c.shape, c.offset, c.data)
                else:
                    update.chunk(c.name, c.dtype, c.shape, c.offset, c.data)
            elif part == "commit":
                result = await self.engine.commit_update(update, message.commit.sha256)
                return policy_pb2.UpdateWeightsResponse(
                    model_version=result.model_version, tensors_updated=result.tensors_updated,
                    bytes_received=result.bytes_received,
                )
            else:
                raise InvalidArgument("a message with no header, chunk or commit", "part")
        if not seen_header:
            raise InvalidArgument("the update stream ended before a header", "header")
        raise InvalidArgument("the update stream ended without a commit; nothing was changed", "commit")
