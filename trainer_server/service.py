"""TrainerService over grpc.aio: a thin adapter between protobuf and the engine.

Each method converts the request into the engine's dataclasses, runs the engine in a worker thread
(the event loop keeps serving health checks, status and the publisher meanwhile), and converts
back. Errors are mapped to status codes in one place, common/rpc.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
import tokenfeedback.v1.trainer_pb2_grpc as trainer_pb2_grpc
from common.auth import log_auth_summary
from common.guard import GrpcGuard, StreamSlots
from common.process import announce
from common.rpc import ServerOptions, create_grpc_server, rpc_method, set_serving
from common.tls import channel_credentials, server_credentials
from trainer_server.config import TrainerConfig
from trainer_server.engine import Progress, TrainerEngine, TrainSettings
from trainer_server.publish import Publisher, Snapshot
from trainer_server.validate import SequenceInput, SpanLabelInput, TokenLabelInput

log = logging.getLogger(__name__)

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
SUBMIT_STATUS = {
    "accepted": trainer_pb2.SUBMIT_STATUS_ACCEPTED,
    "duplicate": trainer_pb2.SUBMIT_STATUS_DUPLICATE,
    "rejected": trainer_pb2.SUBMIT_STATUS_REJECTED,
}


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


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


def progress_message(p: Progress) -> trainer_pb2.TrainProgress:
    return trainer_pb2.TrainProgress(
        step=p.step, total_steps=p.total_steps, loss=p.loss, token_loss=p.token_loss, kl=p.kl, beta=p.beta,
        mean_abs_weight=p.mean_abs_weight, tokens_per_second=p.tokens_per_second, rows=p.rows,
        sequences=p.sequences, model_version=p.model_version, published_version=p.published_version,
        skipped=p.skipped, done=p.done, message=p.message, horizon=p.horizon, gamma=p.gamma,
    )


def submit_response(outcomes) -> trainer_pb2.SubmitAnnotationsResponse:
    return trainer_pb2.SubmitAnnotationsResponse(results=[
        trainer_pb2.SubmitResult(annotation_id=o.annotation_id, status=SUBMIT_STATUS[o.status], reason=o.reason,
                                 rows=o.rows)
        for o in outcomes
    ])


def annotation_pb(found) -> trainer_pb2.StoredAnnotation:
    a = found.annotation
    reply = trainer_pb2.StoredAnnotation(
        annotation_id=a.annotation_id, state=found.state, prompt_token_ids=a.prompt_ids,
        completion_token_ids=a.completion_ids, model_version=a.model_version,
        rows=[trainer_pb2.TrainingRow(position=r.position, token_id=r.token_id, weight=r.weight,
                                      replacement=r.replacement) for r in a.rows],
        annotator_id=a.annotator_id, metadata=a.metadata, stored_at=found.stored_at,
    )
    if a.sequence_reward is not None:
        reply.sequence_reward = a.sequence_reward
    return reply


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


def status_pb(s) -> trainer_pb2.TrainerStatus:
    return trainer_pb2.TrainerStatus(
        annotations_total=s.counts["total"], annotations_pending=s.counts["pending"],
        annotations_consumed=s.counts["consumed"], annotations_withdrawn=s.counts["withdrawn"],
        rows_total=s.counts["rows"], model_version=s.model_version, step=s.step, last_loss=s.last_loss,
        last_token_loss=s.last_token_loss, last_kl=s.last_kl, beta=s.beta, variant=s.variant,
        horizon=s.horizon, gamma=s.gamma, training=s.training, model_name=s.model_name,
        policies=[trainer_pb2.PolicyServerState(address=p.address, model_version=p.model_version,
                                                reachable=p.reachable, last_error=p.last_error)
                  for p in s.policies],
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, app: TrainerApp):
        self.app = app
        self.engine = app.engine

    @rpc_method
    async def SubmitAnnotations(self, request, context):
        sequences = [sequence_input(s) for s in request.sequences]
        outcomes = await asyncio.to_thread(self.engine.submit, sequences, request.partial_ok)
        self.app.maybe_auto_train()
        return submit_response(outcomes)

    @rpc_method
    async def WithdrawAnnotations(self, request, context):
        withdrawn, unknown = await asyncio.to_thread(self.engine.withdraw, list(request.annotation_ids))
        return trainer_pb2.WithdrawAnnotationsResponse(withdrawn=withdrawn, unknown_ids=unknown)

    @rpc_method
    async def GetAnnotation(self, request, context):
        return annotation_pb(await asyncio.to_thread(self.engine.get, request.annotation_id))

    @rpc_method
    async def Train(self, request, context):
        settings = train_settings(request)
        self.engine.resolve(settings)  # bad overrides fail here, before anything runs
        async for progress in self.app.run_training(settings):
            yield progress_message(progress)

    @rpc_method
    async def SaveCheckpoint(self, request, context):
        path, step, version = await asyncio.to_thread(self.engine.save_checkpoint_now)
        return trainer_pb2.SaveCheckpointResponse(path=str(path), step=step, model_version=version)

    @rpc_method
    async def GetStatus(self, request, context):
        return status_pb(await asyncio.to_thread(self.engine.status))


class TrainerApp:
    """The serving process of rank 0: gRPC server, engine, publisher, auto-training."""

    def __init__(self, config: TrainerConfig, engine: TrainerEngine):
        self.config = config
        self.engine = engine
        self.server: grpc.aio.Server | None = None
        self.health = None
        self.publisher = Publisher(
            config.policies, config.chunk_bytes, config.publish_timeout, config.publish_retry,
            credentials=channel_credentials(config.policy_tls_ca, config.policy_tls_cert, config.policy_tls_key)
            if config.publish_tls else None,
            token=config.policy_token)
        # Train streams open at once, counted across the gRPC and Connect ports (common/guard.py)
        self.slots = StreamSlots({"/tokenfeedback.v1.TrainerService/Train": config.max_streams})
        self._cancels: set[threading.Event] = set()
        self._auto_task: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> int:
        """Bind and serve (health NOT_SERVING until `load` finishes). Returns the bound port."""
        c = self.config
        options = ServerOptions(host=c.host, port=c.port, max_message_bytes=c.max_message_bytes)
        self.server, port, self.health = await create_grpc_server(
            options, [lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self), s)],
            [SERVICE_NAME], [GrpcGuard(c.auth, self.slots)], server_credentials(c.tls),
        )
        log_auth_summary(log, c.host, c.tls.enabled, c.auth, "trainer")
        if c.policies and not c.policy_token:
            log.info("publishing to %s without a token (policy servers with auth on will refuse UpdateWeights)",
                     ", ".join(c.policies))
        return port

    async def load(self) -> None:
        await asyncio.to_thread(self.engine.load)
        await self.publisher.start()
        self.engine.publisher = self.publisher
        if self.engine.version > 0:  # resumed: servers that start at version 0 catch up to these weights
            self.publisher.set_current(Snapshot(self.engine.version, await asyncio.to_thread(self.engine.weights)))
        await set_serving(self.health, [SERVICE_NAME], True)
        log.info("serving: version %d, step %d, %s", self.engine.version, self.engine.step,
                 self.engine.store.counts())
        self.maybe_auto_train()

    async def run_training(self, settings: TrainSettings):
        """Run engine.train in a thread and yield its Progress as it comes. A client that goes away
        stops the run after the current step (it still publishes and checkpoints what it did)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Progress] = asyncio.Queue()
        cancel = threading.Event()
        self._cancels.add(cancel)

        def report(progress: Progress) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, progress)

        task = asyncio.ensure_future(asyncio.to_thread(self.engine.train, settings, report, cancel))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    while not queue.empty():
                        yield queue.get_nowait()
                    task.result()  # the engine's error, if it failed
                    return
                progress = getter.result()
                yield progress
                if progress.done:
                    await task
                    return
        finally:
            cancel.set()
            self._cancels.discard(cancel)

    def maybe_auto_train(self) -> None:
        """--auto-train N: start one pass over the pending annotations when N are waiting."""
        threshold = self.config.auto_train
        if not threshold or self._closing or (self._auto_task and not self._auto_task.done()):
            return
        self._auto_task = asyncio.create_task(self._auto_train(threshold))

    async def _auto_train(self, threshold: int) -> None:
        while not self._closing and await asyncio.to_thread(self.engine.pending_count) >= threshold:
            log.info("auto-train: %d annotations pending", await asyncio.to_thread(self.engine.pending_count))
            try:
                async for p in self.run_training(TrainSettings(steps=0)):
                    if p.done:
                        log.info("auto-train done: %d steps, loss %.4f, kl %.4f, version %d", p.step, p.loss, p.kl,
                                 p.model_version)
            except Exception:  # noqa: BLE001 - logged; the server keeps serving
                log.exception("auto-train failed")
                return
            if p.step == 0:  # nothing could be applied (skipped steps): wait for new annotations
                return

    async def stop(self, grace: float = 5.0) -> None:
        self._closing = True
        for cancel in list(self._cancels):
            cancel.set()
        if self.server is not None:
            await self.server.stop(grace)
        if self._auto_task is not None:
            await asyncio.gather(self._auto_task, return_exceptions=True)
        # wait for a running step to finish (it may publish through the loop, which keeps running)
        await asyncio.to_thread(self.engine._train_lock.acquire)
        self.engine._train_lock.release()
        await self.publisher.stop()
        await asyncio.to_thread(self.engine.close)


async def create_server(config: TrainerConfig, engine: TrainerEngine | None = None) -> tuple[TrainerApp, int]:
    """Bind, announce and start loading in the background. Returns (app, port); call app.stop()."""
    app = TrainerApp(config, engine or TrainerEngine(config))
    port = await app.start()
    announce("trainer", config.host, port)
    return app, port
