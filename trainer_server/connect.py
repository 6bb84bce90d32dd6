"""TrainerService over Connect (for browsers and curl): convert.py's TrainerHandler, bound by
common/rpc.py with Connect's calling convention.

Served next to the gRPC port by the same process when the server is started with `--http-port`:
the same handler, tokens, stream slots (shared with the gRPC port), TLS and message size limit
(docs/design.md, "Servers").
"""

from __future__ import annotations

from common.connect import CODECS, HttpServer, announce_connect, route, service_routes
from common.guard import ConnectGuard, StreamSlots
from common.rpc import connect_service
from common.tls import uvicorn_ssl
from tokenfeedback.v1.trainer_connect import TrainerServiceASGIApplication
from trainer_server.config import TrainerConfig
from trainer_server.convert import DESCRIPTOR, TrainerHandler


async def start_connect(handler: TrainerHandler, config: TrainerConfig, slots: StreamSlots) -> HttpServer:
    """Serve TrainerService over Connect on config.host:config.http_port (0: a free port) and
    announce it."""
    application = TrainerServiceASGIApplication(connect_service(handler, DESCRIPTOR),
                                                interceptors=[ConnectGuard(config.auth, slots)],
                                                read_max_bytes=config.max_message_bytes, codecs=CODECS)
    server = HttpServer(route(service_routes([application])), config.host, config.http_port,
                        ssl=uvicorn_ssl(config.tls), max_body_bytes=config.max_message_bytes)
    bound = await server.start()
    announce_connect("trainer", config.host, bound, tls=config.tls.enabled)
    return server
