"""The policy server process: bind, announce, load the model, serve, drain on SIGTERM.

    python -m policy_server --model data/demo-model --port 50051
    python -m policy_server --model gpt2 --device cuda --dtype bfloat16 --port 50051

The port is bound before the model loads, so health checks answer NOT_SERVING meanwhile; the
server prints `tokenfeedback: policy listening on HOST:PORT` once bound (common.process waits for
that line) and turns SERVING when the model is ready. SIGTERM / SIGINT: health NOT_SERVING, new
Generate calls get UNAVAILABLE, running streams get `--grace` seconds to finish, then are
cancelled; exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from common.auth import AuthTokens, add_auth_arguments, log_auth_summary, tokens_from_args
from common.guard import ConnectGuard, GrpcGuard, StreamSlots
from common.hf import DTYPE_CHOICES
from common.process import announce
from common.rpc import ServerOptions, create_grpc_server, install_signal_handlers, set_serving
from common.tls import TlsFiles, add_tls_arguments, server_credentials, tls_from_args
from policy_server.connect import start_connect
from policy_server.convert import PolicyHandler
from policy_server.engine import Engine, EngineConfig
from policy_server.service import SERVICE_NAME, register

log = logging.getLogger("policy_server")


@dataclass(frozen=True)
class PolicyServerConfig:
    model: str = "data/demo-model"  # local folder (what `make model` writes) or a hub id
    host: str = "127.0.0.1"  # bind address; plaintext without auth: loopback unless you know better
    port: int = 50051  # 0 binds a free port (announced on stdout)
    http_port: int | None = None  # Connect (browsers, curl) next to gRPC, policy_server/connect.py; 0 free; None off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on a GPU) | float32 | bfloat16 | float16
    max_batch: int = 16  # sequences decoded together in one forward
    max_queue: int = 256  # requests waiting for a slot before RESOURCE_EXHAUSTED
    max_new_tokens_limit: int = 512  # largest SamplingParams.max_new_tokens accepted
    # torch intra-op threads. 1 suits small models and shared machines (OpenMP threads that wait
    # for a busy core stall every op; the gRPC loop needs a core too); 0 keeps torch's default.
    threads: int = 1
    grace_s: float = 10.0  # on SIGTERM, how long running streams may go on before they are cancelled
    # Largest gRPC message either way: above the 4 MiB update chunks plus framing, far below memory.
    max_message_bytes: int = 16 * 1024 * 1024
    # ---- security and limits (issue 7; common/auth.py, common/tls.py, common/guard.py) ----
    max_streams: int = 64  # Generate streams open at once (gRPC + Connect); one more: RESOURCE_EXHAUSTED
    max_updates: int = 2  # UpdateWeights calls at once (each may buffer a whole model); 0: no limit
    max_prompt_tokens: int = 4096  # longest prompt in tokens (the model's length caps it too)
    max_text_chars: int = 65536  # longest text field, checked before tokenizing
    max_update_bytes: int = 0  # largest UpdateWeights header.total_bytes; 0: the model's size bounds it
    tls: TlsFiles = TlsFiles()  # --tls-cert/--tls-key[/--tls-client-ca]; none: plaintext
    auth: AuthTokens = AuthTokens()  # token digests per role, from files / environment; none: auth off

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model, device=self.device, dtype=self.dtype, max_batch=self.max_batch,
            max_queue=self.max_queue, max_new_tokens_limit=self.max_new_tokens_limit, threads=self.threads,
            max_prompt_tokens=self.max_prompt_tokens, max_text_chars=self.max_text_chars,
            max_update_bytes=self.max_update_bytes,
        )

    def guard_slots(self) -> StreamSlots:
        """Open-call limits per method, shared by the gRPC and Connect ports."""
        return StreamSlots({"/tokenfeedback.v1.PolicyService/Generate": self.max_streams,
                            "/tokenfeedback.v1.PolicyService/UpdateWeights": self.max_updates})


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> PolicyServerConfig:
    """The config from argv; tokens also from `environ` (main passes os.environ; nothing else reads it)."""
    d = PolicyServerConfig()
    p = argparse.ArgumentParser(prog="python -m policy_server", description="tokenfeedback PolicyService over gRPC")
    p.add_argument("--model", default=d.model, help="local model folder or Hugging Face hub id (default %(default)s)")
    p.add_argument("--host", default=d.host, help="bind address (default %(default)s)")
    p.add_argument("--port", type=int, default=d.port, help="port; 0 picks a free one (default %(default)s)")
    p.add_argument("--http-port", type=int, default=d.http_port,
                   help="also serve PolicyService over Connect (the labeling page, curl) on this port; 0: a free one")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (default %(default)s)")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES, help="parameter dtype (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="streams decoded together (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests (default %(default)s)")
    p.add_argument("--max-new-tokens-limit", type=int, default=d.max_new_tokens_limit,
                   help="largest max_new_tokens accepted (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads, 0 = torch default (default %(default)s)")
    p.add_argument("--grace", type=float, default=d.grace_s, help="seconds running streams get on SIGTERM")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes, help="gRPC message size limit")
    p.add_argument("--max-streams", type=int, default=d.max_streams,
                   help="Generate streams open at once; more get RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--max-updates", type=int, default=d.max_updates,
                   help="UpdateWeights calls at once, 0 = no limit (default %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="longest prompt in tokens (default %(default)s; the model's length caps it)")
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars,
                   help="longest text field in characters (default %(default)s)")
    p.add_argument("--max-update-bytes", type=int, default=d.max_update_bytes,
                   help="largest weight update in bytes (header.total_bytes); 0 (default): the model's size bounds it")
    add_tls_arguments(p)
    add_auth_arguments(p)
    a = p.parse_args(argv)
    if a.max_batch < 1 or a.max_queue < 0 or a.max_new_tokens_limit < 1 or a.grace < 0:
        p.error("--max-batch and --max-new-tokens-limit must be >= 1, --max-queue and --grace >= 0")
    if a.max_message_bytes < 5 * 1024 * 1024:
        p.error("--max-message-bytes must hold a 4 MiB update chunk (>= 5 MiB)")
    if a.max_streams < 1 or a.max_updates < 0 or a.max_prompt_tokens < 1 or a.max_text_chars < 1 or a.max_update_bytes < 0:
        p.error("--max-streams, --max-prompt-tokens, --max-text-chars must be >= 1; --max-updates, --max-update-bytes >= 0")
    try:
        security = dict(tls=tls_from_args(a), auth=tokens_from_args(a, environ or {}))
        security["tls"].check()
    except ValueError as exc:
        p.error(str(exc))
    return PolicyServerConfig(
        model=a.model, host=a.host, port=a.port, http_port=a.http_port, device=a.device, dtype=a.dtype, max_batch=a.max_batch,
        max_queue=a.max_queue, max_new_tokens_limit=a.max_new_tokens_limit, threads=a.threads, grace_s=a.grace,
        max_message_bytes=a.max_message_bytes, max_streams=a.max_streams, max_updates=a.max_updates,
        max_prompt_tokens=a.max_prompt_tokens, max_text_chars=a.max_text_chars, max_update_bytes=a.max_update_bytes,
        **security,
    )


async def create_server(config: PolicyServerConfig, slots: StreamSlots | None = None,
                        ) -> tuple[grpc.aio.Server, int, PolicyHandler, object]:
    """Bind and start serving (health NOT_SERVING, every RPC UNAVAILABLE until `load_into`).
    Every call passes the guard (tokens, stream slots shared with the Connect port, parsing)."""
    service = PolicyHandler()
    options = ServerOptions(host=config.host, port=config.port, max_message_bytes=config.max_message_bytes)
    guard = GrpcGuard(config.auth, slots or config.guard_slots())
    server, port, health = await create_grpc_server(options, [register(service)], [SERVICE_NAME], [guard],
                                                    server_credentials(config.tls))
    log_auth_summary(log, config.host, config.tls.enabled, config.auth, "policy")
    return server, port, service, health


async def load_into(config: PolicyServerConfig, service: PolicyHandler, health) -> Engine:
    """Load the model (off the event loop), start the scheduler, report SERVING."""
    engine = await asyncio.to_thread(Engine.load, config.engine_config())
    engine.start()
    service.engine = engine
    await set_serving(health, [SERVICE_NAME], True)
    info = engine.model_info()
    log.info("serving %s: vocab %d, max length %d, %s on %s, %d tensors (%.1f MB)", info.model_name,
             info.vocab_size, info.max_length, info.dtype, info.device, info.tensor_count, info.parameter_bytes / 1e6)
    return engine


async def serve(config: PolicyServerConfig) -> int:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    slots = config.guard_slots()
    server, port, service, health = await create_server(config, slots)
    announce("policy", config.host, port)
    http = None
    if config.http_port is not None:
        http = await start_connect(service, config.host, config.http_port,
                                   tls=config.tls, guard=ConnectGuard(config.auth, slots),
                                   max_message_bytes=config.max_message_bytes)
    engine = None
    try:
        loading = asyncio.ensure_future(load_into(config, service, health))
        await asyncio.wait([loading, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():  # stopped while loading: the load thread cannot be interrupted
            log.info("stopping while the model loads")
        engine = await loading
        await stop.wait()
        log.info("draining: up to %.1fs for running streams", config.grace_s)
        await set_serving(health, [SERVICE_NAME], False)
        engine.stop_accepting()
        await server.stop(config.grace_s)
    except Exception:
        log.exception("policy server failed")
        await server.stop(0)
        return 1
    finally:
        if http is not None:
            await http.stop(config.grace_s)
        if engine is not None:
            await engine.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    config = parse_args(argv, os.environ)
    log.info("config: %s", dataclasses.asdict(config))
    return asyncio.run(serve(config))
