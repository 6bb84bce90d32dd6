"""The Connect endpoints next to the gRPC ports, and the label process forwarding to them, spoken
to in Connect's JSON mode (what curl users get): same messages as gRPC, same error codes and
field-naming messages, streams arrive as envelopes, an unreachable server is `unavailable`."""

from __future__ import annotations

import http.client
import json
import struct
from urllib.parse import urlsplit

import grpc
import pytest
from google.protobuf import json_format

import tokenfeedback.v1.policy_pb2 as policy_pb2
import tokenfeedback.v1.policy_pb2_grpc as policy_grpc
from tests.web.conftest import connect_url, free_port


def call(base: str, method: str, body: dict, stream: bool = False) -> tuple[int, object]:
    """POST one Connect JSON request. Unary: (HTTP status, JSON body). Streaming: (status, (the
    messages' JSON, the end-of-stream JSON))."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    data = json.dumps(body).encode()
    if stream:
        data = struct.pack(">BI", 0, len(data)) + data
    conn.request("POST", f"/tokenfeedback.v1.{method}", data,
                 {"content-type": "application/connect+json" if stream else "application/json"})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    if not stream:
        return response.status, json.loads(raw)
    messages, end, at = [], None, 0
    while at < len(raw):
        flags, size = struct.unpack(">BI", raw[at:at + 5])
        assert end is None, "data after the end-of-stream message"
        payload = json.loads(raw[at + 5:at + 5 + size])
        if flags & 2:
            end = payload
        else:
            messages.append(payload)
        at += 5 + size
    assert end is not None, "no end-of-stream message"
    return response.status, (messages, end)


@pytest.fixture
def label_url(trainer, start_label):
    return trainer, start_label(connect_url(trainer))[1]


@pytest.mark.parametrize("via", ["server", "label"])
def test_same_messages_as_grpc(policy, label_url, via):
    base = connect_url(policy) if via == "server" else label_url[1]
    status, info = call(base, "PolicyService/GetModelInfo", {})
    assert status == 200
    with grpc.insecure_channel(policy.address) as channel:
        expected = policy_grpc.PolicyServiceStub(channel).GetModelInfo(policy_pb2.GetModelInfoRequest())
    assert json_format.ParseDict(info, policy_pb2.ModelInfo()) == expected


@pytest.mark.parametrize("via", ["server", "label"])
def test_errors_keep_code_and_field(policy, label_url, via):
    trainer, url = label_url
    policy_base = connect_url(policy) if via == "server" else url
    trainer_base = connect_url(trainer) if via == "server" else url
    status, (messages, end) = call(policy_base, "PolicyService/Generate",
                                   {"prompt_text": "Paris", "params": {"top_p": 1.5}}, stream=True)
    assert status == 200 and messages == [] and end["error"]["code"] == "invalid_argument"
    assert "params.top_p" in end["error"]["message"]
    status, error = call(trainer_base, "TrainerService/GetAnnotation", {"annotation_id": "no-such-id"})
    assert (status, error["code"]) == (404, "not_found")
    # The server keeps serving after bad input.
    assert call(trainer_base, "TrainerService/GetStatus", {})[0] == 200


def test_generate_streams_events_through_label(label_url):
    _, url = label_url
    status, (messages, end) = call(url, "PolicyService/Generate", {
        "prompt_text": "Ottawa is", "params": {"max_new_tokens": 6, "seed": "4", "num_alternatives": 3,
                                               "stop_on_eos": False}}, stream=True)
    assert status == 200 and "error" not in end
    assert [next(iter(m)) for m in messages] == ["start"] + ["token"] * 6 + ["end"]
    assert [m["token"].get("position", 0) for m in messages[1:7]] == list(range(6))
    assert all(len(m["token"]["alternatives"]) == 3 for m in messages[1:7])


def test_unreachable_server_is_unavailable_through_label(start_label):
    _, url = start_label(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    status, error = call(url, "TrainerService/GetStatus", {})
    assert (status, error["code"]) == (503, "unavailable") and "trainer server" in error["message"]
    status, (messages, end) = call(url, "TrainerService/Train", {"steps": 1}, stream=True)
    assert status == 200 and messages == [] and end["error"]["code"] == "unavailable"


def test_label_serves_page_and_prompts(trainer, start_label, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Paris is\nTokyo is\n", encoding="utf-8")
    _, url = start_label(connect_url(trainer), "--prompts", str(prompts))
    parts = urlsplit(url)

    def get(path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, body

    status, page = get("/")
    assert status == 200 and b'<script type="module" src="app.js">' in page
    assert get("/app.js")[0] == 200 and get("/style.css")[0] == 200
    assert get("/prompts.txt") == (200, prompts.read_bytes())
    assert get("/no-such-file")[0] == 404
