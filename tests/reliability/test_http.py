"""The HTTP (Connect) port before a request reaches Connect: content types, sizes, headers, slow
clients, bodies in flight (common/guard.py HttpGuard, common/connect.py HttpServer).

One policy server with a Connect port and the smallest message limit serves the module;
everything goes over raw sockets on loopback, so each test says exactly what was sent. Counts are
small and every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
from contextlib import closing

import pytest

from common.connect import CONNECT_LINE
from tests.reliability.conftest import start_policy, start_trainer

MESSAGE_LIMIT = 5 * 1024 * 1024  # the smallest --max-message-bytes
STATUS = "/tokenfeedback.v1.PolicyService/GetModelInfo"  # unary, no input
GENERATE = "/tokenfeedback.v1.PolicyService/Generate"  # streams its response
TOKENIZE = "/tokenfeedback.v1.PolicyService/Tokenize"  # unary, takes a text of any size


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    server = start_policy(tiny_model_dir, "--http-port", "0", "--max-message-bytes", str(MESSAGE_LIMIT),
                          "--max-new-tokens-limit", "8")
    try:
        yield server
    finally:
        server.stop()


def http_address(server) -> tuple[str, int]:
    for line in list(server.output):
        if match := CONNECT_LINE.search(line):
            host, port = match.group(2).split("//")[1].rsplit(":", 1)
            return host, int(port)
    raise AssertionError(f"no Connect port announced:\n{server.log_tail()}")


def head(method: str, path: str, headers: dict[str, str | bytes]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"host: 127.0.0.1"]
    for name, value in headers.items():
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: content-length framed, chunked, or until the server closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    header, _, rest = data.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def more() -> bool:
        nonlocal rest
        chunk = sock.recv(65536)
        rest += chunk
        return bool(chunk)

    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest and more():
                pass
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            while len(rest) < size + 2 and more():
                pass
            body, rest = body + rest[:size], rest[size + 2:]
            if size == 0:
                return status, headers, body
    length = int(headers.get("content-length", "-1"))
    while (length < 0 or len(rest) < length) and more():
        pass
    return status, headers, rest


def exchange(address, raw: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    with closing(socket.create_connection(address, timeout=timeout)) as sock:
        sock.sendall(raw)
        return read_response(sock)


def new_lines(server, before: int, wait_for: str, timeout: float = 15.0) -> list[str]:
    """The server's output lines after index `before`, once one containing `wait_for` arrived."""
    deadline = time.monotonic() + timeout
    while True:
        lines = list(server.output)[before:]
        if any(wait_for in line for line in lines) or time.monotonic() > deadline:
            time.sleep(0.5)  # let a traceback that would follow the line arrive too
            return list(server.output)[before:]
        time.sleep(0.1)


def test_oversized_content_length_is_refused_before_the_body(policy):
    # A declared body of 1 GB, and not one byte of it sent: the answer comes without reading.
    status, _, body = exchange(http_address(policy), head("POST", TOKENIZE, {
        "content-type": "application/proto", "content-length": str(1 << 30)}))
    assert status == 413
    assert b"1073741824" in body and str(MESSAGE_LIMIT + 5).encode() in body


def test_grpc_content_type_logs_one_line_and_says_where_grpc_is(policy):
    before = len(policy.output)
    assert before < 350, "the output buffer keeps 400 lines; this test counts new ones"
    status, _, body = exchange(http_address(policy), head("POST", STATUS, {
        "content-type": "application/grpc", "content-length": "5", "te": "trailers"}) + b"\x00\x00\x00\x00\x00")
    assert status == 415
    assert b"gRPC port" in body and b"application/json" in body
    lines = new_lines(policy, before, "application/grpc")
    assert sum("application/grpc" in line for line in lines) == 1, lines
    assert not any("Traceback" in line for line in lines), "\n".join(lines)


