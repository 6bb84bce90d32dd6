"""The Label Studio backend's HTTP layer: Starlette routes over backend.Backend, the
`labelstudio-backend` command-line options, and serve() on uvicorn.

Each route reads the request's JSON object, hands it to the Backend (which knows nothing of HTTP)
and answers its dict as JSON; a RequestError becomes its status and {"error": ..., where...}, any
other failure a JSON 500 and a log line, never a bare error page.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tokenfeedback.commands.registry import read_token_file
from tokenfeedback.labelstudio.backend import Backend, BackendConfig, PolicyUnreachable, RequestError

log = logging.getLogger("tokenfeedback.labelstudio")

# Environment variable with Label Studio's API token (else --label-studio-token-file, else /setup's).
TOKEN_ENV = "TOKENFEEDBACK_LABEL_STUDIO_TOKEN"


async def _json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"request body: expected a JSON object, got {type(body).__name__}")
    return body


def _endpoint(method: Callable[..., Awaitable[dict]], *, with_body: bool = True):
    """A Starlette endpoint answering `method(body)` (or `method()`) as JSON."""

    async def handle(request: Request) -> JSONResponse:
        try:
            reply = await (method(await _json_object(request)) if with_body else method())
            return JSONResponse(reply)
        except RequestError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except PolicyUnreachable as exc:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
            return JSONResponse({"error": str(exc)}, status_code=503)
        except Exception as exc:  # noqa: BLE001 - a JSON answer and a log line, never a bare 500
            log.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    return handle


def create_app(config: BackendConfig) -> Starlette:
    backend = Backend(config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        backend.close()

    health = _endpoint(backend.health, with_body=False)
    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/", health, methods=["GET"]),
            Route("/rejected", _endpoint(backend.rejected, with_body=False), methods=["GET"]),
            Route("/setup", _endpoint(backend.setup), methods=["POST"]),
            Route("/predict", _endpoint(backend.predict), methods=["POST"]),
            Route("/webhook", _endpoint(backend.webhook), methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.backend = backend
    return app

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `labelstudio-backend` options. --policy, --trainer, --tls-ca and the token (--token-file
    or $TOKENFEEDBACK_TOKEN) are the CLI's global connection options."""
    d = BackendConfig("", "")
    parser.add_argument("--host", default=d.host, help=f"bind address (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"HTTP port, 0 for a free one (default {d.port})")
    parser.add_argument("--threshold", type=float, default=d.threshold,
                        help=f"pre-mark tokens with probability below this (default {d.threshold})")
    parser.add_argument("--max-marks", type=int, default=d.max_marks,
                        help=f"at most this many pre-marked tokens per task (default {d.max_marks})")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help=f"length of completions generated for prompt-only tasks (default {d.max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=d.temperature,
                        help=f"their sampling temperature (default {d.temperature})")
    parser.add_argument("--seed", type=int, default=None, help="their sampling seed (default: fresh)")
    parser.add_argument("--train-steps", type=int, default=d.train_steps,
                        help="optimizer steps per START_TRAINING (default 0: one pass over pending annotations)")
    parser.add_argument("--state", default=d.state, help=f"SQLite file of submitted ids (default {d.state})")
    parser.add_argument("--webhook-budget", type=float, default=d.webhook_budget,
                        help=f"seconds a webhook may spend on trainer calls (default {d.webhook_budget}; "
                             "Label Studio waits 1)")
    parser.add_argument("--to-name", default=d.to_name, help="only regions on this <Text> tag (default: all)")
    parser.add_argument("--label-studio-url", default="",
                        help="Label Studio address for writing generated completions (default: from /setup)")
    parser.add_argument("--label-studio-token-file", metavar="FILE", default=None,
                        help=f"file holding its API token (default: ${TOKEN_ENV}, else the one /setup sends)")
    parser.add_argument("--label-studio-token", default="",
                        help="deprecated: the token on the command line is visible in ps; use the file or the variable")


def label_studio_token(args: argparse.Namespace) -> str:
    """Label Studio's API token: from --label-studio-token-file, else $TOKENFEEDBACK_LABEL_STUDIO_TOKEN,
    else "" (the one /setup sends). The old --label-studio-token still works, with a warning: a
    token on the command line is visible to every user of the machine (ps)."""
    path = getattr(args, "label_studio_token_file", None)
    if path:
        return read_token_file(path, "--label-studio-token-file")
    if getattr(args, "label_studio_token", ""):
        print(f"warning: --label-studio-token puts the token on the command line, where other users see it "
              f"(ps); use --label-studio-token-file or ${TOKEN_ENV}", file=sys.stderr, flush=True)
        return args.label_studio_token
    return os.environ.get(TOKEN_ENV, "").strip()


def config_from_args(args: argparse.Namespace, *, token: str | None = None) -> BackendConfig:
    return BackendConfig(
        policy=args.policy, trainer=args.trainer, host=args.host, port=args.port, threshold=args.threshold,
        max_marks=args.max_marks, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        seed=args.seed, train_steps=args.train_steps, state=args.state, webhook_budget=args.webhook_budget,
        to_name=args.to_name, label_studio_url=args.label_studio_url, label_studio_token=label_studio_token(args),
        tls_ca=getattr(args, "tls_ca", None), token=token,
    )


def serve(config: BackendConfig) -> None:
    """Bind, announce `tokenfeedback: labelstudio-backend listening on HOST:PORT`, serve until
    SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("config: %s", {k: v for k, v in asdict(config).items() if k not in ("token", "label_studio_token")})
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(128)  # connections queue here until uvicorn accepts them
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", access_log=False))
    # The line tests and scripts wait for (the servers' convention, common/process.py).
    print(f"tokenfeedback: labelstudio-backend listening on {config.host}:{port}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))
