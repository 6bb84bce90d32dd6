"""One client must never stop the others (docs/design.md, "Errors and limits"):

- every value training computes with in float32 is bounded at submit: values at float32's edge get
  INVALID_ARGUMENT naming the field and the bound, and nothing is stored;
- an annotation that cannot be trained on anyway (poison already in the store) is quarantined and
  training goes on with the rest of its batch;
- error messages quote client values truncated, so the real error reaches the caller;
- saving a checkpoint of an existing step never deletes the complete one first.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from array import array

import grpc
import pytest
import torch

import tokenfeedback.v1.trainer_pb2 as pb
from common.errors import quote
from trainer_server.checkpoint import CheckpointMeta, Checkpoints

from .helpers import simple_sequence, status, train, trainer_stub

DATA = []  # the module trainer's data folder
HUGE = [1e300, 3.5e38, 1e30, 10000.5, -1e30, float("nan")]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    from common.process import start_server

    from .conftest import FAST, ROOT

    data = tmp_path_factory.mktemp("hostile")
    DATA.append(data)
    server = start_server(
        "trainer_server",
        ["--model", str(tiny_model_dir), "--data", str(data), "--port", "0", "--max-seq-len", "32", *FAST],
        name="trainer", cwd=ROOT, timeout=180,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(trainer):
    return trainer_stub(trainer.address)


def rejected(stub, sequence) -> grpc.RpcError:
    before = status(stub).annotations_total
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[sequence]), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert status(stub).annotations_total == before, "a rejected request stored something"
    return error.value


# ---- bounds at submit ----


@pytest.mark.parametrize("value", HUGE)
def test_weights_beyond_the_bound_are_refused_naming_field_and_bound(stub, value):
    cases = {
        "token_labels[0].weight": simple_sequence("w", token_labels=[pb.TokenLabel(position=1, weight=value)]),
        "token_labels[0].replacement_weight": simple_sequence("r", token_labels=[pb.TokenLabel(
            position=1, weight=-1.0, replacement_token_id=9, replacement_weight=abs(value))]),
        "sequence_reward": simple_sequence("s", token_labels=[], sequence_reward=value),
    }
    for field, sequence in cases.items():
        details = rejected(stub, sequence).details()
        assert field in details and "10000" in details, details


def test_span_weight_beyond_the_bound_is_refused(stub):
    sequence = simple_sequence("span", token_labels=[], span_labels=[pb.SpanLabel(start=0, end=1, weight=3.5e38)])
    details = rejected(stub, sequence).details()
    assert "span_labels[0].weight" in details and "10000" in details, details


@pytest.mark.parametrize("value", [-1e30, -3.0e38, -51.0])
def test_behavior_logprobs_beyond_the_bound_are_refused(stub, value):
    sequence = simple_sequence("mu", behavior_logprobs=[-0.5, value, -0.1, -0.2])
    details = rejected(stub, sequence).details()
    assert "behavior_logprobs[1]" in details and "[-50, 0]" in details, details


def test_weights_at_the_bound_are_accepted(stub):
    sequence = simple_sequence("edge", token_labels=[pb.TokenLabel(position=1, weight=-1e4, replacement_token_id=9,
                                                                   replacement_weight=1e4)],
                               behavior_logprobs=[-50.0, -0.1, 0.0, -1.0], sequence_reward=1e4)
    reply = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[sequence]), timeout=30)
    assert reply.results[0].status == pb.SUBMIT_STATUS_ACCEPTED


@pytest.mark.parametrize("fields, name", [
    (dict(beta=1e30), "beta"), (dict(beta=3.5e38), "beta"), (dict(learning_rate=1e30), "learning_rate"),
    (dict(gamma=1e30), "gamma"), (dict(batch_size=1 << 30), "batch_size"),
])
def test_train_overrides_beyond_their_bounds_are_refused(stub, fields, name):
    with pytest.raises(grpc.RpcError) as error:
        train(stub, steps=1, **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{name}: must be"), error.value.details()


# ---- client strings quoted truncated ----


@pytest.mark.parametrize("fields, name", [(dict(horizon="9" * 10_000 + "x"), "horizon"),
                                          (dict(variant="v" * 10_000), "variant")])
def test_long_train_strings_are_quoted_truncated(stub, fields, name):
    with pytest.raises(grpc.RpcError) as error:
        train(stub, steps=1, **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()[:200]
    assert error.value.details().startswith(f"{name}: ") and len(error.value.details()) < 400


def test_long_ids_are_refused_briefly(stub):
    for call in (lambda: stub.GetAnnotation(pb.GetAnnotationRequest(annotation_id="a" * 10_000), timeout=30),
                 lambda: stub.WithdrawAnnotations(pb.WithdrawAnnotationsRequest(annotation_ids=["a" * 10_000]),
                                                  timeout=30)):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.value.details()) < 200


def test_quote_cuts_and_says_the_length():
    assert quote("abc") == "'abc'"
    long = quote("x" * 10_000, limit=40)
    assert len(long) < 80 and long.endswith("(10000 characters)")
    assert quote(1e300) == "1e+300"


# ---- quarantine: poison among good annotations in one batch ----


def store_poison(data, annotation_id: str, weight: float) -> None:
    """What an older trainer (before the bounds) could have stored: a pending annotation whose
    weight is finite in float64 but not in float32."""
    db = sqlite3.connect(data / "annotations.sqlite", timeout=30)
    with db:
        db.execute(
            "INSERT INTO annotations (annotation_id, state, model_version, prompt_ids, completion_ids, "
            "behavior_logprobs, rows, n_rows, sequence_reward, annotator_id, metadata, stored_at) "
            "VALUES (?, 1, 0, ?, ?, NULL, ?, 1, NULL, '', '{}', ?)",
            (annotation_id, array("i", [1, 2, 3]).tobytes(), array("i", [4, 5, 6, 7]).tobytes(),
             json.dumps([[1, 5, weight, False]]), time.time()))
    db.close()


def test_poison_in_a_batch_is_quarantined_and_the_rest_trains(trainer, stub):
    goods = [simple_sequence(f"good-{i}", completion=(4, 5 + i, 6, 7)) for i in range(2)]
    stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=goods[:1]), timeout=30)
    store_poison(DATA[0], "poison-1", 1e300)
    store_poison(DATA[0], "poison-2", 3.5e38)
    stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=goods[1:]), timeout=30)
    assert status(stub).annotations_pending >= 2 + len(goods)

    done = train(stub, steps=0, batch_size=64)[-1]  # one batch: every pending annotation, poison included
    assert done.done and done.step == 1, done
    assert "2 annotations quarantined" in done.message
    for name in ("poison-1", "poison-2"):
        stored = stub.GetAnnotation(pb.GetAnnotationRequest(annotation_id=name), timeout=30)
        assert stored.state == pb.ANNOTATION_STATE_QUARANTINED and "weight" in stored.quarantine_reason
    for sequence in goods:
        stored = stub.GetAnnotation(pb.GetAnnotationRequest(annotation_id=sequence.annotation_id), timeout=30)
        assert stored.state == pb.ANNOTATION_STATE_CONSUMED
    after = status(stub)
    assert after.annotations_quarantined == 2 and after.annotations_pending == 0
    assert "quarantined annotation 'poison-1'" in trainer.log_tail(200)
    # later calls are not held up by them: replaying trains on the good ones only
    assert train(stub, steps=1)[-1].step == 1


# ---- checkpoints ----


def save(checkpoints: Checkpoints, model, optimizer, step: int, beta: float):
    meta = CheckpointMeta(step=step, model_version=1, beta=beta, replay_cursor=0, model="m", created_at=time.time())
    return checkpoints.save(model.state_dict(), optimizer.state_dict(), meta)


def test_saving_a_step_again_never_loses_the_complete_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = Checkpoints(tmp_path)
    path = save(checkpoints, model, optimizer, 8, beta=0.1)
    real_rename = os.rename

    def crash_on_rename_in(src, dst):  # the crash: the new folder never gets its final name
        if str(src).startswith(str(tmp_path / ".tmp-")):
            raise OSError("simulated crash while renaming the new checkpoint in")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_rename_in)
    with pytest.raises(OSError, match="simulated crash"):
        save(checkpoints, model, optimizer, 8, beta=0.2)
    monkeypatch.setattr(os, "rename", real_rename)
    found = Checkpoints(tmp_path).newest()
    assert found is not None and found[0] == path and found[1].beta == 0.1
    # replacing works, and leaves nothing aside
    save(checkpoints, model, optimizer, 8, beta=0.3)
    assert checkpoints.newest()[1].beta == 0.3 and not list(tmp_path.glob(".replaced-*"))


def test_a_crash_between_the_renames_is_repaired_at_start(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoints = Checkpoints(tmp_path)
    path = save(checkpoints, model, optimizer, 8, beta=0.1)
    os.rename(path, tmp_path / f".replaced-{path.name}.123-456")  # where a SIGKILL would have left it
    assert checkpoints.newest() is None
    Checkpoints(tmp_path).clean_partial()
    found = checkpoints.newest()
    assert found is not None and found[0] == path and found[1].beta == 0.1
