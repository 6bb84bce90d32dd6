"""`/metrics` on both servers' HTTP ports against real servers: per-RPC counts and latencies on
both transports, and after a short loop (generate, submit, train, publish) every listed metric
is there and the ones the loop drives have moved.
"""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from common.connect import CONNECT_LINE
from tests.reliability.conftest import start_policy, start_trainer
from tokenfeedback import InvalidArgumentError, PolicyClient, TrainerClient

GENERATE = "/tokenfeedback.v1.PolicyService/Generate"
UPDATE = "/tokenfeedback.v1.PolicyService/UpdateWeights"
SUBMIT = "/tokenfeedback.v1.TrainerService/SubmitAnnotations"
STATUS = "/tokenfeedback.v1.TrainerService/GetStatus"
TOKENIZE = "/tokenfeedback.v1.PolicyService/Tokenize"

POLICY_METRICS = [
    "tokenfeedback_rpc_requests_total", "tokenfeedback_rpc_duration_seconds",
    "tokenfeedback_policy_streams_running", "tokenfeedback_policy_streams_queued",
    "tokenfeedback_policy_tokens_generated_total", "tokenfeedback_policy_time_to_first_token_seconds",
    "tokenfeedback_policy_weight_version", "tokenfeedback_policy_weight_update_seconds",
    "process_resident_memory_bytes",
]
TRAINER_METRICS = [
    "tokenfeedback_rpc_requests_total", "tokenfeedback_rpc_duration_seconds",
    "tokenfeedback_trainer_annotations", "tokenfeedback_trainer_rows", "tokenfeedback_trainer_steps_total",
    "tokenfeedback_trainer_model_version", "tokenfeedback_trainer_loss", "tokenfeedback_trainer_token_loss",
    "tokenfeedback_trainer_kl", "tokenfeedback_trainer_beta", "tokenfeedback_trainer_training",
    "tokenfeedback_trainer_policy_version", "tokenfeedback_trainer_policy_lag",
    "tokenfeedback_trainer_policy_reachable", "tokenfeedback_trainer_policy_last_publish_seconds",
    "tokenfeedback_trainer_policy_last_publish_bytes", "tokenfeedback_trainer_publish_seconds",
    "tokenfeedback_trainer_published_bytes_total",
]


@pytest.fixture(scope="module")
def loop_servers(tiny_model_dir, tmp_path_factory):
    policy = start_policy(tiny_model_dir, "--http-port", "0")
    try:
        trainer = start_trainer(tiny_model_dir, tmp_path_factory.mktemp("metrics-trainer"), "--http-port", "0",
                                "--policy", policy.address, "--batch-size", "1", "--lr", "1e-2")
    except Exception:
        policy.stop()
        raise
    try:
        yield policy, trainer
    finally:
        trainer.stop()
        policy.stop()


