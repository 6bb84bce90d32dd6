"""PolicyService over Connect (for browsers and curl): the handler of convert.py bound as a
Connect service, nothing else.

The twin of service.py over the same handler and engine: common/rpc.py's binder gives each RPC
Connect's calling convention (`snake_case(request, ctx)`) and error mapping (common/connect.py).
Served next to the gRPC port by the same process when the server is started with `--http-port`
(server.py). UpdateWeights is not offered here: it is the trainer's admin path and stays on gRPC
(docs/design.md, "Servers").
"""

from __future__ import annotations

from common.connect import CODECS, HttpServer, announce_connect, route, service_routes
from common.guard import ConnectGuard
from common.rpc import connect_service
from common.tls import TlsFiles, uvicorn_ssl
from policy_server.convert import DESCRIPTOR, PolicyHandler
from tokenfeedback.v1.policy_connect import PolicyServiceASGIApplication

GRPC_ONLY = {"UpdateWeights": "served over gRPC only (the trainer's admin path)"}


async def start_connect(handler: PolicyHandler, host: str, port: int, tls: TlsFiles = TlsFiles(),
                        guard: ConnectGuard | None = None, max_message_bytes: int | None = None) -> HttpServer:
    """Serve PolicyService over Connect on host:port (0: a free port) and announce it. `guard`
    checks tokens and stream slots like the gRPC port's (common/guard.py); `tls` as on gRPC."""
    application = PolicyServiceASGIApplication(
        connect_service(handler, DESCRIPTOR, GRPC_ONLY), interceptors=[guard] if guard is not None else (),
        codecs=CODECS, **({"read_max_bytes": max_message_bytes} if max_message_bytes else {}))
    app = route(service_routes([application]))
    server = HttpServer(app, host, port, ssl=uvicorn_ssl(tls),
                        **({"max_body_bytes": max_message_bytes + 5} if max_message_bytes else {}))
    bound = await server.start()
    announce_connect("policy", host, bound, tls=tls.enabled)
    return server
