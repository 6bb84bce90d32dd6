"""Data parallelism: `torchrun --nproc-per-node 2 -m trainer_server` (gloo) trains to the same weights
as one process on the same batches, driven over gRPC like any trainer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tokenfeedback.v1.trainer_pb2 as pb

from .helpers import status, train, trainer_stub

STEPS = 3
# SGD: the weights show the summed gradients directly (AdamW is scale-invariant and would hide a
# rank that averaged instead of summed); rows of different counts per sequence so that a wrong
# normalization across ranks changes the result.
ARGS = ["--optimizer", "sgd", "--lr", "0.05", "--batch-size", "4", "--beta", "0.2", "--max-grad-norm", "0"]


def sequences() -> list[pb.AnnotatedSequence]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(6):
        prompt = torch.randint(1, 300, (2 + i % 3,), generator=g).tolist()
        completion = torch.randint(1, 300, (3 + (i * 2) % 5,), generator=g).tolist()
        labels = [pb.TokenLabel(position=0, weight=-1.0, replacement_token_id=(completion[0] + 1) % 300)]
        labels += [pb.TokenLabel(position=p, weight=0.5) for p in range(1, 1 + i % 3)]
        out.append(pb.AnnotatedSequence(annotation_id=f"dp-{i}", prompt_token_ids=prompt,
                                        completion_token_ids=completion, token_labels=labels))
    return out


def run(trainer) -> tuple[list[pb.TrainProgress], dict[str, torch.Tensor]]:
    stub = trainer_stub(trainer.address)
    stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=sequences()), timeout=60)
    progress = train(stub, steps=STEPS)
    assert status(stub).step == STEPS
    return progress, status(stub)


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(start_trainer, trained_tiny_model_dir, tmp_path):
    single_data, dp_data = tmp_path / "single", tmp_path / "dp"
    dp = start_trainer(trained_tiny_model_dir, dp_data, *ARGS, module="torch.distributed.run",
                       prefix=("--nproc-per-node", "2", "--standalone", "-m", "trainer_server"))
    single = start_trainer(trained_tiny_model_dir, single_data, *ARGS)
    progress_1, status_1 = run(single)
    progress_2, status_2 = run(dp)
    assert "trainer[1]" in dp.log_tail(400), "the second rank did not run"

    for a, b in zip(progress_1, progress_2, strict=True):
        assert (a.step, a.rows, a.sequences, a.done) == (b.step, b.rows, b.sequences, b.done)
        assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-7)
        assert a.token_loss == pytest.approx(b.token_loss, rel=1e-5, abs=1e-7)
        assert a.kl == pytest.approx(b.kl, rel=1e-4, abs=1e-8)
    assert progress_1[-1].kl > 0  # the weights moved, so the comparison below is not trivial

    name = f"ckpt-{STEPS:010d}/model.safetensors"
    weights_1 = load_file(str(single_data / "checkpoints" / name))
    weights_2 = load_file(str(dp_data / "checkpoints" / name))
    start = load_file(str(trained_tiny_model_dir / "model.safetensors"))
    assert weights_1.keys() == weights_2.keys()
    moved = 0.0
    for key in weights_1:
        torch.testing.assert_close(weights_2[key], weights_1[key], rtol=1e-5, atol=1e-6, msg=key)
        if key in start:
            moved = max(moved, float((weights_1[key] - start[key]).abs().max()))
    assert moved > 1e-3, "training did not change the weights"

    # the data-parallel trainer stops cleanly (rank 0 tells rank 1 to stop); torchrun's agent itself
    # exits 1 on SIGTERM, so the ranks' own log lines are what tells
    dp.stop(timeout=60)
    log = dp.log_tail(400)
    assert "trainer[0] INFO trainer_server: shutting down" in log, log
    assert "trainer[0] WARNING" not in log and "trainer[1] WARNING" not in log, log
