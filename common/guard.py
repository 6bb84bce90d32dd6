"""What every call passes before it reaches a servicer: its credentials, a stream slot, a request
that parses. One gRPC server interceptor and one Connect interceptor, over the same checks.

- Credentials: common.auth.authorize (UNAUTHENTICATED without a valid bearer token,
  PERMISSION_DENIED for an annotator token on an admin method). Unary and streaming calls alike;
  health checking and reflection stay open.
- Stream slots (`StreamSlots`): a method with a limit (Generate, UpdateWeights, Train) admits that
  many open calls, counted across gRPC and Connect; one more is refused with RESOURCE_EXHAUSTED.
  A slot is released when its call ends in any way: finished, failed, cancelled by the client,
  past its deadline, or the client's connection gone.
- Requests that do not parse: grpc would answer INTERNAL ("Exception deserializing request");
  bytes that are not the method's protobuf message are the caller's fault, so the guard parses
  them itself and answers INVALID_ARGUMENT naming the message type (request streams: the message
  that failed ends the call with INVALID_ARGUMENT, through common/rpc.py's mapping).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping

import grpc

from common.auth import AuthTokens, authorize, role_needed
from common.errors import InvalidArgument, ResourceExhausted, ServiceError
from common.metrics import PATH as METRICS_PATH
from common.metrics import record_rpc
from common.rpc import status_code

log = logging.getLogger(__name__)


class StreamSlots:
    """Open calls per limited method. acquire() raises ResourceExhausted past the limit."""

    def __init__(self, limits: Mapping[str, int]):
        # limits: full method path -> most open calls at once; 0 or less: unlimited
        self.limits = {method: n for method, n in limits.items() if n > 0}
        self.active = {method: 0 for method in self.limits}
        self._lock = threading.Lock()  # both transports run on one loop; the lock is for in-process users

    def acquire(self, method: str) -> bool:
        """Take a slot; False when the method has no limit (nothing to release)."""
        limit = self.limits.get(method)
        if limit is None:
            return False
        with self._lock:
            if self.active[method] >= limit:
                raise ResourceExhausted(
                    f"{method}: {self.active[method]} calls are open, the server's limit (--max-streams and "
                    "friends); retry when one ends")
            self.active[method] += 1
        return True

    def release(self, method: str) -> None:
        with self._lock:
            self.active[method] -= 1
            assert self.active[method] >= 0, f"{method}: released more slots than were taken"

    @contextlib.contextmanager
    def held(self, method: str):
        taken = self.acquire(method)
        try:
            yield
        finally:
            if taken:
                self.release(method)


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for name, value in details.invocation_metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _type_name(deserializer: Callable | None) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is a bound classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request message"


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


@contextlib.contextmanager
def _measured(method: str, context: grpc.aio.ServicerContext):
    """Count and time one gRPC call: its code is what the context was aborted with, else the
    exception that left it (cancelled, or an error nobody mapped), else OK."""
    started = time.perf_counter()
    failure = None
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        failure = "CANCELLED"
        raise
    except ServiceError as exc:
        failure = exc.code
        raise
    except grpc.aio.AbortError:
        raise
    except BaseException:
        failure = "UNKNOWN"
        raise
    finally:
        code = context.code()
        if code is None or code == grpc.StatusCode.OK:
            code_name = failure or "OK"
        else:
            code_name = code.name
        record_rpc("grpc", method, code_name, time.perf_counter() - started)


class GrpcGuard(grpc.aio.ServerInterceptor):
    """The grpc.aio interceptor: credentials, slots, request parsing (module docstring)."""

    def __init__(self, tokens: AuthTokens, slots: StreamSlots | None = None):
        self.tokens = tokens
        self.slots = slots or StreamSlots({})

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method
        if handler is None or role_needed(method) is None:
            return handler  # unknown method (UNIMPLEMENTED) or health/reflection: nothing to guard
        try:
            authorize(self.tokens, method, _metadata(details, "authorization"))
        except ServiceError as exc:
            return _refusal(handler, method, exc)
        return self._wrap(handler, method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        type_name = _type_name(parse)
        slots = self.slots
        serialize = handler.response_serializer

        def decode(raw: bytes):
            if parse is None:
                return raw
            try:
                return parse(raw)
            except Exception as exc:  # noqa: BLE001 - DecodeError and whatever else garbage provokes
                raise InvalidArgument(f"not a valid {type_name} ({type(exc).__name__}: {exc})", "request") from None

        async def decode_stream(raw_messages):
            index = 0
            async for raw in raw_messages:
                try:
                    yield decode(raw)
                except InvalidArgument as exc:
                    raise InvalidArgument(exc.detail, f"request[{index}]") from None
                index += 1

        async def fail(context, exc: ServiceError):
            await context.abort(status_code(exc), str(exc))

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(raw, context):
                with _measured(method, context):
                    try:
                        request = decode(raw)
                        with slots.held(method):
                            return await _maybe_await(inner(request, context))
                    except ServiceError as exc:
                        await fail(context, exc)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)

        if handler.unary_stream:
            inner = handler.unary_stream

            async def unary_stream(raw, context):
                with _measured(method, context):
                    try:
                        request = decode(raw)
                        taken = slots.acquire(method)
                    except ServiceError as exc:
                        await fail(context, exc)
                    try:
                        responses = inner(request, context)
                        if inspect.isasyncgen(responses):
                            try:
                                async for item in responses:
                                    yield item
                            finally:
                                await responses.aclose()  # its own `finally` (e.g. free the decoding slot) runs now
                        else:
                            await _maybe_await(responses)
                    finally:
                        if taken:
                            slots.release(method)

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)

        if handler.stream_unary:
            inner = handler.stream_unary

            async def stream_unary(raw_messages, context):
                with _measured(method, context):
                    try:
                        with slots.held(method):
                            return await _maybe_await(inner(decode_stream(raw_messages), context))
                    except ServiceError as exc:
                        await fail(context, exc)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)

        inner = handler.stream_stream

        async def stream_stream(raw_messages, context):
            with _measured(method, context):
                try:
                    taken = slots.acquire(method)
                except ServiceError as exc:
                    await fail(context, exc)
                try:
                    responses = inner(decode_stream(raw_messages), context)
                    if inspect.isasyncgen(responses):
                        try:
                            async for item in responses:
                                yield item
                        finally:
                            await responses.aclose()
                    else:
                        await _maybe_await(responses)
                finally:
                    if taken:
                        slots.release(method)

        return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)


def _refusal(handler: grpc.RpcMethodHandler, method: str, exc: ServiceError) -> grpc.RpcMethodHandler:
    """A handler of the same shape that reads nothing and answers the refusal."""
    code, message = status_code(exc), str(exc)

    async def refuse(_request, context):
        log.warning("refused %s from %s: %s", method, context.peer(), exc.code)
        record_rpc("grpc", method, exc.code, 0.0)
        await context.abort(code, message)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class ConnectGuard:
    """The same credentials and slots for the Connect port: a connectrpc metadata interceptor,
    which runs before the request body is read (put it first in the interceptor list)."""

    def __init__(self, tokens: AuthTokens, slots: StreamSlots | None = None):
        self.tokens = tokens
        self.slots = slots or StreamSlots({})

    async def on_start(self, ctx) -> tuple[str, bool, float]:
        from common.connect import connect_error  # the Connect side only: keeps grpc-only users light

        started = time.perf_counter()
        method = f"/{ctx.method.service_name}/{ctx.method.name}"
        try:
            authorize(self.tokens, method, ctx.request_headers.get("authorization"))
            return method, self.slots.acquire(method), started
        except ServiceError as exc:
            if exc.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                log.warning("refused %s over Connect from %s: %s", method, ctx.client_address, exc.code)
            record_rpc("connect", method, exc.code, time.perf_counter() - started)
            raise connect_error(exc, method) from None

    async def on_end(self, token: tuple[str, bool, float], ctx, error) -> None:
        method, taken, started = token
        if taken:
            self.slots.release(method)
        record_rpc("connect", method, connect_code(error), time.perf_counter() - started)


def connect_code(error: BaseException | None) -> str:
    """The gRPC name of the status a Connect call ended with (Connect spells CANCELLED "CANCELED")."""
    if error is None:
        return "OK"
    code = getattr(error, "code", None)
    name = getattr(code, "name", None)
    if not isinstance(name, str):
        return "UNKNOWN"
    return "CANCELLED" if name == "CANCELED" else name


# ---- the HTTP port, before Connect sees a request ---------------------------------------------

# What the Connect port understands (connectrpc's generated applications): unary methods take
# application/proto or application/json, streaming methods the enveloped application/connect+proto
# or application/connect+json; gRPC-Web also works. gRPC itself needs HTTP/2 trailers: the gRPC port.
UNARY_TYPES = ("application/proto", "application/json")
STREAM_TYPES = ("application/connect+proto", "application/connect+json")
GRPC_WEB_TYPES = ("application/grpc-web", "application/grpc-web+proto", "application/grpc-web+json")
CONTENT_TYPES = UNARY_TYPES + STREAM_TYPES + GRPC_WEB_TYPES

# "/package.Service/Method": the paths Connect serves (anything else is the host app's business).
_RPC_PATH = re.compile(r"/[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+/[A-Za-z_]\w*")
_LARGE = 1 << 20  # a request whose body may exceed this hands freed memory back to the OS when it ends


def _content_types_help(content_type: str | None) -> str:
    if content_type in UNARY_TYPES:
        return (f"content-type {content_type!r} is for unary methods; this method streams its response: send "
                "application/connect+json or application/connect+proto, each message in a 5-byte envelope "
                "(flags byte 0, then the length as 4 bytes big-endian)")
    if content_type in STREAM_TYPES:
        return (f"content-type {content_type!r} is for streaming methods; this method is unary: send "
                "application/json or application/proto")
    use = ("use application/json or application/proto for unary methods, application/connect+json or "
           "application/connect+proto (5-byte enveloped messages) for streaming ones")
    if content_type is None:
        return use[0].upper() + use[1:]
    return f"unsupported content-type {content_type[:80] or '(none)'!r}: {use}"


def _release_freed_memory() -> None:
    """glibc keeps freed heap pages; after a large request ends, give them back (elsewhere: no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HttpGuard:
    """ASGI middleware in front of the HTTP port's app: checks that need no body, done before the
    body is read (docs/design.md, "Errors and limits").

    - A header value that is not UTF-8: 400, one log line (Connect would fail with a traceback).
    - On Connect paths: content-type application/grpc (HTTP/2 gRPC, served on the gRPC port): 415,
      one log line; any other content-type Connect does not take: 415 whose body says which to use
      (also when Connect itself answers a bare 415: unary type on a streaming method and back).
    - Content-Length above `max_body_bytes`: 413 at once, nothing read.
    - Bodies in flight: each request holds its Content-Length (a body without one: `max_body_bytes`)
      of a budget of `max_inflight_bytes` while it runs; a request that does not fit gets 503 with
      Retry-After, so concurrent large uploads hold at most that much. After a large request
      the freed heap goes back to the OS.
    - `metrics` (an ASGI app) answers GET /metrics.
    """

    def __init__(self, app: Callable, max_body_bytes: int, max_inflight_bytes: int, metrics: Callable | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes  # largest request body accepted (a message plus its framing)
        self.max_inflight_bytes = max_inflight_bytes  # all request bodies being handled at once
        self.metrics = metrics
        self.inflight = 0  # bytes reserved by running requests (one event loop: no lock needed)
        self._trim_after = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = f"{scope['client'][0]}:{scope['client'][1]}" if scope.get("client") else "?"
        headers = scope.get("headers") or ()
        for name, value in headers:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                shown = name.decode("latin-1")[:40]
                log.warning("refused %s %s from %s: header %r is not UTF-8", scope["method"],
                            scope["path"][:100], client, shown)
                return await _plain(send, 400, f"header {shown!r}: value is not valid UTF-8\n")
        if self.metrics is not None and scope["path"] == METRICS_PATH:
            return await self.metrics(scope, receive, send)
        rpc = scope["method"] == "POST" and _RPC_PATH.fullmatch(scope["path"]) is not None
        if not rpc:
            return await self.app(scope, receive, send)

        content_type = _header(headers, b"content-type").split(";")[0].strip().lower()
        if content_type.startswith("application/grpc") and content_type not in GRPC_WEB_TYPES:
            log.warning("refused %s from %s: content-type %r is gRPC, which this HTTP/1.1 Connect port does not "
                        "serve (use the gRPC port)", scope["path"][:100], client, content_type[:80])
            return await _plain(send, 415, f"content-type {content_type[:80]!r}: gRPC is served on the server's gRPC "
                                "port; this port speaks Connect. " + _content_types_help(None) + "\n",
                                [(b"accept-post", ", ".join(UNARY_TYPES + STREAM_TYPES).encode())])
        if content_type not in CONTENT_TYPES:
            return await _plain(send, 415, _content_types_help(content_type) + "\n",
                                [(b"accept-post", ", ".join(UNARY_TYPES + STREAM_TYPES).encode())])

        declared = _header(headers, b"content-length")
        size = int(declared) if declared.isdigit() else None  # h11 has already refused a malformed one
        if size is not None and size > self.max_body_bytes:
            return await _plain(send, 413, f"request body of {size} bytes is over this server's limit of "
                                f"{self.max_body_bytes} bytes (--max-message-bytes)\n")
        hold = size if size is not None else self.max_body_bytes
        if self.inflight + hold > self.max_inflight_bytes and self.inflight > 0:
            log.warning("refused %s from %s: %d request bytes in flight, limit %d", scope["path"][:100], client,
                        self.inflight, self.max_inflight_bytes)
            return await _plain(send, 503, f"the server is handling {self.inflight} bytes of requests; this one's "
                                f"{hold} would pass its limit of {self.max_inflight_bytes}: retry shortly\n",
                                [(b"retry-after", b"1")])
        self.inflight += hold
        self._trim_after |= hold > _LARGE
        try:
            await self.app(scope, receive, _explain_415(send, content_type))
        finally:
            self.inflight -= hold
            if self._trim_after and self.inflight == 0:
                self._trim_after = False
                await asyncio.to_thread(_release_freed_memory)


def _header(headers, name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


async def _plain(send, status: int, text: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def _explain_415(send, content_type: str):
    """Connect answers a content-type that does not suit the method with a bare 415: add why."""
    replaced = False

    async def wrapped(message):
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] == 415:
            replaced = True
            body = (_content_types_help(content_type) + "\n").encode()
            await send({"type": "http.response.start", "status": 415,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"accept-post", ", ".join(UNARY_TYPES + STREAM_TYPES).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if replaced:  # Connect's own (empty) body of that 415
            return
        await send(message)

    return wrapped
