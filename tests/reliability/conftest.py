"""Fixtures of the reliability suite: certificates, token files, and real servers started with them.

Every server runs as a subprocess on 127.0.0.1 (port 0) and is stopped at the end of the session
(starting one costs seconds, so two pairs serve most modules):
- `secured`: a policy server with TLS, client-certificate verification, tokens and tight stream
  and size limits, and a trainer with TLS and tokens that publishes to it (admin token + client
  certificate); used by the auth, TLS and limits tests.
- `fuzz_servers`: a plaintext policy server and trainer with tokens and small limits, so fuzzed
  requests stay cheap; used by the fuzzing, trainer-limits and short load tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from common.connect import CONNECT_LINE
from common.process import ServerProcess, start_server
from common.tls import channel_credentials
from tests.conftest import ROOT
from tests.reliability.certs import Certs, make_certs

ANNOTATOR_TOKEN = "annotator-7f3c9a1e5b2d4c6a8e0f"
ADMIN_TOKEN = "admin-b41d7e93c2a85f06d1e4"
OTHER_ANNOTATOR_TOKEN = "annotator-second-0c9d8e7f6a5b"  # a second line of the annotator file
WRONG_TOKEN = "nobody-0000000000000000000000"


@dataclass(frozen=True)
class Tokens:
    annotator_file: Path
    admin_file: Path
    policy_file: Path  # what the trainer presents to the policy servers (the admin token)

    def server_args(self) -> list[str]:
        return ["--annotator-token-file", str(self.annotator_file), "--admin-token-file", str(self.admin_file)]


def metadata(token: str | None) -> tuple | None:
    return (("authorization", f"Bearer {token}"),) if token else None


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def tokens(tmp_path_factory) -> Tokens:
    folder = tmp_path_factory.mktemp("tokens")
    files = {
        "annotator": f"# annotators, one token per line\n{ANNOTATOR_TOKEN}\n\n{OTHER_ANNOTATOR_TOKEN}\n",
        "admin": f"{ADMIN_TOKEN}\n",
        "policy": f"{ADMIN_TOKEN}\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o600)
    return Tokens(folder / "annotator", folder / "admin", folder / "policy")


def tls_server_args(certs: Certs, client_ca: bool = False) -> list[str]:
    args = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    return args + (["--tls-client-ca", str(certs.ca)] if client_ca else [])


def start_policy(model: Path, *args: str, credentials: grpc.ChannelCredentials | None = None,
                 port: int = 0) -> ServerProcess:
    return start_server("policy_server", ["--model", str(model), "--port", str(port), "--host", "127.0.0.1", *args],
                        name="policy", cwd=ROOT, timeout=180, credentials=credentials)


def start_trainer(model: Path, data: Path, *args: str, credentials: grpc.ChannelCredentials | None = None,
                  wait_healthy: bool = True) -> ServerProcess:
    return start_server(
        "trainer_server",
        ["--model", str(model), "--data", str(data), "--port", "0", "--host", "127.0.0.1", "--threads", "1",
         "--publish-retry", "0.3", *args],
        name="trainer", cwd=ROOT, timeout=180, credentials=credentials, wait_healthy=wait_healthy)


@dataclass
class Secured:
    policy: ServerProcess
    trainer: ServerProcess
    policy_channel: grpc.Channel  # TLS with the client certificate (the policy server requires one)
    trainer_channel: grpc.Channel  # TLS, server certificate only
    data: Path  # the trainer's data folder
    model: Path

    def connect_url(self, server: ServerProcess) -> str:
        for line in server.output:
            if match := CONNECT_LINE.search(line):
                return match.group(2)
        raise AssertionError(f"{server.name} announced no Connect port:\n{server.log_tail()}")


# The secured policy server's limits (test_limits.py); small enough to reach, large enough for the
# trainer's publish and the auth tests' requests.
SECURED_MAX_STREAMS = 2
SECURED_POLICY_LIMITS = ["--max-streams", str(SECURED_MAX_STREAMS), "--max-updates", "1", "--max-new-tokens-limit", "1000",
                         "--max-prompt-tokens", "16", "--max-text-chars", "200",
                         "--max-message-bytes", str(5 * 1024 * 1024)]


@pytest.fixture(scope="session")
def secured(tiny_model_dir, certs, tokens, tmp_path_factory):
    mtls = client_credentials(certs, client_cert=True)
    policy = start_policy(tiny_model_dir, *tls_server_args(certs, client_ca=True), *tokens.server_args(),
                          *SECURED_POLICY_LIMITS, "--http-port", "0", credentials=mtls)
    data = tmp_path_factory.mktemp("secured-trainer")
    try:
        trainer = start_trainer(
            tiny_model_dir, data, *tls_server_args(certs), *tokens.server_args(), "--http-port", "0",
            "--policy", policy.address, "--policy-tls-ca", str(certs.ca), "--policy-tls-cert", str(certs.client_cert),
            "--policy-tls-key", str(certs.client_key), "--policy-token-file", str(tokens.policy_file),
            "--batch-size", "1", "--lr", "1e-2", credentials=client_credentials(certs))
    except Exception:
        policy.stop()
        raise
    secured = Secured(policy, trainer, grpc.secure_channel(policy.address, mtls),
                      grpc.secure_channel(trainer.address, client_credentials(certs)), data, tiny_model_dir)
    try:
        yield secured
    finally:
        secured.policy_channel.close()
        secured.trainer_channel.close()
        trainer.stop()
        policy.stop()


@pytest.fixture
def servers():
    """Collects servers a test starts; stops them all at its end (SIGTERM, then SIGKILL)."""
    started: list[ServerProcess] = []
    yield started
    for server in reversed(started):
        server.stop()


@dataclass
class FuzzServers:
    policy: ServerProcess
    trainer: ServerProcess
    policy_channel: grpc.Channel
    trainer_channel: grpc.Channel


# The fuzz servers' small limits keep random requests cheap (and are themselves under test).
FUZZ_POLICY_ARGS = ["--max-new-tokens-limit", "8", "--max-prompt-tokens", "64", "--max-text-chars", "512",
                    "--max-streams", "8", "--max-update-bytes", "1000", "--grace", "1"]
FUZZ_TRAINER_ARGS = ["--max-seq-len", "64", "--max-batch-sequences", "8", "--batch-size", "2", "--lr", "1e-3",
                     "--keep-checkpoints", "1", "--sync", "normal"]


@pytest.fixture(scope="session")
def fuzz_servers(tiny_model_dir, tokens, tmp_path_factory):
    policy = start_policy(tiny_model_dir, *tokens.server_args(), *FUZZ_POLICY_ARGS)
    try:
        trainer = start_trainer(tiny_model_dir, tmp_path_factory.mktemp("fuzz-trainer"), *tokens.server_args(),
                                *FUZZ_TRAINER_ARGS)
    except Exception:
        policy.stop()
        raise
    policy_channel, trainer_channel = grpc.insecure_channel(policy.address), grpc.insecure_channel(trainer.address)
    try:
        yield FuzzServers(policy, trainer, policy_channel, trainer_channel)
    finally:
        policy_channel.close()
        trainer_channel.close()
        trainer.stop()
        policy.stop()


def client_credentials(certs: Certs, client_cert: bool = False) -> grpc.ChannelCredentials:
    if client_cert:
        return channel_credentials(certs.ca, certs.client_cert, certs.client_key)
    return channel_credentials(certs.ca)
