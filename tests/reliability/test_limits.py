"""Deliberate limits against real servers: concurrent streams (RESOURCE_EXHAUSTED beyond, counted
across gRPC and Connect), deadlines (a stream past its deadline stops generating), clients that
vanish mid-stream (their slot is freed), message, prompt, text and weight-update sizes, and the
trainer's per-request limits. Every refusal names the field or flag, and the server keeps serving.

The policy server is the session's `secured` one (TLS, client certificates, tokens, and the limits
in SECURED_POLICY_LIMITS): limits hold behind auth, for an annotator like anyone else.
"""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

import tokenfeedback.v1.policy_pb2 as ppb
import tokenfeedback.v1.policy_pb2_grpc as ppb_grpc
import tokenfeedback.v1.trainer_pb2 as tpb
import tokenfeedback.v1.trainer_pb2_grpc as tpb_grpc
from common.connect import CONNECT_LINE
from common.tls import channel_credentials
from tests.conftest import ROOT
from tests.reliability.conftest import ADMIN_TOKEN, ANNOTATOR_TOKEN, metadata

LONG = ppb.SamplingParams(max_new_tokens=1000, seed=3, stop_on_eos=False, num_alternatives=20)


@pytest.fixture(scope="module")
def limited(secured, certs):
    """(policy server, stub): mutual TLS, and the annotator token on every call."""
    credentials = grpc.composite_channel_credentials(
        channel_credentials(certs.ca, certs.client_cert, certs.client_key),
        grpc.access_token_call_credentials(ANNOTATOR_TOKEN))
    with grpc.secure_channel(secured.policy.address, credentials) as channel:
        yield secured.policy, ppb_grpc.PolicyServiceStub(channel)


def https_context(certs) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


def cancelled_after(server, generation_id: str, timeout: float = 15.0) -> int:
    """Tokens a generation had when the engine dropped it (from the server's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(rf"generation {generation_id} cancelled after (\d+) tokens", server.log_tail(400))
        if match:
            return int(match.group(1))
        time.sleep(0.05)
    raise AssertionError(f"generation {generation_id} was never cancelled:\n{server.log_tail()}")


def open_stream(stub, prompt: str = "Paris", timeout: float = 120):
    """A long stream that has started (its first event read); returns (call, generation id)."""
    call = stub.Generate(ppb.GenerateRequest(prompt_text=prompt, params=LONG), timeout=timeout)
    return call, next(call).start.generation_id


def exhausted(stub) -> grpc.RpcError | None:
    """The error a new stream gets now (None when it is admitted: it is cancelled at once)."""
    call = stub.Generate(ppb.GenerateRequest(prompt_text="Tokyo", params=LONG), timeout=60)
    try:
        next(call)
    except grpc.RpcError as err:
        return err
    call.cancel()
    return None


def wait_admitted(stub, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (err := exhausted(stub)) is not None:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert time.monotonic() < deadline, "no stream slot came free"
        time.sleep(0.1)


def test_streams_beyond_the_limit_are_refused_until_one_ends(limited, certs):
    server, stub = limited
    wait_admitted(stub)
    calls = [open_stream(stub, p) for p in ("Paris", "Ottawa")]
    err = exhausted(stub)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "Generate" in err.details() and "--max-streams" in err.details()
    # the Connect port counts against the same slots
    url = next(m.group(2) for line in server.output if (m := CONNECT_LINE.search(line)))
    with urllib.request.urlopen(connect_generate(url, b'{"promptText":"Rome"}'), timeout=30,
                                context=https_context(certs)) as reply:
        assert b"resource_exhausted" in reply.read()
    calls[0][0].cancel()
    cancelled_after(server, calls[0][1])
    wait_admitted(stub)  # the cancelled stream's slot is free again
    calls[1][0].cancel()


def connect_generate(url: str, body: bytes) -> urllib.request.Request:
    """A Connect streaming Generate request (one enveloped JSON message)."""
    return urllib.request.Request(url + "/tokenfeedback.v1.PolicyService/Generate",
                                  data=len(body).to_bytes(5, "big") + body,
                                  headers={"content-type": "application/connect+json",
                                           "authorization": f"Bearer {ANNOTATOR_TOKEN}"}, method="POST")


def test_a_stream_past_its_deadline_stops_generating(limited):
    server, stub = limited
    wait_admitted(stub)
    call, generation_id = open_stream(stub, timeout=1.0)
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancelled_after(server, generation_id) < 1000  # the engine dropped it: no tokens for nobody
    wait_admitted(stub)


CLIENT = """
import sys, grpc
from common.tls import channel_credentials
import tokenfeedback.v1.policy_pb2 as pb, tokenfeedback.v1.policy_pb2_grpc as pbg
address, ca, cert, key, token = sys.argv[1:]
credentials = grpc.composite_channel_credentials(channel_credentials(ca, cert, key),
                                                 grpc.access_token_call_credentials(token))
