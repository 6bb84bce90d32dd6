"""Cancellation frees a decoding slot at once; SIGTERM drains and exits 0; health before loading."""

from __future__ import annotations

import re
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tokenfeedback.v1.policy_pb2 as pb
import tokenfeedback.v1.policy_pb2_grpc as pb_grpc
from common.process import start_server
from tests.conftest import ROOT
from tests.policy.conftest import generate, tokens_of

LONG = pb.SamplingParams(max_new_tokens=1000, seed=1, stop_on_eos=False)


def cancelled_counts(server) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in
            re.finditer(r"generation (\S+) cancelled after (\d+) tokens", server.log_tail(400))}


def test_cancelled_stream_frees_its_slot(tiny_model_dir, start_policy_server):
    """With --max-batch 1 the second request can only start once the first one's slot is free:
    it completes long before the cancelled 1000-token stream could have."""
    with start_policy_server(tiny_model_dir, "--max-batch", "1", "--max-new-tokens-limit", "1000") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.PolicyServiceStub(channel)
            alone = [t.token_id for t in tokens_of(generate(stub, "Ottawa", max_new_tokens=20, seed=5))]
            long_call = stub.Generate(pb.GenerateRequest(prompt_text="Paris", params=LONG), timeout=120)
            start = next(long_call).start
            next(long_call)
            long_call.cancel()
            with pytest.raises(grpc.RpcError) as err:
                list(long_call)
            assert err.value.code() == grpc.StatusCode.CANCELLED
            other = generate(stub, "Ottawa", max_new_tokens=20, seed=5)
            assert [t.token_id for t in tokens_of(other)] == alone and other[-1].end.completion_tokens == 20
            deadline = time.monotonic() + 10
            while start.generation_id not in cancelled_counts(server) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert cancelled_counts(server)[start.generation_id] < 1000


def test_cancel_among_concurrent_streams(stub):
    """Several streams decode together; cancelling one leaves the others complete and unchanged."""
    requests = [dict(prompt_text=p, max_new_tokens=60, seed=i) for i, p in enumerate(["Paris", "Tokyo", "Oslo"])]
    alone = [[t.token_id for t in tokens_of(generate(stub, **r))] for r in requests]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = [t.token_id for t in tokens_of(generate(stub, **requests[i]))]

    doomed = stub.Generate(pb.GenerateRequest(prompt_text="Rome", params=pb.SamplingParams(max_new_tokens=500)),
                           timeout=120)
    next(doomed)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    next(doomed)
    doomed.cancel()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(3)] == alone


def test_sigterm_drains_running_streams_and_exits_0(tiny_model_dir):
    server = start_server("policy_server", ["--model", str(tiny_model_dir), "--port", "0", "--grace", "20"],
                          name="policy", cwd=ROOT)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.PolicyServiceStub(channel)
            call = stub.Generate(pb.GenerateRequest(prompt_text="Paris", params=pb.SamplingParams(
                max_new_tokens=300, seed=1, stop_on_eos=False)), timeout=120)
            next(call)
            server.proc.send_signal(signal.SIGTERM)
            events = list(call)  # the running stream finishes within the grace period
            assert events[-1].end.completion_tokens == 300
            assert server.proc.wait(30) == 0
    finally:
        server.kill()
    assert "draining" in server.log_tail()


def test_sigterm_cancels_streams_after_grace(tiny_model_dir):
    server = start_server("policy_server", ["--model", str(tiny_model_dir), "--port", "0", "--grace", "0.3",
                                            "--max-new-tokens-limit", "1000"], name="policy", cwd=ROOT)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.PolicyServiceStub(channel)
            call = stub.Generate(pb.GenerateRequest(prompt_text="Paris", params=LONG), timeout=120)
            next(call)
            began = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
            assert server.proc.wait(30) == 0
            assert time.monotonic() - began < 20
    finally:
        server.kill()


def test_health_not_serving_until_loaded(tiny_model_dir):
    """The port is bound before the model loads: health says NOT_SERVING, RPCs say UNAVAILABLE."""
    server = start_server("policy_server", ["--model", str(tiny_model_dir), "--port", "0"], name="policy", cwd=ROOT,
                          wait_healthy=False)
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            first = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            if first == health_pb2.HealthCheckResponse.NOT_SERVING:
                try:
                    pb_grpc.PolicyServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
                except grpc.RpcError as err:  # unless loading finished in between
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
            deadline = time.monotonic() + 60
            while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert first in (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING)
    finally:
        assert server.stop() == 0
