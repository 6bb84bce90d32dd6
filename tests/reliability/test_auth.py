"""Auth and TLS against real servers: every RPC of both services without a token, with a wrong one,
and with an annotator token on an admin RPC is refused (UNAUTHENTICATED / PERMISSION_DENIED) and
changes nothing; the same requests with the right role succeed (so the refusals are real). TLS:
the right roots connect, anything else fails cleanly and at once; mutual TLS refuses clients
without a certificate from the configured CA. The Connect ports (the browser path) apply the same
checks. Tokens never appear in logs or on command lines.

Servers: a policy server with TLS, client-certificate verification and tokens; a trainer with TLS
and tokens that publishes to it (with the admin token and a client certificate).
"""

from __future__ import annotations

import json
import ssl
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file

import tokenfeedback.v1.common_pb2 as common_pb2
import tokenfeedback.v1.policy_pb2 as ppb
import tokenfeedback.v1.trainer_pb2 as tpb
from common.auth import AuthTokens, Secret, exposure_warning, is_loopback, read_token_file
from common.tls import channel_credentials
from tests.policy.conftest import update_messages
from tests.reliability.conftest import (
    ADMIN_TOKEN,
    ANNOTATOR_TOKEN,
    OTHER_ANNOTATOR_TOKEN,
    WRONG_TOKEN,
    Secured,
    metadata,
)
from tokenfeedback import PolicyClient, TrainerClient
from tokenfeedback.errors import PermissionDeniedError, UnauthenticatedError, UnavailableError

POLICY = "/tokenfeedback.v1.PolicyService/"
TRAINER = "/tokenfeedback.v1.TrainerService/"


@pytest.fixture(scope="module")
def secured(secured):
    """The session's secured servers, with one stored annotation to withdraw, read back and train on."""
    reply = secured.trainer_channel.unary_unary(
        TRAINER + "SubmitAnnotations", tpb.SubmitAnnotationsRequest.SerializeToString,
        tpb.SubmitAnnotationsResponse.FromString,
    )(tpb.SubmitAnnotationsRequest(sequences=[sequence("auth-seed")]), metadata=metadata(ANNOTATOR_TOKEN), timeout=30)
    assert reply.results[0].status == tpb.SUBMIT_STATUS_ACCEPTED
    return secured


def sequence(annotation_id: str) -> tpb.AnnotatedSequence:
    return tpb.AnnotatedSequence(annotation_id=annotation_id, prompt_token_ids=[1, 2, 3],
                                 completion_token_ids=[4, 5, 6, 7], token_labels=[tpb.TokenLabel(position=1, weight=-1)])


def weight_update(model: Path, target_version: int) -> list[ppb.WeightUpdateMessage]:
    """A complete, valid update of the tiny model's weights (every tensor nudged)."""
    state = {k: v + 0.01 for k, v in load_file(str(model / "model.safetensors")).items() if v.is_floating_point()}
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to the embedding: sent once
    return list(update_messages(state, target_version))


# Every RPC of both services, with a request that is valid (and changes state when allowed).
# (method path, request kind, response kind, the request or a function of the model folder)
RPCS = {
    POLICY + "Generate": ("unary_stream", lambda m: ppb.GenerateRequest(
        prompt_text="Paris is", params=ppb.SamplingParams(max_new_tokens=4, seed=1))),
    POLICY + "Score": ("unary_unary", lambda m: ppb.ScoreRequest(prompt_text="Paris is", completion_text=" the")),
    POLICY + "Tokenize": ("unary_unary", lambda m: ppb.TokenizeRequest(text="Paris")),
    POLICY + "AlignSpans": ("unary_unary", lambda m: ppb.AlignSpansRequest(
        text="Paris is the", spans=[common_pb2.CharSpan(start=0, end=5)])),
    POLICY + "GetModelInfo": ("unary_unary", lambda m: ppb.GetModelInfoRequest()),
    POLICY + "UpdateWeights": ("stream_unary", lambda m: weight_update(m, 100)),
    TRAINER + "SubmitAnnotations": ("unary_unary", lambda m: tpb.SubmitAnnotationsRequest(sequences=[sequence("auth-new")])),
    TRAINER + "WithdrawAnnotations": ("unary_unary", lambda m: tpb.WithdrawAnnotationsRequest(annotation_ids=["auth-seed"])),
    TRAINER + "GetAnnotation": ("unary_unary", lambda m: tpb.GetAnnotationRequest(annotation_id="auth-seed")),
    TRAINER + "GetStatus": ("unary_unary", lambda m: tpb.GetStatusRequest()),
    TRAINER + "Train": ("unary_stream", lambda m: tpb.TrainRequest(steps=1)),
    TRAINER + "SaveCheckpoint": ("unary_unary", lambda m: tpb.SaveCheckpointRequest()),
}
ADMIN_RPCS = {POLICY + "UpdateWeights", TRAINER + "Train", TRAINER + "SaveCheckpoint"}


