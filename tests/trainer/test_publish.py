"""Publishing to several policy servers: one that is down is retried and catches up when it comes,
one that restarts (back at version 0) is brought to the trainer's version again."""

from __future__ import annotations

import time

import tokenfeedback.v1.policy_pb2 as ppb
import tokenfeedback.v1.trainer_pb2 as pb

from .helpers import free_port, policy_stub, simple_sequence, status, train, trainer_stub


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def policy_versions(stub) -> dict[str, tuple[int, bool]]:
    return {p.address: (p.model_version, p.reachable) for p in status(stub).policies}


def logprobs(address: str) -> list[float]:
    reply = policy_stub(address).Score(ppb.ScoreRequest(prompt_token_ids=[1, 2, 3], completion_token_ids=[4, 5, 6, 7]),
                                       timeout=30)
    return [t.logprob for t in reply.tokens]


def test_down_and_restarted_policy_servers_catch_up(start_policy, start_trainer, tiny_model_dir, tmp_path):
    up_port, late_port = free_port(), free_port()
    up, late = f"127.0.0.1:{up_port}", f"127.0.0.1:{late_port}"
    first = start_policy(tiny_model_dir, port=up_port)
    trainer = start_trainer(tiny_model_dir, tmp_path / "data", "--policy", f"{up},{late}", "--lr", "1e-2")
    stub = trainer_stub(trainer.address)
    base = logprobs(up)

    stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[simple_sequence("p-1")]), timeout=30)
    done = train(stub, steps=2)[-1]
    assert done.published_version == 1
    versions = policy_versions(stub)
    assert versions[up] == (1, True) and versions[late] == (-1, False)
    assert [p.last_error for p in status(stub).policies if p.address == late][0]
    trained = logprobs(up)
    assert trained != base

    # the late server starts at version 0 with the base weights, and is brought to version 1
    start_policy(tiny_model_dir, port=late_port)
    wait_until(lambda: policy_versions(stub)[late] == (1, True), 60, "the late policy server to catch up")
    info = policy_stub(late).GetModelInfo(ppb.GetModelInfoRequest(), timeout=30)
    assert info.model_version == 1
    assert logprobs(late) == trained

    # a restarted server comes back at version 0; the trainer notices and sends version 1 again
    first.stop()
    start_policy(tiny_model_dir, port=up_port)
    wait_until(lambda: policy_versions(stub)[up] == (1, True) and logprobs(up) == trained, 60,
               "the restarted policy server to catch up")

    # the next publish raises both to version 2
    done = train(stub, steps=1)[-1]
    assert done.published_version == 2
    assert policy_versions(stub) == {up: (2, True), late: (2, True)}
    assert logprobs(up) == logprobs(late) != trained
