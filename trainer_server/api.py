"""The trainer engine's types: what goes in and out of TrainerEngine, free of grpc and protobuf.

Both transports (service.py for gRPC, connect.py for Connect) serve convert.py, the one module
that converts protobuf to and from these; the engine, the store and the benchmarks use them
directly. The publisher the engine hands new weights to is the `WeightPublisher` protocol:
server.py injects its gRPC implementation (publish.py), and an engine without one only counts
versions (docs/design.md, "Servers").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from common.weights import UpdateSummary, dtype_name, summarize_state_dict

# ---- SubmitAnnotations ----


@dataclass(frozen=True)
class TokenLabelInput:
    position: int
    weight: float
    replacement_token_id: int | None = None
    replacement_weight: float | None = None


@dataclass(frozen=True)
class SpanLabelInput:
    start: int
    end: int
    weight: float
    replacement_text: str | None = None
    text: str = ""  # the tool's copy of the spanned text, "" when not given


@dataclass(frozen=True)
class SequenceInput:
    """One submitted annotated sequence (AnnotatedSequence in trainer.proto)."""

    annotation_id: str
    prompt_text: str = ""
    prompt_token_ids: Sequence[int] = ()
    completion_text: str = ""
    completion_token_ids: Sequence[int] = ()
    model_version: int = 0
    behavior_logprobs: Sequence[float] = ()
    token_labels: Sequence[TokenLabelInput] = ()
    span_labels: Sequence[SpanLabelInput] = ()
    sequence_reward: float | None = None
    annotator_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SubmitOutcome:
    annotation_id: str
    status: str  # "accepted" | "duplicate" | "rejected"
    reason: str = ""
    rows: int = 0


# ---- Train ----


@dataclass(frozen=True)
class TrainSettings:
    """A Train request: steps (0: one pass over pending) and per-call overrides (None: configured)."""

    steps: int = 0
    variant: str | None = None
    beta: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    horizon: str | None = None
    gamma: float | None = None
    publish: bool = True


@dataclass(frozen=True)
class Progress:
    """One TrainProgress message."""

    step: int
    total_steps: int
    loss: float = 0.0
    token_loss: float = 0.0
    kl: float = 0.0
    beta: float = 0.0
    mean_abs_weight: float = 0.0
    tokens_per_second: float = 0.0
    rows: int = 0
    sequences: int = 0
    model_version: int = 0
    published_version: int = 0
    skipped: bool = False
    done: bool = False
    message: str = ""
    horizon: str = "1"
    gamma: float = 1.0


# ---- publishing ----


@dataclass
class PolicyState:
    """What the trainer knows about one policy server (PolicyServerState in trainer.proto)."""

    address: str
    model_version: int = -1  # -1: unknown (never reached, or lost contact)
    reachable: bool = False
    last_error: str = ""
    dtype: str = ""  # the server's parameter dtype (GetModelInfo)
    last_publish_seconds: float = 0.0
    last_publish_bytes: int = 0


@dataclass
class Snapshot:
    """A published set of weights: CPU tensors, in the trainer's dtype, under `version`."""

    version: int
    tensors: dict[str, torch.Tensor]
    _by_dtype: dict[str, tuple[dict[str, torch.Tensor], UpdateSummary]] = field(default_factory=dict)

    def for_dtype(self, dtype: str) -> tuple[dict[str, torch.Tensor], UpdateSummary]:
        """The tensors cast to a server's dtype, with the header/commit summary (computed once)."""
        if dtype not in self._by_dtype:
            tensors = self.tensors
            if dtype and any(dtype_name(t.dtype) != dtype for t in tensors.values() if t.is_floating_point()):
                target = getattr(torch, dtype)
                tensors = {k: (v.to(target) if v.is_floating_point() else v) for k, v in tensors.items()}
            self._by_dtype[dtype] = (tensors, summarize_state_dict(tensors))
        return self._by_dtype[dtype]


class WeightPublisher(Protocol):
    """Where the engine sends new weights (publish.Publisher over gRPC, injected by server.py).
    Called from the training thread."""

    def max_version(self) -> int:
        """The highest version any policy server is known to hold (-1 when none is known)."""

    def publish_blocking(self, snapshot: Snapshot) -> dict[str, PolicyState]:
        """Send `snapshot` to every policy server; return what each holds afterwards."""

    def set_current(self, snapshot: Snapshot) -> None:
        """The snapshot late servers are brought to (at start: the resumed weights)."""

    def policy_states(self) -> list[PolicyState]:
        """What is known about each policy server now."""


# ---- GetStatus ----


@dataclass
class Status:
    counts: dict[str, int]  # pending / consumed / withdrawn / quarantined / total / rows (AnnotationStore.counts)
    model_version: int
    step: int
    last_loss: float
    last_token_loss: float
    last_kl: float
    beta: float
    variant: str
    horizon: str
    gamma: float
    training: bool
    policies: list[PolicyState] = field(default_factory=list)
    model_name: str = ""
