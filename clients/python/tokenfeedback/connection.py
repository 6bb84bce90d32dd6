"""One gRPC channel with the client's connection policy: TLS, bearer token, deadlines, retries.

Both clients (policy and trainer) talk through a `Connection`. It owns what every call shares:
- TLS roots (a path or PEM bytes) and optional client certificate, or plaintext;
- a bearer token sent as `authorization: Bearer <token>` on every call, unary and streaming alike
  (a channel interceptor, so calls made on `connection.channel` directly get it too);
- a connect deadline: a connection attempt that gets no answer gives up after `connect_timeout`,
  and a refused connection fails at once, so a bad address is an error within seconds, not a hang;
- per-call deadlines, and retries with exponential backoff on UNAVAILABLE for calls that are
  safe to repeat (the caller says which); never for anything else.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from tokenfeedback.errors import TokenfeedbackError, UnavailableError, from_rpc_error

# HOST:PORT, [IPv6]:PORT, or a gRPC target with a scheme (unix:/path, dns:///host:port).
_ADDRESS = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}$|^(?:unix|unix-abstract|dns|ipv4|ipv6):\S+$")


# UNAVAILABLE details that come from the transport (as opposed to a server saying it is not ready).
_TRANSPORT = re.compile(r"connect|dns|resolv|socket|unreachable|handshake|ssl|tls|refused|reset", re.IGNORECASE)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE on idempotent calls: attempt k (k >= 1 retries done)
    waits min(max_backoff, initial_backoff * multiplier**(k-1)) * (1 +- jitter) first."""

    retries: int = 4  # retries after the first attempt; 0 disables retrying
    initial_backoff: float = 0.1  # seconds before the first retry
    multiplier: float = 2.0  # growth of the wait per retry
    max_backoff: float = 2.0  # cap on one wait, seconds
    jitter: float = 0.2  # the wait is scaled by a random factor in [1 - jitter, 1 + jitter]

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return base * (1.0 + self.jitter * (2.0 * (rng or random).random() - 1.0))


def read_pem(value: str | Path | bytes | None, what: str) -> bytes | None:
    """PEM bytes from bytes or a file path; a clear error when the file is missing or not PEM."""
    if value is None or isinstance(value, bytes):
        return value
    path = Path(value)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what}: {path} is not a PEM file")
    return data


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class Connection:
    """A channel to one server plus the calling conventions (deadline, retries, typed errors)."""

    def __init__(
        self,
        address: str,
        *,
        root_certificates: str | Path | bytes | None = None,
        tls: bool | None = None,
        client_certificate: str | Path | bytes | None = None,
        client_key: str | Path | bytes | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
        connect_timeout: float = 5.0,
        retries: int | RetryPolicy = 4,
        max_message_bytes: int = 64 * 1024 * 1024,
        sleep: Callable[[float], None] = time.sleep,
    ):
        address = address.strip()
        for scheme in ("grpc://", "grpcs://", "http://", "https://"):
            if address.startswith(scheme):
                tls = True if (scheme in ("grpcs://", "https://") and tls is None) else tls
                address = address[len(scheme):].rstrip("/")
        if not _ADDRESS.match(address):
            raise ValueError(f"address: expected HOST:PORT (e.g. 127.0.0.1:50051), got {address!r}")
        if token is not None:
            token = token.strip()
            if not token or any(c in token for c in "\r\n"):
                raise ValueError("token: must be a non-empty single line")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout: must be > 0 seconds or None, got {timeout}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout: must be > 0 seconds, got {connect_timeout}")
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(retries=int(retries))
        self._sleep = sleep
        roots = read_pem(root_certificates, "root_certificates")
        cert = read_pem(client_certificate, "client_certificate")
        key = read_pem(client_key, "client_key")
        if (cert is None) != (key is None):
            raise ValueError("client_certificate and client_key: give both or neither")
        self.tls = bool(tls) or roots is not None or cert is not None
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # The connect deadline: gRPC gives each connection attempt at least this long (its
            # "min reconnect backoff" is also the minimum connect timeout), then fails the calls
            # waiting on it with UNAVAILABLE. A refused connection fails at once.
            ("grpc.min_reconnect_backoff_ms", int(connect_timeout * 1000)),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.enable_retries", 0),  # retries are ours (idempotent calls only)
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if self.tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=cert)
            channel = grpc.secure_channel(address, credentials, options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        self._raw_channel = channel
        # Use `channel` to call RPCs this library does not wrap (e.g. UpdateWeights); it carries the token.
        self.channel = grpc.intercept_channel(channel, _BearerToken(token)) if token else channel

    # ---- calls ---------------------------------------------------------------------------------

    def unary(self, name: str, fn: Callable, request, *, idempotent: bool, timeout: float | None = None):
        """Call a unary RPC. `timeout` (default: the connection's) bounds the whole call, retries
        included; UNAVAILABLE is retried with backoff only when `idempotent`."""
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        retry = 0
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return fn(request, timeout=remaining)
            except grpc.RpcError as exc:
                error = self._error(exc, name, timeout)
            if not self._should_retry(error, idempotent, retry, deadline):
                raise error
            retry += 1
            self._sleep(self.retry.backoff(retry))

    def stream(self, name: str, fn: Callable, request, *, idempotent: bool, timeout: float | None = None) -> Iterator:
        """Call a server-streaming RPC and yield its messages. `timeout` (default none: streams
        run as long as they need) bounds the whole stream. An idempotent stream is retried on
        UNAVAILABLE only before its first message. Closing the iterator cancels the call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        retry = 0
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            call = fn(request, timeout=remaining)
            received = False
            try:
                for message in call:
                    received = True
                    yield message
                return
            except grpc.RpcError as exc:
                error = self._error(exc, name, timeout)
                if received or not self._should_retry(error, idempotent, retry, deadline):
                    raise error from None
            finally:
                call.cancel()  # a no-op once the stream ended; frees the server's slot otherwise
            retry += 1
            self._sleep(self.retry.backoff(retry))

    def _should_retry(self, error: TokenfeedbackError, idempotent: bool, retry: int, deadline: float | None) -> bool:
        if not (idempotent and isinstance(error, UnavailableError) and retry < self.retry.retries):
            return False
        # Give up early when the next wait would run past the deadline anyway.
        wait = min(self.retry.max_backoff, self.retry.initial_backoff * self.retry.multiplier**retry)
        return deadline is None or time.monotonic() + wait < deadline

    def _error(self, exc: grpc.RpcError, name: str, timeout: float | None) -> TokenfeedbackError:
        error = from_rpc_error(exc, method=name, address=self.address)
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None and "Deadline Exceeded" in error.message:
            error = type(error)(f"{error.message} (no answer within the {timeout:g}s deadline)",
                                code=error.code, method=name, address=self.address)
        elif error.code == grpc.StatusCode.UNAVAILABLE and _TRANSPORT.search(error.message):
            error = type(error)(f"cannot reach a server at {self.address}: {error.message}",
                                code=error.code, method=name, address=self.address)
        return error

    # ---- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        self._raw_channel.close()
