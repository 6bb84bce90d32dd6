"""Policy server fixtures: a real server subprocess on the tiny model, a gRPC stub, and helpers.

The contract tests run against every engine in POLICY_ENGINES (comma-separated, default `hf`):
`make test-integration` runs them with `hf,vllm` (the vLLM server from .cache/vllm-venv, which a
start takes minutes on a CPU); `make test` runs the vLLM smoke test (test_vllm.py) only.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
import torch

import tokenfeedback.v1.policy_pb2 as pb
import tokenfeedback.v1.policy_pb2_grpc as pb_grpc
from common.weights import iter_chunks, summarize
from policy_server.config import EngineConfig
from policy_server.engine import Engine

ENGINES = tuple(e.strip() for e in os.environ.get("POLICY_ENGINES", "hf").split(",") if e.strip())
VLLM_TEST_TIMEOUT_S = 1200  # a test that starts a vLLM server (module fixtures count) gets this long


def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("policy_engine", "hf") != "hf":
            item.add_marker(pytest.mark.timeout(VLLM_TEST_TIMEOUT_S))


@pytest.fixture(scope="module", params=ENGINES)
def policy_engine(request) -> str:
    """The engine the module's server runs (`--engine`)."""
    return request.param


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_model_dir, tiny_vllm_model_dir, policy_engine):
    """The tiny model the module's engine loads (vLLM's CPU attention needs heads of >= 32 dims)."""
    return tiny_model_dir if policy_engine == "hf" else tiny_vllm_model_dir


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The Hugging Face engine in process (no server) on the tiny model, up to 4 rows per step."""
    engine = Engine.load(EngineConfig(model=str(tiny_model_dir), device="cpu", max_batch=4))
    engine.start()
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def policy_server(tiny_model_dir, start_policy_server, policy_engine):
    """One server per test module (modules that update weights don't disturb the others)."""
    with start_policy_server(tiny_model_dir, engine=policy_engine) as server:
        yield server


@pytest.fixture(scope="module")
def channel(policy_server):
    with grpc.insecure_channel(policy_server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.PolicyServiceStub:
    return pb_grpc.PolicyServiceStub(channel)


def generate(stub, prompt_text: str = "Paris is the", timeout: float = 60, **params) -> list[pb.GenerateEvent]:
    request = pb.GenerateRequest(prompt_text=prompt_text, params=pb.SamplingParams(**params))
    return list(stub.Generate(request, timeout=timeout))


def tokens_of(events) -> list[pb.TokenEvent]:
    return [e.token for e in events if e.WhichOneof("event") == "token"]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a call raises (streams are drained); fails the test when it succeeds."""
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as err:
        return err
    raise AssertionError("the call succeeded; expected an error")


def update_messages(state_dict: dict[str, torch.Tensor], target_version: int, chunk_bytes: int = 64 * 1024,
                    tensor_count: int | None = None, total_bytes: int | None = None, sha256: str | None = None,
                    chunks=None):
    """The WeightUpdateMessages of an update: header, chunks, commit (overrides for corrupt ones)."""
    chunks = list(iter_chunks(state_dict, chunk_bytes)) if chunks is None else chunks
    summary = summarize(chunks)
    yield pb.WeightUpdateMessage(header=pb.WeightUpdateHeader(
        target_version=target_version,
        tensor_count=summary.tensor_count if tensor_count is None else tensor_count,
        total_bytes=summary.total_bytes if total_bytes is None else total_bytes,
    ))
    for c in chunks:
        yield pb.WeightUpdateMessage(chunk=pb.TensorChunk(
            name=c.name, dtype=c.dtype, shape=c.shape, offset=c.offset, data=bytes(c.data)))
    yield pb.WeightUpdateMessage(commit=pb.WeightUpdateCommit(sha256=summary.sha256 if sha256 is None else sha256))
