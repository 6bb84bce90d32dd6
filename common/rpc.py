"""gRPC plumbing shared by both servers: server creation, health, reflection, error mapping, and
the binder that serves one handler over both gRPC and Connect.

Each RPC is written once, in a *handler*: a plain object with one method per RPC, named in
snake_case after the proto (GetModelInfo -> get_model_info), that takes the protobuf request and
returns the protobuf response:

    class PolicyHandler:
        async def score(self, request: ScoreRequest) -> ScoreResponse: ...
        async def generate(self, request: GenerateRequest):          # server streaming:
            yield GenerateEvent(...)                                  #   an async generator
        async def update_weights(self, requests: AsyncIterator[WeightUpdateMessage]): ...  # client streaming

    servicer = grpc_servicer(handler, policy_pb2.DESCRIPTOR.services_by_name["PolicyService"])
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)        # gRPC
    PolicyServiceASGIApplication(connect_service(handler, descriptor))           # Connect

`grpc_servicer` gives the grpc.aio calling convention (`CamelCase(request, context)`, methods
wrapped by `rpc_method`), `connect_service` Connect's (`snake_case(request, ctx)`, wrapped by
common/connect.py's `connect_method`); neither adds logic of its own. Errors: a handler raises
`common.errors.ServiceError`s, which `rpc_method` turns into gRPC status codes (the one place where
that mapping lives) and `connect_method` into ConnectErrors; any other exception becomes INTERNAL
with a log line, so no bad input ever takes a server down. An RPC that one transport does not
offer is named in `unimplemented` ({RPC name: why}): that transport answers UNIMPLEMENTED with
the reason (docs/design.md, "Servers").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import re
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.connect import connect_method
from common.errors import ServiceError, Unimplemented

log = logging.getLogger(__name__)

STATUS_CODES: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


def status_code(exc: ServiceError) -> grpc.StatusCode:
    return STATUS_CODES.get(exc.code, grpc.StatusCode.INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str):
    if isinstance(exc, ServiceError):
        await context.abort(status_code(exc), str(exc))
    log.exception("%s failed", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}")


def rpc_method(fn: Callable) -> Callable:
    """Wrap a grpc.aio servicer method (unary or streaming response) with the error mapping."""
    name = fn.__qualname__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never crashes the server
                await _abort(context, exc, name)

        return stream_wrapper

    @functools.wraps(fn)
    async def unary_wrapper(self, request, context):
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc, name)

    return unary_wrapper


# ---- the binder: one handler, two transports --------------------------------------------------


def snake_case(rpc: str) -> str:
    """The handler's (and Connect's) name for an RPC: GetModelInfo -> get_model_info."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", rpc).lower()


def _bind(handler: object, descriptor: ServiceDescriptor, unimplemented: Mapping[str, str], wrap: Callable,
          name: Callable[[str], str], kind: str) -> object:
    """An object with one `name(rpc)(self, request, context)` method per RPC of `descriptor`, each
    forwarding the request to the handler's method and wrapped by `wrap` (the error mapping)."""
    methods = {}
    for rpc in descriptor.methods:
        qualname = f"{descriptor.name}.{rpc.name}"
        if rpc.name in unimplemented:
            target = functools.partial(_refuse, Unimplemented(unimplemented[rpc.name], rpc.name))
        else:
            target = getattr(handler, snake_case(rpc.name), None)
            if target is None:
                raise TypeError(f"{type(handler).__name__} has no method {snake_case(rpc.name)} for {qualname}")
        if rpc.server_streaming and rpc.name not in unimplemented:

            async def method(self, request, context, target=target):
                async with contextlib.aclosing(target(request)) as items:  # a cancelled call closes the handler's
                    async for item in items:
                        yield item
        else:

            async def method(self, request, context, target=target):
                return await target(request)

        method.__name__, method.__qualname__ = name(rpc.name), qualname
        methods[name(rpc.name)] = wrap(method)
    return type(f"{descriptor.name}{kind}", (), methods)()


async def _refuse(error: Unimplemented, request):
    raise error


def grpc_servicer(handler: object, descriptor: ServiceDescriptor, unimplemented: Mapping[str, str] = {}) -> object:
    """A grpc.aio servicer for `descriptor` (CamelCase(request, context)) over `handler`; pass it to
    the generated add_*Servicer_to_server."""
    return _bind(handler, descriptor, unimplemented, rpc_method, lambda rpc: rpc, "Grpc")


def connect_service(handler: object, descriptor: ServiceDescriptor, unimplemented: Mapping[str, str] = {}) -> object:
    """A Connect service for `descriptor` (snake_case(request, ctx)) over `handler`; pass it to the
    generated *ASGIApplication."""
    return _bind(handler, descriptor, unimplemented, connect_method, snake_case, "Connect")


# ---- the server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerOptions:
    """Transport settings common to both servers."""

    host: str = "127.0.0.1"  # bind address; plaintext without auth is meant for loopback only
    port: int = 0  # 0 picks a free port (tests); the chosen port is returned by create_grpc_server
    max_message_bytes: int = 64 * 1024 * 1024  # largest request/response message, both directions
    max_concurrent_rpcs: int | None = None  # None: no cap at the transport (engines enforce theirs)
    # Ping a client that has calls open after this many idle seconds; no answer within
    # keepalive_timeout_s ends its calls (a vanished peer frees its stream slots, common/guard.py).
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0


async def create_grpc_server(
    options: ServerOptions,
    register: Iterable[Callable[[grpc.aio.Server], None]],
    service_names: Iterable[str],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build and start a grpc.aio server with health (NOT_SERVING until the caller says otherwise)
    and reflection. `register` callables add the servicers. Returns (server, bound port, health)."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", int(options.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(options.keepalive_timeout_s * 1000)),
        ],
    )
    for add in register:
        add(server)
    service_names = list(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    address = f"{options.host}:{options.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    return server, port, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool):
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT set `stop`, so the main coroutine drains and shuts down cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
