"""Connection policy of the Python client: bearer token, TLS, retries with backoff, typed errors,
deadlines, bad addresses, stream cancellation.

These are unit tests of the client's own logic, so the server is an in-process gRPC fake whose
answers each test scripts (status codes the real servers only give in rare situations, such as
UNAVAILABLE twice in a row). The real servers are exercised in test_pyclient_integration.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest

import tokenfeedback.v1.policy_pb2 as policy_pb2
import tokenfeedback.v1.policy_pb2_grpc as policy_pb2_grpc
import tokenfeedback.v1.trainer_pb2 as trainer_pb2
import tokenfeedback.v1.trainer_pb2_grpc as trainer_pb2_grpc
from tokenfeedback import (
    DeadlineExceededError,
    InvalidArgumentError,
    PolicyClient,
    RetryPolicy,
    TokenfeedbackError,
    TrainerClient,
    UnavailableError,
)
from tokenfeedback.errors import ERRORS, error_for


class Script:
    """What the fake answers: a queue of status codes (None = succeed), the metadata seen."""

    def __init__(self):
        self.failures: list[grpc.StatusCode | None] = []
        self.message = "scripted failure"
        self.calls: list[str] = []
        self.metadata: list[dict[str, str]] = []
        self.delay = 0.0
        self.stream_cancelled = threading.Event()
        self.fail_after_first_event: grpc.StatusCode | None = None

    def enter(self, name, context):
        self.calls.append(name)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.delay:
            time.sleep(self.delay)
        code = self.failures.pop(0) if self.failures else None
        if code is not None:
            context.abort(code, self.message)


class FakePolicy(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, script: Script):
        self.script = script

    def GetModelInfo(self, request, context):
        self.script.enter("GetModelInfo", context)
        return policy_pb2.ModelInfo(model_name="fake", vocab_size=10)

    def Tokenize(self, request, context):
        self.script.enter("Tokenize", context)
        return policy_pb2.TokenizeResponse(text=request.text)

    def Generate(self, request, context):
        self.script.enter("Generate", context)
        finished = []  # the RPC ending before the last event means the client cancelled it
        context.add_callback(lambda: None if finished else self.script.stream_cancelled.set())
        yield policy_pb2.GenerateEvent(start=policy_pb2.GenerationStart(generation_id="g", prompt_token_ids=[1]))
        if self.script.fail_after_first_event is not None:
            context.abort(self.script.fail_after_first_event, "broke mid-stream")
        n = request.params.max_new_tokens or 3
        text = ""
        for i in range(n):
            text += f" t{i}"
            yield policy_pb2.GenerateEvent(token=policy_pb2.TokenEvent(
                position=i, token_id=i, text=f" t{i}", logprob=-0.5 * i, model_version=2))
            time.sleep(self.script.delay)
        finished.append(True)
        yield policy_pb2.GenerateEvent(end=policy_pb2.GenerationEnd(
            finish_reason=policy_pb2.FINISH_REASON_LENGTH, completion_text=text, completion_tokens=n, model_version=2))


class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, script: Script):
        self.script = script

    def Train(self, request, context):
        self.script.enter("Train", context)
        yield trainer_pb2.TrainProgress(step=1, total_steps=1, done=True)

    def SubmitAnnotations(self, request, context):
        self.script.enter("SubmitAnnotations", context)
        return trainer_pb2.SubmitAnnotationsResponse(results=[
            trainer_pb2.SubmitResult(annotation_id=s.annotation_id, status=trainer_pb2.SUBMIT_STATUS_ACCEPTED)
            for s in request.sequences])

    def GetStatus(self, request, context):
        self.script.enter("GetStatus", context)
        return trainer_pb2.TrainerStatus(model_version=4)


def serve(script: Script, credentials=None):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(FakePolicy(script), server)
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(FakeTrainer(script), server)
    port = server.add_secure_port("127.0.0.1:0", credentials) if credentials else server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def fake():
    script = Script()
    server, address = serve(script)
    yield script, address
    server.stop(0)


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def client(cls, address, **options):
    c = cls(address, **options)
    c.connection._sleep = sleeps = Sleeps()
    return c, sleeps


# ---- token -----------------------------------------------------------------------------------


def test_bearer_token_on_unary_and_streaming_calls(fake):
    script, address = fake
    with PolicyClient(address, token="s3cret") as policy, TrainerClient(address, token="s3cret") as trainer:
        policy.model_info()
        policy.complete("x", max_new_tokens=2)
        list(trainer.train(steps=1))
    assert script.calls == ["GetModelInfo", "Generate", "Train"]
    assert all(m.get("authorization") == "Bearer s3cret" for m in script.metadata)


def test_no_token_no_header(fake):
    script, address = fake
    PolicyClient(address).model_info()
    assert "authorization" not in script.metadata[0]


@pytest.mark.parametrize("token", ["", "  ", "a\nb"])
def test_malformed_token_is_refused_before_any_call(token):
    with pytest.raises(ValueError, match="token"):
        PolicyClient("127.0.0.1:1", token=token)


# ---- retries ---------------------------------------------------------------------------------


def test_unavailable_is_retried_with_growing_backoff_for_idempotent_calls(fake):
    script, address = fake
    script.failures = [grpc.StatusCode.UNAVAILABLE] * 3
    policy, sleeps = client(PolicyClient, address, retries=RetryPolicy(retries=4, jitter=0.0))
    assert policy.model_info().model_name == "fake"
    assert script.calls == ["GetModelInfo"] * 4
    assert sleeps == pytest.approx([0.1, 0.2, 0.4])


def test_retries_run_out(fake):
    script, address = fake
    script.failures = [grpc.StatusCode.UNAVAILABLE] * 10
    trainer, sleeps = client(TrainerClient, address, retries=2)
    with pytest.raises(UnavailableError) as info:
        trainer.status()
    assert len(script.calls) == 3 and len(sleeps) == 2
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "scripted failure" in str(info.value)


def test_submit_is_retried_train_is_not(fake):
    script, address = fake
    trainer, _ = client(TrainerClient, address)
    script.failures = [grpc.StatusCode.UNAVAILABLE]
    [result] = trainer.submit([{"annotationId": "a", "promptText": "p", "completionText": " c"}])
    assert result.status == trainer_pb2.SUBMIT_STATUS_ACCEPTED and script.calls == ["SubmitAnnotations"] * 2
    script.calls.clear()
    script.failures = [grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(UnavailableError):
        list(trainer.train(steps=1))
    assert script.calls == ["Train"]


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_other_codes_are_not_retried(fake, code):
    script, address = fake
    script.failures = [code]
    policy, sleeps = client(PolicyClient, address)
    with pytest.raises(TokenfeedbackError):
        policy.model_info()
    assert script.calls == ["GetModelInfo"] and sleeps == []


def test_generate_is_retried_before_its_first_event_only(fake):
    script, address = fake
    policy, _ = client(PolicyClient, address)
    script.failures = [grpc.StatusCode.UNAVAILABLE]
    assert policy.complete("x", max_new_tokens=2).text == " t0 t1"
    assert script.calls == ["Generate", "Generate"]
    script.calls.clear()
    script.fail_after_first_event = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(UnavailableError, match="broke mid-stream"):
        policy.complete("x")
    assert script.calls == ["Generate"]


def test_retry_policy_backoff():
    policy = RetryPolicy(initial_backoff=0.1, multiplier=2.0, max_backoff=0.5, jitter=0.0)
    assert [policy.backoff(k) for k in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    jittered = [RetryPolicy(jitter=0.2).backoff(1) for _ in range(200)]
    assert min(jittered) >= 0.08 and max(jittered) <= 0.12 and len(set(jittered)) > 1


# ---- typed errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(ERRORS, key=lambda c: c.name), ids=lambda c: c.name)
def test_every_status_code_has_its_error_class(fake, code):
    script, address = fake
    script.failures = [code]
    script.message = "params.top_p: must be in (0, 1], got 1.5"
    policy, _ = client(PolicyClient, address, retries=0)
    with pytest.raises(ERRORS[code]) as info:
        policy.tokenize("x")
    error = info.value
    assert error.code == code and error.code_name == code.name
    assert error.message == script.message  # a server's UNAVAILABLE keeps its words
    assert error.field == "params.top_p"
    assert error.method == "tokenfeedback.v1.PolicyService/Tokenize" and error.address == address


def test_field_parsing_of_trainer_messages():
    error = error_for(grpc.StatusCode.INVALID_ARGUMENT,
                      "sequences[2] (annotation_id='a: b').token_labels[0].position: must be in [0, 4), got 9")
    assert isinstance(error, InvalidArgumentError) and isinstance(error, ValueError)
    assert error.field == "sequences[2] (annotation_id='a: b').token_labels[0].position"
    assert error_for(grpc.StatusCode.INTERNAL, "internal error in X").field is None


# ---- deadlines and addresses -----------------------------------------------------------------


def test_deadline_exceeded_is_typed_and_prompt(fake):
    script, address = fake
    script.delay = 2.0
    policy = PolicyClient(address, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="0.3s deadline"):
        policy.model_info()
    assert time.monotonic() - started < 1.5
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        policy.complete("x", timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_refused_connection_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = PolicyClient(f"127.0.0.1:{port}", timeout=30)
    started = time.monotonic()
    with pytest.raises(UnavailableError, match=f"cannot reach a server at 127.0.0.1:{port}"):
        policy.model_info()
    with pytest.raises(UnavailableError):
        list(policy.generate("x"))
    assert time.monotonic() - started < 10  # retries with backoff, never the 30 s deadline


def test_silent_server_hits_the_connect_deadline():
    """A port that accepts TCP but never speaks HTTP/2 (a wrong service, a hung proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        address = f"127.0.0.1:{s.getsockname()[1]}"
        policy = PolicyClient(address, timeout=None, connect_timeout=1.0, retries=1)
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            policy.model_info()
        with pytest.raises(UnavailableError):
            list(policy.generate("x"))  # streams have no deadline by default: the connect deadline bounds them
        assert time.monotonic() - started < 15


@pytest.mark.parametrize("address", ["", "localhost", "host:port", "http://", "a b:1", ":50051"])
def test_malformed_addresses(address):
    with pytest.raises(ValueError, match="address"):
        PolicyClient(address)


@pytest.mark.parametrize("address", ["localhost:1", "[::1]:50051", "grpc://127.0.0.1:50051", "unix:/tmp/x.sock"])
def test_accepted_addresses(address):
    PolicyClient(address).close()


# ---- streams ---------------------------------------------------------------------------------


def test_generation_collects_start_tokens_end(fake):
    _, address = fake
    policy = PolicyClient(address)
    generation = policy.generate([1, 2], max_new_tokens=3, temperature=0.0, stop=".")
    seen = [t.text for t in generation]
    done = generation.result()
    assert seen == [" t0", " t1", " t2"] and done.text == " t0 t1 t2"
    assert done.generation_id == "g" and done.prompt_token_ids == [1] and done.model_version == 2
    assert done.finish_reason == "length" and done.token_ids == [0, 1, 2]
    sequence = done.annotate(token_labels=[{"position": 1, "weight": -1, "replacementTokenId": 7}])
    assert sequence.annotation_id == "g" and list(sequence.completion_token_ids) == [0, 1, 2]
    assert sequence.token_labels[0].replacement_token_id == 7 and len(sequence.behavior_logprobs) == 3


def test_leaving_a_generation_cancels_the_stream(fake):
    script, address = fake
    script.delay = 0.05
    policy = PolicyClient(address)
    with policy.generate("x", max_new_tokens=200) as generation:
        next(generation)
    assert script.stream_cancelled.wait(5), "the server kept generating after the client left"


def test_sampling_options_are_checked():
    policy = PolicyClient("127.0.0.1:1")
    with pytest.raises(TypeError, match="unknown sampling option"):
        policy.generate("x", temprature=0.5)
    with pytest.raises(TypeError, match="unknown train override"):
        TrainerClient("127.0.0.1:1").train(lr=0.1)
    with pytest.raises(ValueError, match=r"sequences\[1\]: not a valid AnnotatedSequence"):
        TrainerClient("127.0.0.1:1").submit([{"annotationId": "a"}, {"nope": 1}])


# ---- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
        check=True, capture_output=True,
    )
    return folder / "cert.pem", folder / "key.pem"


