"""--auto-train N trains one pass once N annotations are pending; --kl-target moves beta by the
Ziegler et al. (2019) proportional controller; stale annotations are skipped when configured;
Train's bad overrides are INVALID_ARGUMENT."""

from __future__ import annotations

import time

import grpc
import pytest

import tokenfeedback.v1.trainer_pb2 as pb

from .helpers import simple_sequence, status, train, trainer_stub

KL_TARGET = 0.002


def submit(stub, *ids: str, **fields) -> None:
    sequences = [simple_sequence(i, **fields) for i in ids]
    reply = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=sequences), timeout=30)
    assert all(r.status == pb.SUBMIT_STATUS_ACCEPTED for r in reply.results)


def test_auto_train_adaptive_beta_and_staleness(start_trainer, tiny_model_dir, tmp_path):
    trainer = start_trainer(tiny_model_dir, tmp_path / "data", "--auto-train", "3", "--batch-size", "2",
                            "--lr", "1e-2", "--beta", "0.1", "--kl-target", str(KL_TARGET),
                            "--staleness-limit", "1", "--stale-policy", "skip")
    stub = trainer_stub(trainer.address)

    submit(stub, "a-1", "a-2")
    time.sleep(1.0)
    s = status(stub)
    assert (s.annotations_pending, s.step, s.training) == (2, 0, False)  # below the threshold: nothing runs

    submit(stub, "a-3")  # the third: one pass over 3 pending with batch 2 = 2 steps, then publish
    deadline = time.monotonic() + 60
    while (s := status(stub)).model_version < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (s.annotations_pending, s.annotations_consumed, s.step, s.model_version) == (0, 3, 2, 1)
    # step 1 has KL 0 (policy == reference): error clipped to -0.2; step 2's KL is far above the tiny target
    assert s.beta == pytest.approx(0.1 * (1 - 0.02) * (1 + 0.02))

    # the controller, step by step, from the reported KL: beta' = beta (1 + 0.1 clip((KL - t) / t, +-0.2))
    progress = train(stub, steps=3)
    steps = progress[:-1]
    assert steps[0].beta == pytest.approx(s.beta)
    for before, after in zip(steps, steps[1:], strict=False):
        error = max(-0.2, min(0.2, (before.kl - KL_TARGET) / KL_TARGET))
        assert after.beta == pytest.approx(before.beta * (1 + 0.1 * error), rel=1e-9)
    assert status(stub).beta == pytest.approx(progress[-1].beta)

    # version is 2 now; with a staleness limit of 1 and "skip", an annotation of version 0 is skipped
    assert status(stub).model_version == 2
    submit(stub, "old", model_version=0)
    done = train(stub, steps=0)[-1]
    assert done.done and done.step == 0 and "1 stale annotations skipped" in done.message
    assert status(stub).annotations_pending == 0

    for field, value in [("variant", "nope"), ("beta", -1.0), ("learning_rate", 0.0), ("batch_size", 0),
                         ("horizon", "0"), ("gamma", 1.5), ("steps", -1)]:
        with pytest.raises(grpc.RpcError) as info:
            train(stub, **{field: value})
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert info.value.details().startswith(f"{field}:"), info.value.details()
