"""Connect next to the gRPC port: the one error mapping, and the HTTP server both servers share.

Browsers cannot speak gRPC (no HTTP/2 trailers from fetch), but they can speak Connect, which
carries the same protobuf messages over plain HTTP/1.1 POSTs (notes/browser-transport.md). Each
server can therefore serve its services a second time over Connect (`--http-port`), through an
adapter as thin as its gRPC servicer and over the same engine: policy_server/connect.py and
trainer_server/connect.py. The generated Connect applications (tokenfeedback.v1.*_connect, made with
protobuf=google so the messages are the very *_pb2 classes grpc.aio uses) also answer gRPC-Web and
Connect's JSON, so `curl -H 'content-type: application/json' -d '{}'
http://HOST:PORT/tokenfeedback.v1.TrainerService/GetStatus` works without a second API.

Here: `connect_method` (engine errors -> ConnectError, the Connect twin of common/rpc.py's
`rpc_method`), `CODECS` (binary and JSON, unknown JSON fields refused naming the field), `route`
(several Connect apps in one ASGI app, by path), and `HttpServer` (uvicorn in the server's own
asyncio loop, started and stopped by the caller, without taking over signals), which puts
common/guard.py's `HttpGuard` in front of the app (content types, sizes, bodies in flight,
/metrics) and closes connections whose request headers do not arrive in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import re
from collections.abc import Callable, Iterable, Mapping

import uvicorn
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.errors import ServiceError
from common.metrics import serve_metrics

log = logging.getLogger(__name__)

CODES: dict[str, Code] = {code.name: code for code in Code}

# What a server prints once its Connect port is bound (after its gRPC "listening on" line).
CONNECT_LINE = re.compile(r"tokenfeedback: (\S+) connect on (https?://\S+:\d+)")


def announce_connect(name: str, host: str, port: int, tls: bool = False) -> None:
    print(f"tokenfeedback: {name} connect on {'https' if tls else 'http'}://{host}:{port}", flush=True)


def connect_error(exc: BaseException, method: str) -> ConnectError:
    """The ConnectError a client sees for an exception raised by an engine."""
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, ServiceError):
        return ConnectError(CODES.get(exc.code, Code.INTERNAL), str(exc))
    log.exception("%s failed", method)
    return ConnectError(Code.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}")


def connect_method(fn: Callable) -> Callable:
    """Wrap a Connect service method (unary, or streaming response) with the error mapping, so no
    bad input ever takes a server down and every error keeps its code and field-naming message."""
    name = fn.__qualname__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self, request, ctx):
            try:
                async for item in fn(self, request, ctx):
                    yield item
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never crashes the server
                raise connect_error(exc, name) from exc

        return stream_wrapper

    @functools.wraps(fn)
    async def unary_wrapper(self, request, ctx):
        try:
            return await fn(self, request, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise connect_error(exc, name) from exc

    return unary_wrapper


class _StrictJsonCodec:
    """Connect's JSON codec, but a field the message does not have is an error naming it (the
    default ignores it, so `promptTxt` became an empty prompt)."""

    def __init__(self):
        self._inner = google_protobuf_json_codec(ignore_unknown_fields=False)

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message) -> bytes:
        return self._inner.encode(message)

    def decode(self, data, message_class):
        try:
            return self._inner.decode(data, message_class)
        except Exception as exc:  # noqa: BLE001 - json_format.ParseError and friends: the caller's JSON
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConnectError(Code.INVALID_ARGUMENT, f"request: {first_line[:300]}") from None


# The codecs the generated Connect applications get (`codecs=CODECS`): binary and strict JSON.
CODECS = (google_protobuf_binary_codec(), _StrictJsonCodec())


def route(apps: Mapping[str, Callable], fallback: Callable | None = None) -> Callable:
    """One ASGI app from several, chosen by path prefix ("/tokenfeedback.v1.PolicyService/" etc.:
    the generated apps' `.path` + "/"); anything else goes to `fallback`, or gets 404."""
    table = sorted(apps.items(), key=lambda item: -len(item[0]))

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":  # the servers run uvicorn with lifespan off
            return
        for prefix, target in table:
            if scope["path"].startswith(prefix):
                return await target(scope, receive, send)
        if fallback is not None:
            return await fallback(scope, receive, send)
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"not found\n"})

    return app


def service_routes(apps: Iterable) -> dict[str, Callable]:
    """{"/package.Service/": app} for generated Connect ASGI applications."""
    return {app.path + "/": app for app in apps}


class _Server(uvicorn.Server):
    def capture_signals(self):  # the host process owns SIGTERM/SIGINT (common/rpc.py)
        return contextlib.nullcontext()


_TIMED_OUT_BODY = b"request headers not complete in time\n"
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(_TIMED_OUT_BODY), _TIMED_OUT_BODY))


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for request headers: from a connection's first
    byte (or the first byte of its next request) to the end of the headers. A connection past it
    gets 408 and is closed, with one log line. (uvicorn times out idle keep-alive connections,
    not slowly sent headers.)"""

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._seen_cycle = None
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:  # waiting for a request's headers
                self._arm()
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self._seen_cycle:  # a request's headers are complete
                self._seen_cycle = self.cycle
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.warning("closed connection from %s: request headers not complete after %.0fs", client, seconds)
            self.transport.write(_TIMED_OUT)
            self.transport.close()

    return HeaderTimeoutH11


class HttpServer:
    """uvicorn serving an ASGI app inside the caller's event loop, behind common/guard.py's
    HttpGuard (which also answers GET /metrics when `metrics`).

    `port` is the bound port (0 asks for a free one); `ssl` serves HTTPS. Stop with
    `await server.stop(grace)`: open streams get `grace` seconds to finish, then are cancelled.
    """

    def __init__(self, app: Callable, host: str = "127.0.0.1", port: int = 0, grace: float = 5.0,
                 ssl: dict | None = None, max_body_bytes: int = 64 * 1024 * 1024,
                 max_inflight_bytes: int | None = None, header_timeout_s: float = 10.0,
                 metrics: bool = True):
        # ssl: uvicorn's ssl_* keyword arguments (common.tls.uvicorn_ssl), None or {} for plain HTTP
        # max_body_bytes: larger declared bodies get 413 unread; the servers pass --max-message-bytes
        # max_inflight_bytes: request bytes all running requests may hold; None: 4 largest bodies
        # header_timeout_s: a request's headers must be complete this long after its first byte
        from common.guard import HttpGuard  # here: common.guard imports common.rpc, which imports this module

        guarded = HttpGuard(app, max_body_bytes, max_inflight_bytes or 4 * max_body_bytes,
                            serve_metrics if metrics else None)
        config = uvicorn.Config(guarded, host=host, port=port, lifespan="off", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=grace, server_header=False,
                                http=header_timeout_protocol(header_timeout_s), **(ssl or {}))
        self.guard = guarded
        self._server = _Server(config)
        self._task: asyncio.Task | None = None
        self.host = host
        self.port = port

    async def start(self) -> int:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():  # bind failed: uvicorn logged why and exited
                with contextlib.suppress(SystemExit):
                    await self._task
                raise OSError(f"could not serve HTTP on {self.host}:{self.port}")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        if self._task is None:
            return
        if grace is not None:
            self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        try:
            await self._task
        except SystemExit:  # uvicorn exits this way when it could not start
            pass
        self._task = None
