"""Durability: acknowledged annotations survive SIGKILL; a kill during a checkpoint leaves the
previous one loadable; training resumes from the newest complete checkpoint."""

from __future__ import annotations

import time

import pytest
from safetensors.torch import load_file

import tokenfeedback.v1.trainer_pb2 as pb
from trainer_server.checkpoint import Checkpoints

from .helpers import simple_sequence, status, train, trainer_stub


def submit(stub, ids: list[str]) -> list[int]:
    reply = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[simple_sequence(i) for i in ids]), timeout=30)
    return [r.status for r in reply.results]


def test_acknowledged_annotations_survive_sigkill(start_trainer, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    trainer = start_trainer(tiny_model_dir, data)
    stub = trainer_stub(trainer.address)
    ids = [f"ack-{i}" for i in range(23)]
    acked = []
    for start in range(0, len(ids), 5):  # several requests: one with 1 sequence, others with 5
        part = ids[start : start + 5] if start else ids[:1]
        assert submit(stub, part) == [pb.SUBMIT_STATUS_ACCEPTED] * len(part)
        acked += part
    acked = list(dict.fromkeys(acked + ids[1:5]))
    assert submit(stub, ids[1:5]) == [pb.SUBMIT_STATUS_ACCEPTED] * 4
    trainer.kill()  # SIGKILL right after the last acknowledgement: no chance to flush anything

    trainer = start_trainer(tiny_model_dir, data)
    stub = trainer_stub(trainer.address)
    assert status(stub).annotations_total == len(acked)
    assert submit(stub, acked) == [pb.SUBMIT_STATUS_DUPLICATE] * len(acked)
    assert status(stub).annotations_total == len(acked)
    for annotation_id in acked:
        stored = stub.GetAnnotation(pb.GetAnnotationRequest(annotation_id=annotation_id), timeout=30)
        assert list(stored.completion_token_ids) == [4, 5, 6, 7]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_kill_during_checkpoint_leaves_the_previous_one(start_trainer, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    # --checkpoint-pause holds every checkpoint complete-but-unrenamed for 2 s: the window to kill in
    trainer = start_trainer(tiny_model_dir, data, "--checkpoint-pause", "2", "--batch-size", "2", "--lr", "1e-3")
    stub = trainer_stub(trainer.address)
    submit(stub, [f"c-{i}" for i in range(4)])
    progress = train(stub, steps=1)  # one pass would take 2 steps; one step, then a checkpoint at step 1
    assert progress[-1].done and progress[-1].step == 1
    root = data / "checkpoints"
    assert [p.name for p in Checkpoints(root).complete()] == ["ckpt-0000000001"]
    saved = load_file(str(root / "ckpt-0000000001" / "model.safetensors"))
    assert status(stub).annotations_consumed == 2

    stream = stub.Train(pb.TrainRequest(steps=1), timeout=60)  # step 2, then its checkpoint
    next(stream)  # the step is done; the checkpoint is being written
    wait_for(lambda: list(root.glob(".tmp-*")), 30, "the checkpoint's temporary folder")
    trainer.kill()

    # the previous checkpoint is complete and verifies; the partial one is removed at start
    newest = Checkpoints(root).newest()
    assert newest is not None and newest[1].step == 1
    trainer = start_trainer(tiny_model_dir, data, "--batch-size", "2")
    stub = trainer_stub(trainer.address)
    s = status(stub)
    assert s.step == 1 and s.model_version == 1
    assert not list(root.glob(".tmp-*"))
    # the annotations step 2 consumed went back to pending: the weights on disk never saw them
    assert (s.annotations_consumed, s.annotations_pending) == (2, 2)
    # resuming loaded exactly the checkpoint's weights: a new checkpoint before training equals it
    reply = stub.SaveCheckpoint(pb.SaveCheckpointRequest(), timeout=60)
    assert reply.step == 1
    again = load_file(str(root / "ckpt-0000000001" / "model.safetensors"))
    assert saved.keys() == again.keys()
    assert all((saved[k] == again[k]).all() for k in saved)
