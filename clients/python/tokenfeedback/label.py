"""`tokenfeedback label`: the labeling page, served at one origin with both services' Connect endpoints.

    tokenfeedback label                     # starts policy + trainer on the demo model, serves the page
    tokenfeedback label --policy-http http://127.0.0.1:8081 --trainer-http http://127.0.0.1:8082
    tokenfeedback label --prompts prompts.txt --port 8700

The page (web/dist, built by `make web`) speaks tokenfeedback.v1 over Connect to the origin that
served it. The servers serve Connect themselves, next to their gRPC port (`--http-port`, see
common/connect.py), over the same engines as their gRPC servicers. This process only serves the
static files and forwards each /tokenfeedback.v1.PolicyService/* and
/tokenfeedback.v1.TrainerService/* request byte for byte to that server's Connect port, streaming
the answer back as it arrives (a token reaches the page when the server sends it). It knows no RPC
and no message, so it cannot drift from proto/; the browser needs one origin because the servers
send no CORS headers. A server that cannot be reached is answered as a Connect `unavailable` error.

The page keeps unsent annotations in the browser's storage, which is per origin (host and port):
keep the same --port between runs (default 8700) so they are found again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h11
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from tokenfeedback.launch import Servers, announce, start_servers

log = logging.getLogger("tokenfeedback.label")

REPO = Path(__file__).resolve().parents[3]
WEB_DIST = REPO / "web" / "dist"
POLICY_PATH = "/tokenfeedback.v1.PolicyService/"
TRAINER_PATH = "/tokenfeedback.v1.TrainerService/"
# Headers that belong to one HTTP connection, not to the request or response it carries.
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection",
              b"host", b"content-length", b"trailer"}


@dataclass(frozen=True)
class LabelConfig:
    host: str = "127.0.0.1"  # where the page is served; loopback unless auth and TLS are in front
    port: int = 8700  # fixed by default: the browser keeps unsent annotations per host:port
    policy_http: str = ""  # Connect URL of a running policy server; "" with trainer_http "" starts both
    trainer_http: str = ""  # Connect URL of a running trainer server
    prompts: str = ""  # a file of prompts, one per line, offered by the page's "Next prompt"
    web_dir: str = str(WEB_DIST)  # the built page
    model: str = "data/demo-model"  # the model of the servers this command starts
    data: str = "data/trainer"  # the trainer data folder of the servers this command starts
    startup_timeout: float = 300.0  # seconds each started server may take to load


# ---- forwarding Connect requests -------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """A server's Connect endpoint: http://HOST:PORT."""

    name: str
    host: str
    port: int

    @classmethod
    def parse(cls, name: str, url: str) -> Upstream:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"--{name}-http: expected http://HOST:PORT, got {url!r}")
        return cls(name, parts.hostname, parts.port)


