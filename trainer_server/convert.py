"""TrainerService's RPCs, written once: protobuf in, the engine's types (api.py), protobuf out.

`TrainerHandler` has one method per RPC, named after trainer.proto in snake_case, taking the
request message and returning the response message (train: yielding its progress messages). Both
transports serve this one object through common/rpc.py's binder: service.py over grpc.aio,
connect.py over Connect; errors leave as common.errors exceptions, which the binder maps to each
transport's status codes (docs/design.md, "Servers"). Blocking engine calls run in a worker thread, so the event loop keeps
serving health checks, status and the publisher meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from trainer_server.api import (
    Progress,
    SequenceInput,
    SpanLabelInput,
    Status,
    SubmitOutcome,
    TokenLabelInput,
    TrainSettings,
)
from trainer_server.store import StoredAnnotation

if TYPE_CHECKING:
    from trainer_server.server import TrainerApp

DESCRIPTOR = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
SERVICE_NAME = DESCRIPTOR.full_name
SUBMIT_STATUS = {
    "accepted": trainer_pb2.SUBMIT_STATUS_ACCEPTED,
    "duplicate": trainer_pb2.SUBMIT_STATUS_DUPLICATE,
    "rejected": trainer_pb2.SUBMIT_STATUS_REJECTED,
}


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


# ---- protobuf -> engine ----


def sequence_input(seq: trainer_pb2.AnnotatedSequence) -> SequenceInput:
    return SequenceInput(
        annotation_id=seq.annotation_id,
        prompt_text=seq.prompt_text,
        prompt_token_ids=list(seq.prompt_token_ids),
        completion_text=seq.completion_text,
        completion_token_ids=list(seq.completion_token_ids),
        model_version=seq.model_version,
        behavior_logprobs=list(seq.behavior_logprobs),
        token_labels=[
            TokenLabelInput(t.position, t.weight, _optional(t, "replacement_token_id"), _optional(t, "replacement_weight"))
            for t in seq.token_labels
        ],
        span_labels=[
            SpanLabelInput(s.start, s.end, s.weight, _optional(s, "replacement_text"), s.text) for s in seq.span_labels
        ],
        sequence_reward=_optional(seq, "sequence_reward"),
        annotator_id=seq.annotator_id,
        metadata=dict(seq.metadata),
    )


def train_settings(request: trainer_pb2.TrainRequest) -> TrainSettings:
    return TrainSettings(
        steps=request.steps,
        variant=_optional(request, "variant"),
        beta=_optional(request, "beta"),
        learning_rate=_optional(request, "learning_rate"),
        batch_size=_optional(request, "batch_size"),
        horizon=_optional(request, "horizon"),
        gamma=_optional(request, "gamma"),
        publish=True if not request.HasField("publish") else request.publish,
    )


# ---- engine -> protobuf ----


def submit_response(outcomes: list[SubmitOutcome]) -> trainer_pb2.SubmitAnnotationsResponse:
    return trainer_pb2.SubmitAnnotationsResponse(results=[
        trainer_pb2.SubmitResult(annotation_id=o.annotation_id, status=SUBMIT_STATUS[o.status], reason=o.reason,
                                 rows=o.rows)
        for o in outcomes
    ])


def annotation_pb(found: StoredAnnotation) -> trainer_pb2.StoredAnnotation:
    a = found.annotation
    reply = trainer_pb2.StoredAnnotation(
        annotation_id=a.annotation_id, state=found.state, prompt_token_ids=a.prompt_ids,
        completion_token_ids=a.completion_ids, model_version=a.model_version,
        rows=[trainer_pb2.TrainingRow(position=r.position, token_id=r.token_id, weight=r.weight,
                                      replacement=r.replacement) for r in a.rows],
        annotator_id=a.annotator_id, metadata=a.metadata, stored_at=found.stored_at,
        quarantine_reason=found.quarantine_reason,
    )
    if a.sequence_reward is not None:
        reply.sequence_reward = a.sequence_reward
    return reply


def progress_message(p: Progress) -> trainer_pb2.TrainProgress:
    return trainer_pb2.TrainProgress(
        step=p.step, total_steps=p.total_steps, loss=p.loss, token_loss=p.token_loss, kl=p.kl, beta=p.beta,
        mean_abs_weight=p.mean_abs_weight, tokens_per_second=p.tokens_per_second, rows=p.rows,
        sequences=p.sequences, model_version=p.model_version, published_version=p.published_version,
        skipped=p.skipped, done=p.done, message=p.message, horizon=p.horizon, gamma=p.gamma,
    )


def status_pb(s: Status) -> trainer_pb2.TrainerStatus:
    return trainer_pb2.TrainerStatus(
        annotations_total=s.counts["total"], annotations_pending=s.counts["pending"],
        annotations_consumed=s.counts["consumed"], annotations_withdrawn=s.counts["withdrawn"],
        annotations_quarantined=s.counts["quarantined"],
        rows_total=s.counts["rows"], model_version=s.model_version, step=s.step, last_loss=s.last_loss,
        last_token_loss=s.last_token_loss, last_kl=s.last_kl, beta=s.beta, variant=s.variant,
        horizon=s.horizon, gamma=s.gamma, training=s.training, model_name=s.model_name,
        policies=[trainer_pb2.PolicyServerState(address=p.address, model_version=p.model_version,
                                                reachable=p.reachable, last_error=p.last_error)
                  for p in s.policies],
    )


# ---- the RPCs ----


class TrainerHandler:
    """TrainerService over a serving TrainerApp (server.py): one method per RPC, protobuf in and out."""

    def __init__(self, app: TrainerApp):
        self.app = app
        self.engine = app.engine

    async def submit_annotations(self, request: trainer_pb2.SubmitAnnotationsRequest
                                ) -> trainer_pb2.SubmitAnnotationsResponse:
        sequences = [sequence_input(s) for s in request.sequences]
        outcomes = await asyncio.to_thread(self.engine.submit, sequences, request.partial_ok)
        self.app.maybe_auto_train()
        return submit_response(outcomes)

    async def withdraw_annotations(self, request: trainer_pb2.WithdrawAnnotationsRequest
                                  ) -> trainer_pb2.WithdrawAnnotationsResponse:
        withdrawn, unknown = await asyncio.to_thread(self.engine.withdraw, list(request.annotation_ids))
        return trainer_pb2.WithdrawAnnotationsResponse(withdrawn=withdrawn, unknown_ids=unknown)

    async def get_annotation(self, request: trainer_pb2.GetAnnotationRequest) -> trainer_pb2.StoredAnnotation:
        return annotation_pb(await asyncio.to_thread(self.engine.get, request.annotation_id))

    async def train(self, request: trainer_pb2.TrainRequest) -> AsyncIterator[trainer_pb2.TrainProgress]:
        settings = train_settings(request)
        self.engine.resolve(settings)  # bad overrides fail here, before anything runs
        async for progress in self.app.run_training(settings):
            yield progress_message(progress)

    async def save_checkpoint(self, request: trainer_pb2.SaveCheckpointRequest) -> trainer_pb2.SaveCheckpointResponse:
        path, step, version = await asyncio.to_thread(self.engine.save_checkpoint_now)
        return trainer_pb2.SaveCheckpointResponse(path=str(path), step=step, model_version=version)

    async def get_status(self, request: trainer_pb2.GetStatusRequest) -> trainer_pb2.TrainerStatus:
        return status_pb(await asyncio.to_thread(self.engine.status))
