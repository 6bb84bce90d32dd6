"""What the engine takes and gives: plain dataclasses, no grpc, no protobuf.

They mirror policy.proto message for message, so a transport adapter (the gRPC servicer in
service.py, a Connect adapter, a test or a benchmark in-process) converts field by field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common.spans import Alignment, Piece, Span
from policy_server.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    prompt_text: str = ""  # exactly one of prompt_text and prompt_token_ids
    prompt_token_ids: tuple[int, ...] = ()
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class GenerationStart:
    generation_id: str  # a UUID
    prompt_token_ids: tuple[int, ...]
    prompt_text: str  # decoded from prompt_token_ids
    model_version: int


@dataclass(frozen=True)
class Alternative:
    token_id: int
    text: str  # the token decoded on its own
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    position: int  # 0-based index in the completion
    token_id: int
    text: str  # characters this token adds to the completion text
    char_start: int  # code points into the completion text, half-open
    char_end: int
    logprob: float  # temperature 1, no truncation
    sampling_logprob: float  # under the sampling distribution; 0 when greedy
    alternatives: tuple[Alternative, ...]
    rank: int  # 1-based rank of token_id by logprob
    model_version: int


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens or the model's maximum length
    EOS = "eos"
    STOP = "stop"  # a stop string appeared


@dataclass(frozen=True)
class GenerationEnd:
    finish_reason: FinishReason
    stop_sequence: str  # set when finish_reason is STOP
    prompt_tokens: int
    completion_tokens: int
    completion_text: str
    model_version: int


GenerateEvent = GenerationStart | TokenEvent | GenerationEnd


@dataclass(frozen=True)
class ScoreRequest:
    prompt_text: str = ""  # exactly one of prompt_text and prompt_token_ids
    prompt_token_ids: tuple[int, ...] = ()
    completion_text: str = ""  # exactly one of completion_text and completion_token_ids
    completion_token_ids: tuple[int, ...] = ()
    num_alternatives: int = 0  # 0..20
    candidate_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScoredToken:
    position: int
    token_id: int
    text: str
    char_start: int
    char_end: int
    logprob: float
    rank: int
    alternatives: tuple[Alternative, ...]
    candidate_logprobs: tuple[float, ...]  # one per ScoreRequest.candidate_token_ids


@dataclass(frozen=True)
class ScoreResult:
    prompt_token_ids: tuple[int, ...]
    tokens: tuple[ScoredToken, ...]
    total_logprob: float
    completion_text: str
    model_version: int


@dataclass(frozen=True)
class TokenizeResult:
    tokens: tuple[Piece, ...]
    text: str  # the text the offsets refer to


@dataclass(frozen=True)
class AlignResult:
    spans: tuple[Alignment, ...]
    tokens: tuple[Piece, ...]
    text: str


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    vocab_size: int
    special_tokens: tuple[tuple[str, str, int], ...]  # (role, text, id)
    max_length: int
    max_new_tokens: int
    model_version: int
    dtype: str
    device: str
    tensor_count: int
    parameter_bytes: int


@dataclass(frozen=True)
class UpdateResult:
    model_version: int
    tensors_updated: int
    bytes_received: int


__all__ = [
    "Alignment", "AlignResult", "Alternative", "FinishReason", "GenerateEvent", "GenerateRequest", "GenerationEnd",
    "GenerationStart", "ModelInfo", "Piece", "SamplingParams", "ScoreRequest", "ScoreResult", "ScoredToken", "Span",
    "TokenEvent", "TokenizeResult", "UpdateResult",
]