def test_tls_with_root_certificate_path_and_bytes(certificate):
    cert, key = certificate
    script = Script()
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, address = serve(script, credentials)
    try:
        assert PolicyClient(address, root_certificates=cert, token="t").model_info().model_name == "fake"
        assert PolicyClient(address, root_certificates=cert.read_bytes()).complete("x").text == " t0 t1 t2"
        assert script.metadata[0]["authorization"] == "Bearer t"
        with pytest.raises(UnavailableError):  # plaintext against a TLS port
            PolicyClient(address, retries=0, timeout=5).model_info()
    finally:
        server.stop(0)


def test_tls_with_the_wrong_root_fails_clearly(certificate, tmp_path):
    cert, key = certificate
    other = tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(tmp_path / "k.pem"), "-out", str(other)], check=True, capture_output=True)
    server, address = serve(Script(), grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    try:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            PolicyClient(address, root_certificates=other, retries=0, timeout=5).model_info()
        assert time.monotonic() - started < 5
    finally:
        server.stop(0)


def test_unreadable_certificate_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="root_certificates: cannot read"):
        PolicyClient("127.0.0.1:1", root_certificates=tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ValueError, match="not a PEM file"):
        PolicyClient("127.0.0.1:1", root_certificates=tmp_path / "junk.pem")