def call(secured: Secured, method: str, md, timeout: float = 60):
    """Call `method` with its valid request; returns the reply (streams: the list of messages)."""
    kind, make = RPCS[method]
    channel = secured.policy_channel if method.startswith(POLICY) else secured.trainer_channel
    request = make(secured.model)
    callable_ = getattr(channel, kind)(method, request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=lambda b: b)
    if kind == "stream_unary":
        return callable_(iter(request), metadata=md, timeout=timeout)
    reply = callable_(request, metadata=md, timeout=timeout)
    return list(reply) if kind == "unary_stream" else reply


def state(secured: Secured) -> dict:
    """Everything a refused call could have changed."""
    status = tpb.TrainerStatus.FromString(call(secured, TRAINER + "GetStatus", metadata(ADMIN_TOKEN)))
    info = ppb.ModelInfo.FromString(call(secured, POLICY + "GetModelInfo", metadata(ADMIN_TOKEN)))
    score = ppb.ScoreResponse.FromString(call(secured, POLICY + "Score", metadata(ADMIN_TOKEN)))
    stored = tpb.StoredAnnotation.FromString(call(secured, TRAINER + "GetAnnotation", metadata(ADMIN_TOKEN)))
    checkpoints = sorted(p.name for p in (secured.data / "checkpoints").glob("*")) \
        if (secured.data / "checkpoints").exists() else []
    return {
        "counts": (status.annotations_total, status.annotations_pending, status.annotations_consumed,
                   status.annotations_withdrawn),
        "trainer": (status.model_version, status.step), "policy_version": info.model_version,
        "logprobs": [t.logprob for t in score.tokens], "seed_state": stored.state, "checkpoints": checkpoints,
    }