def http_url(server) -> str:
    for line in list(server.output):
        if match := CONNECT_LINE.search(line):
            return match.group(2)
    raise AssertionError(f"no Connect port announced:\n{server.log_tail()}")


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from GET /metrics."""
    with urllib.request.urlopen(http_url(server) + "/metrics", timeout=30) as reply:
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/plain")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples) -> set[str]:
    found = set()
    for name, _ in samples:
        found.add(name)
        for suffix in ("_bucket", "_count", "_sum", "_created"):
            if name.endswith(suffix):
                found.add(name[: -len(suffix)])
    return found


def test_rpc_metrics_count_every_call_on_both_transports(loop_servers):
    policy_server, trainer_server = loop_servers
    policy_before, trainer_before = scrape(policy_server), scrape(trainer_server)
    with PolicyClient(policy_server.address) as policy, TrainerClient(trainer_server.address) as trainer:
        for seed in range(3):
            policy.complete("Ottawa is", max_new_tokens=2, seed=seed)
        with pytest.raises(InvalidArgumentError):
            policy.complete("", max_new_tokens=2)
        trainer.status()
    for _ in range(2):  # over Connect
        urllib.request.urlopen(urllib.request.Request(
            http_url(trainer_server) + STATUS, data=b"{}", headers={"content-type": "application/json"}),
            timeout=30).read()
    with pytest.raises(urllib.error.HTTPError) as refused:  # a Connect error keeps its code
        urllib.request.urlopen(urllib.request.Request(
            http_url(policy_server) + TOKENIZE, data=b'{"txt": 1}', headers={"content-type": "application/json"}),
            timeout=30)
    assert refused.value.code == 400
    policy_after, trainer_after = scrape(policy_server), scrape(trainer_server)

    def moved(before, after, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    rpc = "tokenfeedback_rpc_requests_total"
    assert moved(policy_before, policy_after, rpc, transport="grpc", method=GENERATE, code="OK") == 3
    assert moved(policy_before, policy_after, rpc, transport="grpc", method=GENERATE, code="INVALID_ARGUMENT") == 1
    assert moved(policy_before, policy_after, "tokenfeedback_rpc_duration_seconds_count",
                 transport="grpc", method=GENERATE) == 4
    assert moved(policy_before, policy_after, "tokenfeedback_rpc_duration_seconds_sum",
                 transport="grpc", method=GENERATE) > 0
    assert moved(policy_before, policy_after, rpc, transport="connect", method=TOKENIZE, code="INVALID_ARGUMENT") == 1
    assert moved(trainer_before, trainer_after, rpc, transport="grpc", method=STATUS, code="OK") == 1
    assert moved(trainer_before, trainer_after, rpc, transport="connect", method=STATUS, code="OK") == 2
    assert value(policy_after, "process_resident_memory_bytes") > 0
    # health checks and unknown paths never become labels
    assert all(dict(labels).get("method", "/tokenfeedback.v1.").startswith("/tokenfeedback.v1.")
               for _, labels in policy_after)


def test_metrics_move_with_a_short_loop(loop_servers):
    policy_server, trainer_server = loop_servers
    policy_before, trainer_before = scrape(policy_server), scrape(trainer_server)

    with PolicyClient(policy_server.address) as policy, TrainerClient(trainer_server.address) as trainer:
        done = [policy.complete("The capital of France is", max_new_tokens=4, seed=s, stop_on_eos=False)
                for s in range(2)]
        sequences = [d.annotate(token_labels=[{"position": 0, "weight": -1.0}]) for d in done]
        assert all(r.status == trainer_pb2.SUBMIT_STATUS_ACCEPTED for r in trainer.submit(sequences))
        with pytest.raises(InvalidArgumentError):  # counted under its code
            trainer.submit({"annotation_id": "bad", "prompt_token_ids": [1], "completion_token_ids": []})
        progress = list(trainer.train(steps=2))
        assert progress[-1].done
        version = trainer.status().model_version
        deadline = time.monotonic() + 60  # the publish reaches the policy server
        while policy.model_info().model_version != version and time.monotonic() < deadline:
            time.sleep(0.2)
    urllib.request.urlopen(urllib.request.Request(  # one call over Connect, counted as such
        http_url(trainer_server) + STATUS, data=b"{}", headers={"content-type": "application/json"}), timeout=30).read()

    policy_after, trainer_after = scrape(policy_server), scrape(trainer_server)
    assert set(POLICY_METRICS) <= names(policy_after), set(POLICY_METRICS) - names(policy_after)
    assert set(TRAINER_METRICS) <= names(trainer_after), set(TRAINER_METRICS) - names(trainer_after)
    assert not names(policy_after) & {"tokenfeedback_trainer_rows", "tokenfeedback_trainer_publish_seconds"}

    def moved(before, after, name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # policy: per-RPC counts and latencies, tokens, first tokens, the weight version, the update
    assert moved(policy_before, policy_after, "tokenfeedback_rpc_requests_total",
                 transport="grpc", method=GENERATE, code="OK") == 2
    assert moved(policy_before, policy_after, "tokenfeedback_rpc_duration_seconds_count",
                 transport="grpc", method=GENERATE) == 2
    assert moved(policy_before, policy_after, "tokenfeedback_policy_tokens_generated_total") == 8
    assert moved(policy_before, policy_after, "tokenfeedback_policy_time_to_first_token_seconds_count") == 2
    assert value(policy_after, "tokenfeedback_policy_weight_version") == version >= 1
    assert moved(policy_before, policy_after, "tokenfeedback_policy_weight_update_seconds_count") >= 1
    assert moved(policy_before, policy_after, "tokenfeedback_rpc_requests_total",
                 transport="grpc", method=UPDATE, code="OK") >= 1
    assert value(policy_after, "tokenfeedback_policy_streams_running") == 0

    # trainer: annotations by state, rows, steps, loss terms, each replica's version and lag
    assert moved(trainer_before, trainer_after, "tokenfeedback_rpc_requests_total",
                 transport="grpc", method=SUBMIT, code="OK") == 1
    assert moved(trainer_before, trainer_after, "tokenfeedback_rpc_requests_total",
                 transport="grpc", method=SUBMIT, code="INVALID_ARGUMENT") == 1
    assert moved(trainer_before, trainer_after, "tokenfeedback_rpc_requests_total",
                 transport="connect", method=STATUS, code="OK") == 1
    annotations = {state: value(trainer_after, "tokenfeedback_trainer_annotations", state=state)
                   for state in ("pending", "consumed", "withdrawn")}
    assert annotations["pending"] + annotations["consumed"] == 2 and annotations["consumed"] >= 1, annotations
    assert value(trainer_after, "tokenfeedback_trainer_rows") >= 2
    assert moved(trainer_before, trainer_after, "tokenfeedback_trainer_steps_total") == 2
    assert value(trainer_after, "tokenfeedback_trainer_model_version") == version
    assert value(trainer_after, "tokenfeedback_trainer_loss") != 0.0
    assert value(trainer_after, "tokenfeedback_trainer_beta") > 0.0
    replica = policy_server.address
    assert value(trainer_after, "tokenfeedback_trainer_policy_version", policy=replica) == version
    assert value(trainer_after, "tokenfeedback_trainer_policy_lag", policy=replica) == 0
    assert value(trainer_after, "tokenfeedback_trainer_policy_reachable", policy=replica) == 1
    assert value(trainer_after, "tokenfeedback_trainer_policy_last_publish_bytes", policy=replica) > 0
    assert moved(trainer_before, trainer_after, "tokenfeedback_trainer_publish_seconds_count", policy=replica) >= 1
    assert moved(trainer_before, trainer_after, "tokenfeedback_trainer_published_bytes_total", policy=replica) > 0


def test_metrics_answers_get_only_and_needs_no_body(loop_servers):
    policy_server, _ = loop_servers
    request = urllib.request.Request(http_url(policy_server) + "/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 405