def test_non_utf8_header_byte_logs_one_line(policy):
    before = len(policy.output)
    assert before < 350
    status, _, body = exchange(http_address(policy), head("POST", STATUS, {
        "content-type": "application/json", "content-length": "2", "x-note": b"caf\xe9 \xff"}) + b"{}")
    assert status == 400
    assert b"x-note" in body
    lines = new_lines(policy, before, "not UTF-8")
    assert sum("not UTF-8" in line for line in lines) == 1, lines
    assert not any("Traceback" in line for line in lines), "\n".join(lines)


def test_415_says_which_content_types_to_use(policy):
    address = http_address(policy)
    # A streaming method posted as plain JSON (what a first curl does): Connect's own bare 415, explained.
    status, headers, body = exchange(address, head("POST", GENERATE, {
        "content-type": "application/json", "content-length": "2"}) + b"{}")
    assert status == 415
    assert b"application/connect+json" in body and b"5-byte envelope" in body
    assert "application/connect+json" in headers.get("accept-post", "")
    # A unary method posted enveloped.
    status, _, body = exchange(address, head("POST", STATUS, {
        "content-type": "application/connect+json", "content-length": "7"}) + b"\x00\x00\x00\x00\x02{}")
    assert status == 415 and b"application/json" in body
    # Something else altogether.
    status, _, body = exchange(address, head("POST", STATUS, {
        "content-type": "text/plain", "content-length": "2"}) + b"{}")
    assert status == 415
    assert all(t in body for t in (b"application/json", b"application/proto", b"application/connect+json"))


def frames_of(body: bytes) -> list[tuple[int, dict]]:
    frames = []
    while body:
        flags, size = body[0], int.from_bytes(body[1:5], "big")
        frames.append((flags, json.loads(body[5:5 + size] or b"{}")))
        body = body[5 + size:]
    return frames


def stream_call(address, path: str, message: dict) -> tuple[int, list[tuple[int, dict]]]:
    """One streaming Connect call in JSON: the request in its 5-byte envelope (flags 0, length
    big-endian), the response split into its frames."""
    data = json.dumps(message).encode()
    envelope = b"\x00" + len(data).to_bytes(4, "big") + data
    status, _, body = exchange(address, head("POST", path, {
        "content-type": "application/connect+json", "content-length": str(len(envelope))}) + envelope, timeout=120)
    return status, frames_of(body) if status == 200 else []


def test_the_envelope_the_415_describes_works(policy):
    status, frames = stream_call(http_address(policy), GENERATE, {
        "promptText": "Ottawa is the capital of", "params": {"maxNewTokens": 2, "seed": 1}})
    assert status == 200
    kinds = [next(iter(message)) if message else "" for _, message in frames]
    assert kinds == ["start", "token", "token", "end", ""], frames
    assert [flags for flags, _ in frames] == [0, 0, 0, 0, 2], "the last frame is marked end-of-stream"


def test_unknown_json_field_is_invalid_argument_naming_it(policy):
    address = http_address(policy)
    # Streaming: the misspelled prompt field ends the stream with the error (it was "empty prompt").
    status, frames = stream_call(address, GENERATE, {"promptTxt": "Ottawa is", "params": {"maxNewTokens": 2}})
    assert status == 200 and frames[-1][0] == 2
    error = frames[-1][1]["error"]
    assert error["code"] == "invalid_argument" and "promptTxt" in error["message"], error
    # Unary: the same as an HTTP 400.
    body = json.dumps({"txt": "Ottawa"}).encode()
    status, _, answer = exchange(address, head("POST", TOKENIZE, {
        "content-type": "application/json", "content-length": str(len(body))}) + body)
    error = json.loads(answer)
    assert status == 400 and error["code"] == "invalid_argument" and "txt" in error["message"], error