async def _respond(send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


def _connect_error(content_type: bytes, message: str) -> tuple[int, bytes, bytes]:
    """A Connect `unavailable` error in the framing the client asked for: a unary call gets a JSON
    body with an HTTP error status; a streaming call (application/connect+*) gets an end-of-stream
    envelope (flag 0x02) holding the error."""
    error = {"code": "unavailable", "message": message}
    if content_type.startswith(b"application/connect+"):
        body = json.dumps({"error": error}).encode()
        return 200, struct.pack(">BI", 2, len(body)) + body, content_type
    return 503, json.dumps(error).encode(), b"application/json"


async def _read_body(receive) -> bytes | None:
    """The whole request body (Connect requests of the page are one message), None on disconnect."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def forward(upstream: Upstream, scope, receive, send) -> None:
    """Send the request to the upstream server over a fresh HTTP/1.1 connection and stream its
    response back. If the browser goes away first, the upstream connection is closed, which
    cancels the RPC there (a Generate stream frees its decoding slot)."""
    body = await _read_body(receive)
    if body is None:
        return
    headers = dict(scope["headers"])
    content_type = headers.get(b"content-type", b"")
    target = scope["raw_path"] or scope["path"].encode()
    if scope["query_string"]:
        target += b"?" + scope["query_string"]
    try:
        reader, writer = await asyncio.open_connection(upstream.host, upstream.port)
    except OSError as exc:
        await _respond(send, *_connect_error(
            content_type, f"{upstream.name} server at {upstream.host}:{upstream.port} unreachable: {exc.strerror or exc}"))
        return
    conn = h11.Connection(h11.CLIENT)
    request_headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
    request_headers += [(b"host", f"{upstream.host}:{upstream.port}".encode()),
                        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    writer.write(conn.send(h11.Request(method=scope["method"], target=target, headers=request_headers)))
    writer.write(conn.send(h11.Data(data=body)))
    writer.write(conn.send(h11.EndOfMessage()))

    async def next_event():
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            return event

    async def watch_disconnect():
        while (await receive())["type"] != "http.disconnect":
            pass
        writer.close()

    watcher = asyncio.create_task(watch_disconnect())
    started = False
    try:
        await writer.drain()
        event = await next_event()
        while isinstance(event, h11.InformationalResponse):
            event = await next_event()
        if not isinstance(event, h11.Response):
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__}")
        await send({"type": "http.response.start", "status": event.status_code,
                    "headers": [(k, v) for k, v in event.headers if k.lower() not in HOP_BY_HOP - {b"content-length"}]})
        started = True
        while not isinstance(event := await next_event(), h11.EndOfMessage | h11.ConnectionClosed):
            if isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    except (OSError, h11.ProtocolError) as exc:
        if watcher.done():
            return  # the browser left; nothing to answer
        if started:  # mid-stream: all we can do is end the response
            log.warning("%s server connection lost mid-response: %s", upstream.name, exc)
            await send({"type": "http.response.body", "body": b""})
            return
        await _respond(send, *_connect_error(content_type, f"{upstream.name} server failed to answer: {exc}"))
    finally:
        watcher.cancel()
        writer.close()


# ---- the page process ------------------------------------------------------------------------


def label_app(config: LabelConfig, policy: Upstream, trainer: Upstream):
    """The page's origin: Connect paths forwarded, /prompts.txt, and the static page."""
    web = Path(config.web_dir)
    if not (web / "index.html").is_file() or not (web / "app.js").is_file():
        raise FileNotFoundError(f"no built page in {web}: run `make web`")
    static = StaticFiles(directory=web, html=True)
    prompts = Path(config.prompts) if config.prompts else None
    if prompts is not None and not prompts.is_file():
        raise FileNotFoundError(f"--prompts: no file {prompts}")
    upstreams = {POLICY_PATH: policy, TRAINER_PATH: trainer}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        for prefix, upstream in upstreams.items():
            if scope["path"].startswith(prefix):
                return await forward(upstream, scope, receive, send)
        if scope["path"] == "/prompts.txt":  # empty without --prompts: the page then hides "Next prompt"
            await _respond(send, 200, prompts.read_bytes() if prompts else b"", b"text/plain; charset=utf-8")
            return
        try:
            await static(scope, receive, send)
        except HTTPException as exc:  # StaticFiles outside a Starlette app raises its 404/405
            await _respond(send, exc.status_code, f"{exc.detail}\n".encode(), b"text/plain; charset=utf-8")

    return app


async def serve(config: LabelConfig, policy_url: str, trainer_url: str, say) -> None:
    """Serve the page until SIGTERM or SIGINT."""
    from common.connect import HttpServer
    from common.rpc import install_signal_handlers

    app = label_app(config, Upstream.parse("policy", policy_url), Upstream.parse("trainer", trainer_url))
    server = HttpServer(app, config.host, config.port, grace=1.0)
    port = await server.start()
    stop = asyncio.Event()
    install_signal_handlers(stop)
    say(f"labeling page: http://{config.host}:{port}/  (policy {policy_url}, trainer {trainer_url}; Ctrl-C stops)")
    announce("label", config.host, port)  # last: tokenfeedback.launch takes this line as "ready"
    try:
        await stop.wait()
    finally:
        await server.stop()


def run_label(config: LabelConfig, say=print) -> int:
    if bool(config.policy_http) != bool(config.trainer_http):
        raise ValueError("--policy-http and --trainer-http: give both (running servers) or neither (start both)")
    servers: Servers | None = None
    try:
        if config.policy_http:
            policy_url, trainer_url = config.policy_http, config.trainer_http
        else:  # both on the demo defaults, each with a Connect port
            servers = start_servers(config.model, config.data, http=True, timeout=config.startup_timeout, say=say)
            policy_url, trainer_url = servers.policy.connect_url, servers.trainer.connect_url
        asyncio.run(serve(config, policy_url, trainer_url, say))
    except KeyboardInterrupt:
        pass
    finally:
        if servers is not None:
            servers.stop()
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    d = LabelConfig()
    p.add_argument("--host", default=d.host, help=f"address to serve the page on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port,
                   help=f"port of the page (default {d.port}; 0 picks a free one). Unsent annotations are kept "
                        "by the browser per host:port")
    p.add_argument("--policy-http", default=d.policy_http, metavar="URL",
                   help="Connect URL of a running policy server (started with --http-port); "
                        "without it and --trainer-http, both servers are started here")
    p.add_argument("--trainer-http", default=d.trainer_http, metavar="URL",
                   help="Connect URL of a running trainer server (started with --http-port)")
    p.add_argument("--prompts", default=d.prompts, metavar="FILE", help="prompts for 'Next prompt', one per line")
    p.add_argument("--web-dir", default=d.web_dir, help="the built page (default web/dist, `make web`)")
    p.add_argument("--model", default=d.model, help=f"model of the servers started here (default {d.model})")
    p.add_argument("--data", default=d.data, help=f"trainer data folder of the servers started here (default {d.data})")
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout,
                   help="seconds each started server may take to load")


def config_from(args: argparse.Namespace) -> LabelConfig:
    return LabelConfig(host=args.host, port=args.port, policy_http=args.policy_http, trainer_http=args.trainer_http,
                       prompts=args.prompts, web_dir=args.web_dir, model=args.model, data=args.data,
                       startup_timeout=args.startup_timeout)


def _register() -> None:
    """`tokenfeedback label` (cli.py imports this module to find its commands)."""
    from tokenfeedback.cli import command

    @command("label", "serve the labeling page (and start policy + trainer servers unless given)", configure)
    def run(args: argparse.Namespace, ctx) -> int:
        try:
            return run_label(config_from(args), say=ctx.note)
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m tokenfeedback.label`: the same, without the CLI's connection options."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m tokenfeedback.label", description=__doc__.split("\n")[0])
    configure(parser)
    return run_label(config_from(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
else:
    _register()
