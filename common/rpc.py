"""gRPC plumbing shared by both servers: server creation, health, reflection, error mapping.

The servicers stay thin adapters: each method is wrapped by `rpc_method`, which turns the engines'
`common.errors.ServiceError`s into gRPC status codes (the one place where that mapping lives) and
any other exception into INTERNAL with a log line, so no bad input ever takes a server down.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.errors import ServiceError

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
