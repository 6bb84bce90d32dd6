"""PolicyService over Connect (for browsers and curl): protobuf <-> engine, nothing else.

The twin of service.py, over the same engine and with the same conversions (imported from there);
only the calling convention differs: Connect's generated service calls `snake_case(request, ctx)`
and errors leave as ConnectError (mapped in one place, common/connect.py). Served next to the gRPC
port by the same process when the server is started with `--http-port` (server.py).

UpdateWeights is not offered here: it is the trainer's admin path and stays on gRPC.
"""

from __future__ import annotations

from collections.abc import Callable

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from common.connect import HttpServer, announce_connect, connect_method, route, service_routes
from common.guard import ConnectGuard
from common.spans import Span
from common.tls import TlsFiles, uvicorn_ssl
from policy_server.engine import Engine
from policy_server.service import (
    align_pb,
    event_pb,
    generate_request,
    model_info_pb,
    score_pb,
    score_request,
    tokenize_pb,
)
from tokenfeedback.v1.policy_connect import PolicyServiceASGIApplication


class PolicyConnect:
    """Implements tokenfeedback.v1.policy_connect.PolicyService. `engine` returns the loaded engine
    or raises Unavailable while the model loads (the gRPC servicer's `engine` property)."""

    def __init__(self, engine: Callable[[], Engine]):
        self._engine = engine

    @connect_method
    async def generate(self, request, ctx):
        stream = self._engine().generate(generate_request(request))
        try:
            async for event in stream:
                yield event_pb(event)
        finally:
            stream.cancel()  # the browser went away: free the decoding slot

    @connect_method
    async def score(self, request, ctx):
        return score_pb(await self._engine().score(score_request(request)))

    @connect_method
    async def tokenize(self, request, ctx):
        return tokenize_pb(self._engine().tokenize(request.text, tuple(request.token_ids), request.add_special_tokens))

    @connect_method
    async def align_spans(self, request, ctx):
        spans = [Span(s.start, s.end, s.text) for s in request.spans]
        return align_pb(self._engine().align_spans(request.text, tuple(request.token_ids), spans))

    @connect_method
    async def get_model_info(self, request, ctx):
        return model_info_pb(self._engine().model_info())

    async def update_weights(self, request, ctx):
        raise ConnectError(Code.UNIMPLEMENTED, "UpdateWeights is served over gRPC only")


async def start_connect(engine: Callable[[], Engine], host: str, port: int, tls: TlsFiles = TlsFiles(),
                        guard: ConnectGuard | None = None, max_message_bytes: int | None = None) -> HttpServer:
    """Serve PolicyService over Connect on host:port (0: a free port) and announce it. `guard`
    checks tokens and stream slots like the gRPC port's (common/guard.py); `tls` as on gRPC."""
    application = PolicyServiceASGIApplication(
        PolicyConnect(engine), interceptors=[guard] if guard is not None else (),
        **({"read_max_bytes": max_message_bytes} if max_message_bytes else {}))
    app = route(service_routes([application]))
    server = HttpServer(app, host, port, ssl=uvicorn_ssl(tls))
    bound = await server.start()
    announce_connect("policy", host, bound, tls=tls.enabled)
    return server
