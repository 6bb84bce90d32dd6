"""The policy server process: bind, announce, load the model, serve, drain on SIGTERM.

    python -m policy_server --model data/demo-model --port 50051
    python -m policy_server --model gpt2 --device cuda --dtype bfloat16 --port 50051

The port is bound before the model loads, so health checks answer NOT_SERVING meanwhile; the
server prints `tokenfeedback: policy listening on HOST:PORT` once bound (common.process waits for
that line) and turns SERVING when the model is ready (docs/design.md, "Servers"). SIGTERM /
SIGINT: health NOT_SERVING, new Generate calls get UNAVAILABLE, running streams get `--grace`
seconds to finish, then are cancelled; exit code 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys

from common.auth import log_auth_summary
from common.connect import HttpServer
from common.guard import ConnectGuard, GrpcGuard, StreamSlots
from common.metrics import watch_policy
from common.process import announce
from common.rpc import ServerOptions, create_grpc_server, install_signal_handlers, set_serving
from common.tls import server_credentials
from policy_server.config import PolicyServerConfig, parse_args
from policy_server.connect import start_connect
from policy_server.convert import SERVICE_NAME, PolicyHandler
from policy_server.engine import Engine
from policy_server.service import register

log = logging.getLogger("policy_server")

__all__ = ["PolicyServer", "create_server", "main", "parse_args", "serve"]


class PolicyServer:
    """The serving process: the gRPC port (and the Connect port with --http-port), the handler both
    serve, and the engine once loaded."""

    def __init__(self, config: PolicyServerConfig):
        self.config = config
        self.handler = PolicyHandler()  # UNAVAILABLE until `load` sets its engine
        # Open-call limits per method, counted across the gRPC and Connect ports (common/guard.py)
        self.slots = StreamSlots({f"/{SERVICE_NAME}/Generate": config.max_streams,
                                  f"/{SERVICE_NAME}/UpdateWeights": config.max_updates})
        self.engine: Engine | None = None
        self.server = None  # grpc.aio.Server, once started
        self.health = None
        self.http: HttpServer | None = None

    async def start(self) -> int:
        """Bind and serve (health NOT_SERVING, every RPC UNAVAILABLE until `load`). Every call
        passes the guard (tokens, stream slots, parsing). Returns the bound gRPC port."""
        c = self.config
        options = ServerOptions(host=c.host, port=c.port, max_message_bytes=c.max_message_bytes)
        self.server, port, self.health = await create_grpc_server(
            options, [register(self.handler)], [SERVICE_NAME], [GrpcGuard(c.auth, self.slots)],
            server_credentials(c.tls))
        log_auth_summary(log, c.host, c.tls.enabled, c.auth, "policy")
        return port

    async def start_connect(self) -> None:
        """The Connect port next to gRPC (--http-port), over the same handler and slots."""
        c = self.config
        self.http = await start_connect(self.handler, c.host, c.http_port, tls=c.tls,
                                        guard=ConnectGuard(c.auth, self.slots), max_message_bytes=c.max_message_bytes)

    async def load(self) -> Engine:
        """Load the model (off the event loop), start the scheduler, report SERVING."""
        engine_class = Engine
        if self.config.engine == "vllm":  # imported only here: the default path needs nothing of vLLM
            from policy_server.vllm_engine import VllmEngine as engine_class
        engine = await asyncio.to_thread(engine_class.load, self.config.engine_config())
        engine.start()
        self.engine = self.handler.engine = engine
        watch_policy(engine)  # its state at every /metrics scrape (common/metrics.py)
        await set_serving(self.health, [SERVICE_NAME], True)
        info = engine.model_info()
        log.info("serving %s: vocab %d, max length %d, %s on %s, %d tensors (%.1f MB)", info.model_name,
                 info.vocab_size, info.max_length, info.dtype, info.device, info.tensor_count,
                 info.parameter_bytes / 1e6)
        return engine

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING, no new streams, running ones get `grace` seconds, then all closes."""
        try:
            if self.health is not None:
                await set_serving(self.health, [SERVICE_NAME], False)
            if self.engine is not None:
                self.engine.stop_accepting()
            if self.server is not None:
                await self.server.stop(grace)
        finally:
            if self.http is not None:
                await self.http.stop(grace)
            if self.engine is not None:
                await self.engine.close()


async def create_server(config: PolicyServerConfig) -> tuple[PolicyServer, int]:
    """Bind and announce the gRPC port (health NOT_SERVING). Returns (server, port); then
    `server.load()` to serve, `server.stop(grace)` at the end."""
    server = PolicyServer(config)
    port = await server.start()
    announce("policy", config.host, port)
    return server, port


async def serve(config: PolicyServerConfig) -> int:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    server, _ = await create_server(config)
    grace = config.grace_s
    try:
        if config.http_port is not None:
            await server.start_connect()
        loading = asyncio.ensure_future(server.load())
        await asyncio.wait([loading, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():  # stopped while loading: the load thread cannot be interrupted
            log.info("stopping while the model loads")
        await loading
        await stop.wait()
        log.info("draining: up to %.1fs for running streams", grace)
    except Exception:
        log.exception("policy server failed")
        grace = 0
        return 1
    finally:
        await server.stop(grace)
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    config = parse_args(argv, os.environ)
    log.info("config: %s", dataclasses.asdict(config))
    return asyncio.run(serve(config))