CASES = [(method, "none", None, grpc.StatusCode.UNAUTHENTICATED) for method in RPCS]
CASES += [(method, "wrong", (("authorization", f"Bearer {WRONG_TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED)
          for method in RPCS]
CASES += [(method, "not bearer", (("authorization", f"Basic {ADMIN_TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED)
          for method in sorted(ADMIN_RPCS)]
CASES += [(method, "annotator", metadata(ANNOTATOR_TOKEN), grpc.StatusCode.PERMISSION_DENIED)
          for method in sorted(ADMIN_RPCS)]


@pytest.mark.parametrize("method, who, md, expected", CASES, ids=[f"{m.rsplit('/', 1)[1]}-{w}" for m, w, _, _ in CASES])
def test_refused_and_nothing_changes(secured, method, who, md, expected):
    before = state(secured)
    with pytest.raises(grpc.RpcError) as err:
        call(secured, method, md)
    assert err.value.code() == expected, (err.value.code(), err.value.details())
    assert method in err.value.details() and ADMIN_TOKEN not in err.value.details()
    assert state(secured) == before


def test_health_and_reflection_stay_open(secured):
    for channel in (secured.policy_channel, secured.trainer_channel):
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def connect_post(url: str, method: str, body: bytes, token: str | None, certs, client_cert: bool,
                 stream: bool = False) -> tuple[int, bytes]:
    """One Connect call over HTTPS (JSON); returns (HTTP status, body)."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    if client_cert:
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    headers = {"content-type": "application/connect+json" if stream else "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    if stream:
        body = struct.pack(">BI", 0, len(body)) + body
    request = urllib.request.Request(url + method, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def connect_error_code(status: int, body: bytes, stream: bool) -> str | None:
    """The Connect error code of a reply (None on success)."""
    if not stream:
        return None if status == 200 else json.loads(body)["code"]
    while body:  # enveloped messages; the end-stream message (flag 2) carries the error
        flags, size = struct.unpack(">BI", body[:5])
        payload, body = body[5 : 5 + size], body[5 + size :]
        if flags & 2:
            error = json.loads(payload or b"{}").get("error")
            return error["code"] if error else None
    return None


@pytest.mark.parametrize("server, method, stream, needs_admin", [
    ("policy", POLICY + "GetModelInfo", False, False),
    ("policy", POLICY + "Generate", True, False),
    ("trainer", TRAINER + "GetStatus", False, False),
    ("trainer", TRAINER + "SubmitAnnotations", False, False),
    ("trainer", TRAINER + "Train", True, True),
    ("trainer", TRAINER + "SaveCheckpoint", False, True),
], ids=lambda v: v.rsplit("/", 1)[-1] if isinstance(v, str) else None)
def test_connect_port_applies_the_same_checks(secured, certs, server, method, stream, needs_admin):
    """The browser path: HTTPS + Connect, the same tokens and roles as gRPC."""
    process = secured.policy if server == "policy" else secured.trainer
    url = secured.connect_url(process)
    assert url.startswith("https://")
    body = {POLICY + "Generate": b'{"promptText": "Paris", "params": {"maxNewTokens": 2}}',
            TRAINER + "SubmitAnnotations": b'{"sequences": [{"annotationId": "connect-refused", "promptTokenIds": [1], '
                                           b'"completionTokenIds": [4, 5], "tokenLabels": [{"position": 0, "weight": 1}]}]}',
            TRAINER + "Train": b'{"steps": 1}'}.get(method, b"{}")
    before = state(secured)
    cases = [(None, "unauthenticated"), (WRONG_TOKEN, "unauthenticated")]
    cases += [(ANNOTATOR_TOKEN, "permission_denied")] if needs_admin else [(OTHER_ANNOTATOR_TOKEN, None)]
    for token, expected in cases:
        status, reply = connect_post(url, method, body, token, certs, server == "policy", stream)
        assert connect_error_code(status, reply, stream) == expected, (token, status, reply[:300])
        if expected == "unauthenticated" and not stream:
            assert status == 401
    if method != TRAINER + "SubmitAnnotations":
        assert state(secured) == before


def test_tls_refuses_wrong_roots_and_missing_client_certificates(secured, certs):
    """Each bad client fails fast with UNAVAILABLE (a handshake failure), and the servers keep serving."""
    bad = {
        "policy: no client certificate": (secured.policy.address, channel_credentials(certs.ca)),
        "policy: client certificate of another CA": (
            secured.policy.address, channel_credentials(certs.ca, certs.other_client_cert, certs.other_client_key)),
        "policy: server not trusted": (secured.policy.address,
                                       channel_credentials(certs.other_ca, certs.client_cert, certs.client_key)),
        "trainer: server not trusted": (secured.trainer.address, channel_credentials(certs.other_ca)),
        "trainer: system roots": (secured.trainer.address, grpc.ssl_channel_credentials()),
        "trainer: plaintext": (secured.trainer.address, None),
    }
    for what, (address, credentials) in bad.items():
        channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        start = time.monotonic()
        with channel, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (what, err.value.code(), err.value.details())
        assert time.monotonic() - start < 10, f"{what}: took {time.monotonic() - start:.1f}s to fail"
    test_health_and_reflection_stay_open(secured)


def test_python_clients_over_tls_with_tokens(secured, certs):
    """tokenfeedback.PolicyClient / TrainerClient with roots, a client certificate and tokens."""
    policy = PolicyClient(secured.policy.address, root_certificates=certs.ca, client_certificate=certs.client_cert,
                          client_key=certs.client_key, token=ANNOTATOR_TOKEN, retries=0)
    trainer = TrainerClient(secured.trainer.address, root_certificates=certs.ca, token=ANNOTATOR_TOKEN, retries=0)
    try:
        done = policy.complete("Paris is", max_new_tokens=3, seed=2)
        assert len(done.tokens) >= 1
        assert trainer.status().annotations_total >= 1
        with pytest.raises(PermissionDeniedError):
            list(trainer.train(steps=1))
    finally:
        policy.close()
        trainer.close()
    for address, kwargs in ((secured.trainer.address, {"token": WRONG_TOKEN}), (secured.trainer.address, {})):
        client = TrainerClient(address, root_certificates=certs.ca, retries=0, **kwargs)
        with pytest.raises(UnauthenticatedError):
            client.status()
        client.close()
    client = TrainerClient(secured.trainer.address, root_certificates=certs.other_ca, token=ANNOTATOR_TOKEN, retries=0,
                           timeout=10)
    with pytest.raises(UnavailableError):
        client.status()
    client.close()


def test_tokens_never_in_logs_or_command_lines(secured):
    for server in (secured.policy, secured.trainer):
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().decode()
        log = "\n".join(server.output)
        for token in (ANNOTATOR_TOKEN, OTHER_ANNOTATOR_TOKEN, ADMIN_TOKEN):
            assert token not in cmdline and token not in log
        assert "auth on (2 annotator, 1 admin token(s))" in log, server.log_tail()


def test_with_the_right_role_the_same_calls_succeed(secured, certs):
    """The control for the refusals above: the same requests change state with the right token,
    and the trainer's publish (admin token + client certificate) reaches the policy server."""
    before = state(secured)
    for method in RPCS:
        token = ADMIN_TOKEN if method in ADMIN_RPCS else ANNOTATOR_TOKEN
        if method == POLICY + "UpdateWeights":
            continue  # below, after the trainer's publish
        call(secured, method, metadata(token))
    after = state(secured)
    assert after["counts"][0] == before["counts"][0] + 1  # auth-new stored
    assert after["counts"][3] == before["counts"][3] + 1  # auth-seed withdrawn
    assert after["trainer"][1] == before["trainer"][1] + 1 and after["trainer"][0] == before["trainer"][0] + 1
    assert after["policy_version"] == after["trainer"][0], "the trainer's publish did not reach the policy server"
    assert after["logprobs"] != before["logprobs"]
    assert after["checkpoints"] != before["checkpoints"]
    reply = ppb.UpdateWeightsResponse.FromString(call(secured, POLICY + "UpdateWeights", metadata(ADMIN_TOKEN)))
    assert reply.model_version == 100 and state(secured)["policy_version"] == 100


# ---- configuration, without servers -------------------------------------------------------------


def test_token_files_and_environment(tmp_path):
    from policy_server.server import parse_args

    (tmp_path / "admin").write_text(f"# rotate: old and new\n{ADMIN_TOKEN}\n{ADMIN_TOKEN[::-1]}\n")
    config = parse_args(["--admin-token-file", str(tmp_path / "admin")], {"TOKENFEEDBACK_ANNOTATOR_TOKEN": ANNOTATOR_TOKEN})
    assert len(config.auth.admin) == 2
    assert config.auth.annotator == (Secret(ANNOTATOR_TOKEN),)
    assert config.auth.role_of(ADMIN_TOKEN[::-1]) == "admin" and config.auth.role_of(ANNOTATOR_TOKEN) == "annotator"
    assert config.auth.role_of(WRONG_TOKEN) is None
    assert ADMIN_TOKEN not in repr(config) and ANNOTATOR_TOKEN not in repr(config)
    assert parse_args([]).auth == AuthTokens() and not parse_args([]).auth.enabled
    (tmp_path / "short").write_text("short\n")
    (tmp_path / "empty").write_text("# nothing\n")
    for bad in (["--admin-token-file", str(tmp_path / "short")], ["--admin-token-file", str(tmp_path / "empty")],
                ["--admin-token-file", str(tmp_path / "missing")], ["--admin-token", ADMIN_TOKEN],
                ["--tls-cert", str(tmp_path / "admin")], ["--tls-client-ca", str(tmp_path / "admin")]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    with pytest.raises(ValueError, match="at least 16"):
        read_token_file(tmp_path / "short", "--annotator-token-file")


def test_trainer_config_logs_no_secret(tmp_path, tokens):
    from trainer_server.config import config_from_args

    config = config_from_args(["--policy-token-file", str(tokens.policy_file), *tokens.server_args()],
                              environ={"TOKENFEEDBACK_ANNOTATOR_TOKEN": OTHER_ANNOTATOR_TOKEN})
    assert config.policy_token == Secret(ADMIN_TOKEN) and len(config.auth.annotator) == 3
    logged = json.dumps(config.to_log())
    assert ADMIN_TOKEN not in logged and ANNOTATOR_TOKEN not in logged and "<secret>" in logged


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("10.1.2.3", False), ("::", False), ("example.org", False)])
def test_plaintext_without_auth_warns_beyond_loopback(host, loopback):
    assert is_loopback(host) == loopback
    tokens = AuthTokens(admin=(Secret(ADMIN_TOKEN),))
    if loopback:
        assert exposure_warning(host, False, AuthTokens()) is None
    else:
        warning = exposure_warning(host, False, AuthTokens())
        assert "TLS" in warning and "auth" in warning
        assert "TLS" in exposure_warning(host, False, tokens) and "auth (" not in exposure_warning(host, False, tokens)
        assert exposure_warning(host, True, tokens) is None
