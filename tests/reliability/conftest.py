"""Fixtures of the reliability suite: certificates, token files, and real servers started with them.

Every server runs as a subprocess on 127.0.0.1 (port 0) and is stopped at the end of its scope.
`fuzz_servers` (a plaintext policy server and trainer with auth on and small limits, so fuzzed
requests stay cheap) is shared by the fuzzing and limits tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

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
                    "--max-streams", "8", "--grace", "1"]
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
