"""TrainerService over Connect (for browsers and curl): protobuf <-> engine, nothing else.

The twin of the gRPC servicer in service.py, over the same TrainerApp and engine and with the same
conversions (imported from there); only the calling convention differs: Connect's generated
service calls `snake_case(request, ctx)` and errors leave as ConnectError (mapped in one place,
common/connect.py). Served next to the gRPC port by the same process when the server is started
with `--http-port`.
"""

from __future__ import annotations

import asyncio

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from common.connect import HttpServer, announce_connect, connect_method, route, service_routes
from common.guard import ConnectGuard
from common.tls import uvicorn_ssl
from tokenfeedback.v1.trainer_connect import TrainerServiceASGIApplication
from trainer_server.service import (
    TrainerApp,
    annotation_pb,
    progress_message,
    sequence_input,
    status_pb,
    submit_response,
    train_settings,
)


class TrainerConnect:
    """Implements tokenfeedback.v1.trainer_connect.TrainerService over a serving TrainerApp."""

    def __init__(self, app: TrainerApp):
        self.app = app
        self.engine = app.engine

    @connect_method
    async def submit_annotations(self, request, ctx):
        sequences = [sequence_input(s) for s in request.sequences]
        outcomes = await asyncio.to_thread(self.engine.submit, sequences, request.partial_ok)
        self.app.maybe_auto_train()
        return submit_response(outcomes)

    @connect_method
    async def withdraw_annotations(self, request, ctx):
        withdrawn, unknown = await asyncio.to_thread(self.engine.withdraw, list(request.annotation_ids))
        return trainer_pb2.WithdrawAnnotationsResponse(withdrawn=withdrawn, unknown_ids=unknown)

    @connect_method
    async def get_annotation(self, request, ctx):
        return annotation_pb(await asyncio.to_thread(self.engine.get, request.annotation_id))

    @connect_method
    async def train(self, request, ctx):
        settings = train_settings(request)
        self.engine.resolve(settings)  # bad overrides fail here, before anything runs
        async for progress in self.app.run_training(settings):
            yield progress_message(progress)

    @connect_method
    async def save_checkpoint(self, request, ctx):
        path, step, version = await asyncio.to_thread(self.engine.save_checkpoint_now)
        return trainer_pb2.SaveCheckpointResponse(path=str(path), step=step, model_version=version)

    @connect_method
    async def get_status(self, request, ctx):
        return status_pb(await asyncio.to_thread(self.engine.status))


async def start_connect(app: TrainerApp, host: str, port: int) -> HttpServer:
    """Serve TrainerService over Connect on host:port (0: a free port) and announce it. Tokens,
    stream slots (shared with the gRPC port), TLS and the message size limit as on gRPC."""
    c = app.config
    application = TrainerServiceASGIApplication(TrainerConnect(app), interceptors=[ConnectGuard(c.auth, app.slots)],
                                                read_max_bytes=c.max_message_bytes)
    server = HttpServer(route(service_routes([application])), host, port, ssl=uvicorn_ssl(c.tls))
    bound = await server.start()
    announce_connect("trainer", host, bound, tls=c.tls.enabled)
    return server
