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

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Mapping

import grpc

from common.auth import AuthTokens, authorize, role_needed
from common.errors import InvalidArgument, ResourceExhausted, ServiceError
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
                try:
                    with slots.held(method):
                        return await _maybe_await(inner(decode_stream(raw_messages), context))
                except ServiceError as exc:
                    await fail(context, exc)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)

        inner = handler.stream_stream

        async def stream_stream(raw_messages, context):
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

    async def on_start(self, ctx) -> str | None:
        from common.connect import connect_error  # the Connect side only: keeps grpc-only users light

        method = f"/{ctx.method.service_name}/{ctx.method.name}"
        try:
            authorize(self.tokens, method, ctx.request_headers.get("authorization"))
            return method if self.slots.acquire(method) else None
        except ServiceError as exc:
            if exc.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                log.warning("refused %s over Connect from %s: %s", method, ctx.client_address, exc.code)
            raise connect_error(exc, method) from None

    async def on_end(self, token: str | None, ctx, error) -> None:
        if token is not None:
            self.slots.release(token)