stub = pbg.PolicyServiceStub(grpc.secure_channel(address, credentials))
params = pb.SamplingParams(max_new_tokens=1000, seed=4, stop_on_eos=False, num_alternatives=20)
for event in stub.Generate(pb.GenerateRequest(prompt_text="Berlin", params=params)):
    if event.HasField("start"):
        print(event.start.generation_id, flush=True)
"""


def test_a_client_that_vanishes_mid_stream_frees_its_slot(limited, certs):
    """SIGKILL a client process while it reads a stream: the server cancels the generation and
    the slot counts as free again, while another client's stream goes on undisturbed."""
    server, stub = limited
    wait_admitted(stub)
    other, _ = open_stream(stub, "Ottawa")
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.address, str(certs.ca), str(certs.client_cert),
                               str(certs.client_key), ANNOTATOR_TOKEN], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        generation_id = client.stdout.readline().strip()
        assert generation_id, "the client got no stream"
        assert exhausted(stub).code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # both slots taken
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    finally:
        client.kill()
        client.wait()
    assert cancelled_after(server, generation_id) < 1000
    wait_admitted(stub)
    events = list(other)  # the other stream is whole
    assert sum(e.HasField("token") for e in events) == 1000 and events[-1].end.completion_tokens == 1000


def test_size_limits_name_the_field_and_flag(limited):
    server, stub = limited
    cases = [
        (stub.Score, ppb.ScoreRequest(prompt_token_ids=list(range(17)), completion_token_ids=[1]),
         r"prompt_token_ids: 17 tokens; the server's limit is 16 \(--max-prompt-tokens\)"),
        (stub.Score, ppb.ScoreRequest(prompt_text="Paris is the capital of France. " * 4, completion_text=" x"),
         r"prompt_text: \d\d tokens; the server's limit is 16 \(--max-prompt-tokens\)"),
        (stub.Tokenize, ppb.TokenizeRequest(text="a" * 201), "text: 201 characters; the server's limit is 200"),
        (stub.Score, ppb.ScoreRequest(prompt_text="Paris", completion_text="b" * 201), "completion_text: 201 characters"),
        (stub.Tokenize, ppb.TokenizeRequest(token_ids=[1] * 1025), r"token_ids: 1025 entries"),
    ]
    for method, request, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            method(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert re.match(message, err.value.details()), err.value.details()
    generate = stub.Generate(ppb.GenerateRequest(prompt_token_ids=list(range(17))), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        list(generate)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-prompt-tokens" in err.value.details()
    # a message above --max-message-bytes is refused by the transport
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(ppb.TokenizeRequest(text="x" * (6 * 1024 * 1024)), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    assert stub.GetModelInfo(ppb.GetModelInfoRequest(), timeout=30).dtype  # still serving


def test_weight_update_size_is_checked_at_its_header(fuzz_servers):
    """--max-update-bytes 1000 on the fuzz policy server: a larger declared update is refused."""
    stub = ppb_grpc.PolicyServiceStub(fuzz_servers.policy_channel)
    header = ppb.WeightUpdateMessage(header=ppb.WeightUpdateHeader(target_version=1, tensor_count=1, total_bytes=1001))
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateWeights(iter([header]), metadata=metadata(ADMIN_TOKEN), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("header.total_bytes: 1001 bytes; the server's limit is 1000 (--max-update-bytes)")


def test_one_weight_update_at_a_time(limited, secured):
    """--max-updates 1: a second update while one is open is refused; the first goes on. (The
    slot is checked after the admin role: an annotator is refused before it counts.)"""
    _, annotator_stub = limited
    stub = ppb_grpc.PolicyServiceStub(secured.policy_channel)
    md = metadata(ADMIN_TOKEN)
    release = threading.Event()
    result: dict = {}

    def held_update():  # an update call that is open but sends nothing yet (whatever version the server holds)
        release.wait(30)
        yield from ()

    def run():
        try:
            stub.UpdateWeights(held_update(), metadata=md, timeout=60)
        except grpc.RpcError as err:
            result["first"] = err

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:  # the first update's slot is taken once its call reached the server
            try:
                stub.UpdateWeights(iter([]), metadata=md, timeout=30)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "UpdateWeights" in err.details()
                    break
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and time.monotonic() < deadline, err
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as err:
            annotator_stub.UpdateWeights(iter([]), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        release.set()
        thread.join(60)
    assert result["first"].code() == grpc.StatusCode.INVALID_ARGUMENT  # it ended without a header
    assert result["first"].details().startswith("header: the update stream ended before a header")
    with pytest.raises(grpc.RpcError) as err:  # the slot is free again
        stub.UpdateWeights(iter([]), metadata=md, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_trainer_request_limits(fuzz_servers):
    """--max-batch-sequences 8 and --max-seq-len 64 bound every list and text of a request."""
    stub = tpb_grpc.TrainerServiceStub(fuzz_servers.trainer_channel)
    md = metadata(ANNOTATOR_TOKEN)
    before = stub.GetStatus(tpb.GetStatusRequest(), metadata=md, timeout=30)

    def seq(i: int, **fields) -> tpb.AnnotatedSequence:
        base = dict(annotation_id=f"limit-{i}", prompt_token_ids=[1, 2], completion_token_ids=[3, 4],
                    token_labels=[tpb.TokenLabel(position=0, weight=1)])
        return tpb.AnnotatedSequence(**{**base, **fields})

    cases = [
        (stub.SubmitAnnotations, tpb.SubmitAnnotationsRequest(sequences=[seq(i) for i in range(9)]),
         "sequences: must hold 1..8 sequences, got 9"),
        (stub.SubmitAnnotations, tpb.SubmitAnnotationsRequest(sequences=[seq(0, token_labels=[
            tpb.TokenLabel(position=0, weight=1)] * 65)]), "sequences[0] (annotation_id='limit-0').token_labels: 65 long"),
        (stub.SubmitAnnotations, tpb.SubmitAnnotationsRequest(sequences=[seq(0, completion_token_ids=[],
                                                                             completion_text="z" * 4097)]),
         "sequences[0] (annotation_id='limit-0').completion_text: 4097 long; at most 4096"),
        (stub.SubmitAnnotations, tpb.SubmitAnnotationsRequest(sequences=[seq(0, prompt_token_ids=[1] * 65)]),
         "sequences[0] (annotation_id='limit-0').prompt_token_ids: 65 long"),
        (stub.WithdrawAnnotations, tpb.WithdrawAnnotationsRequest(annotation_ids=[f"x{i}" for i in range(9)]),
         "annotation_ids: at most 8 ids per call"),
    ]
    for method, request, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            method(request, metadata=md, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert err.value.details().startswith(message), err.value.details()
    after = stub.GetStatus(tpb.GetStatusRequest(), metadata=md, timeout=30)
    assert (after.annotations_total, after.annotations_withdrawn) == (before.annotations_total,
                                                                      before.annotations_withdrawn)


def test_connect_reply_for_refused_stream_is_readable(limited, certs):
    """Sanity of the helper above: with slots free, the same Connect request streams tokens."""
    server, stub = limited
    wait_admitted(stub)
    url = next(m.group(2) for line in server.output if (m := CONNECT_LINE.search(line)))
    request = connect_generate(url, b'{"promptText":"Rome","params":{"maxNewTokens":2}}')
    try:
        with urllib.request.urlopen(request, timeout=30, context=https_context(certs)) as reply:
            text = reply.read()
    except urllib.error.HTTPError as exc:
        raise AssertionError(exc.read()) from None
    assert b'"token"' in text and b"resource_exhausted" not in text


def test_a_train_call_past_its_deadline_stops_training(fuzz_servers):
    """Train runs in a worker thread; when its caller's deadline passes, the run stops after the
    step in progress (it does not train on for the 10 000 steps asked)."""
    stub = tpb_grpc.TrainerServiceStub(fuzz_servers.trainer_channel)
    md = metadata(ADMIN_TOKEN)
    stub.SubmitAnnotations(tpb.SubmitAnnotationsRequest(sequences=[tpb.AnnotatedSequence(
        annotation_id=f"deadline-{i}", prompt_token_ids=[1, 2], completion_token_ids=[3, 4, 5],
        token_labels=[tpb.TokenLabel(position=1, weight=-1)]) for i in range(4)]), metadata=md, timeout=30)
    start = stub.GetStatus(tpb.GetStatusRequest(), metadata=md, timeout=30).step
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.Train(tpb.TrainRequest(steps=10_000, publish=False), metadata=md, timeout=1.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def status():
        return stub.GetStatus(tpb.GetStatusRequest(), metadata=md, timeout=30)

    deadline = time.monotonic() + 30
    while status().training:
        assert time.monotonic() < deadline, "training went on after its caller's deadline"
        time.sleep(0.1)
    stopped = status().step
    time.sleep(1.0)
    assert status().step == stopped and start < stopped < start + 10_000