def test_slow_request_headers_are_timed_out(policy):
    # Five connections that send half a request line and stop: each is answered 408 and closed
    # by the server (the default header timeout is 10 s; the socket waits at most 40 s).
    address = http_address(policy)
    before = len(policy.output)
    socks = [socket.create_connection(address, timeout=40) for _ in range(5)]
    try:
        for sock in socks:
            sock.sendall(b"POST " + STATUS.encode() + b" HTTP/1.1\r\nhost: 127.0")
        for sock in socks:
            status, _, _ = read_response(sock)
            assert status == 408
            assert sock.recv(1) == b"", "closed after the 408"
    finally:
        for sock in socks:
            sock.close()
    lines = new_lines(policy, before, "request headers not complete")
    assert sum("request headers not complete" in line for line in lines) == 5, lines
    # A request sent at once is unaffected.
    status, _, _ = exchange(address, head("POST", STATUS, {"content-type": "application/json",
                                                            "content-length": "2"}) + b"{}")
    assert status == 200


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_concurrent_large_uploads_hold_a_bounded_amount(policy):
    # Sixteen clients each start a body just under the message limit and send part of it: four
    # bodies' worth is admitted (the budget is four messages), the other twelve get 503 with
    # Retry-After at once, unread, each with one log line.
    address = http_address(policy)
    size = MESSAGE_LIMIT - 1024
    rss_before = rss_bytes(policy.proc.pid)
    before = len(policy.output)
    assert before < 350
    socks = [socket.create_connection(address, timeout=30) for _ in range(16)]
    try:
        for sock in socks:
            sock.sendall(head("POST", TOKENIZE, {"content-type": "application/proto", "content-length": str(size)})
                         + b"\xff" * 65536)
        deadline = time.monotonic() + 60
        while sum("bytes in flight" in line for line in list(policy.output)[before:]) < 12:
            assert time.monotonic() < deadline, policy.log_tail(20)
            time.sleep(0.2)
        refused = admitted = 0
        for sock in socks:
            sock.settimeout(5.0)
            try:
                status, headers, _ = read_response(sock)
            except TimeoutError:  # still waiting for the rest of its body: admitted
                admitted += 1
                continue
            assert status == 503 and headers.get("retry-after") == "1", status
            refused += 1
        assert (admitted, refused) == (4, 12)
    finally:
        for sock in socks:
            sock.close()
    # Full-size bodies, sixteen at once from threads: whatever is admitted is answered (garbage:
    # INVALID_ARGUMENT), and the process does not keep what they held.
    garbage = b"\xff" * size

    def upload(_):
        try:
            status, _, _ = exchange(address, head("POST", TOKENIZE, {
                "content-type": "application/proto", "content-length": str(size)}) + garbage, timeout=60)
            return status
        except OSError:  # refused with 503 before the whole body went out: the server closed on us
            return 503

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(upload, range(16)))
    assert set(statuses) <= {400, 503}, statuses
    time.sleep(1.0)
    grown = rss_bytes(policy.proc.pid) - rss_before
    assert grown < 200 * 1024 * 1024, f"resident memory grew by {grown / 1e6:.0f} MB after 16 uploads"
    status, _, _ = exchange(address, head("POST", STATUS, {"content-type": "application/json",
                                                           "content-length": "2"}) + b"{}")
    assert status == 200, "the budget is free again"


def test_the_trainer_connect_port_has_the_same_guard(tiny_model_dir, tmp_path):
    # The trainer's HTTP port: the same strict JSON and early 413, at its own --max-message-bytes.
    trainer = start_trainer(tiny_model_dir, tmp_path / "trainer", "--http-port", "0",
                            "--max-message-bytes", str(MESSAGE_LIMIT))
    try:
        address = http_address(trainer)
        body = json.dumps({"annotationIdd": "x"}).encode()
        status, _, answer = exchange(address, head("POST", "/tokenfeedback.v1.TrainerService/GetAnnotation", {
            "content-type": "application/json", "content-length": str(len(body))}) + body)
        error = json.loads(answer)
        assert status == 400 and error["code"] == "invalid_argument" and "annotationIdd" in error["message"], error
        status, _, answer = exchange(address, head("POST", "/tokenfeedback.v1.TrainerService/SubmitAnnotations", {
            "content-type": "application/proto", "content-length": str(MESSAGE_LIMIT + 1000)}))
        assert status == 413 and str(MESSAGE_LIMIT).encode() in answer
    finally:
        trainer.stop()
