"""--fsdp: `torchrun --nproc-per-node 2 -m trainer_server --fsdp` (FSDP2 over gloo) trains to the same
losses and weights as one process, gathers on rank 0 for publishing and checkpoints, and resumes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tokenfeedback.v1.trainer_pb2 as pb

from .helpers import status, train, trainer_stub
from .test_distributed import sequences
from .test_publish import policy_versions

STEPS = 3
TORCHRUN = dict(module="torch.distributed.run", prefix=("--nproc-per-node", "2", "--standalone", "-m", "trainer_server"))
MODES = {
    # SGD: the weights show the summed gradients (a rank that averaged would halve them)
    "full": ["--optimizer", "sgd", "--lr", "0.05", "--batch-size", "4", "--beta", "0.2", "--max-grad-norm", "0"],
    # AdamW: its state is sharded too, and must come back on resume
    "lora": ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--batch-size", "4", "--beta", "0.2"],
}


def run(trainer, steps: int, submit: bool = True) -> list[pb.TrainProgress]:
    stub = trainer_stub(trainer.address)
    if submit:
        stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=sequences()), timeout=60)
    progress = train(stub, steps=steps)
    return progress


def assert_same_progress(one, two):
    for a, b in zip(one, two, strict=True):
        assert (a.step, a.rows, a.sequences, a.done) == (b.step, b.rows, b.sequences, b.done)
        assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-7)
        assert a.token_loss == pytest.approx(b.token_loss, rel=1e-5, abs=1e-7)
        assert a.kl == pytest.approx(b.kl, rel=1e-4, abs=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_fsdp_over_two_gloo_processes_trains_like_one(start_trainer, start_policy, trained_tiny_model_dir,
                                                      tmp_path, mode):
    args = MODES[mode]
    single_data, fsdp_data = tmp_path / "single", tmp_path / "fsdp"
    policy = start_policy(trained_tiny_model_dir)
    sharded = start_trainer(trained_tiny_model_dir, fsdp_data, *args, "--fsdp", "--policy", policy.address, **TORCHRUN)
    single = start_trainer(trained_tiny_model_dir, single_data, *args)
    progress_1, progress_2 = run(single, STEPS), run(sharded, STEPS)
    assert "trainer[1]" in sharded.log_tail(400), "the second rank did not run"
    assert_same_progress(progress_1, progress_2)
    assert progress_1[-1].kl > 0  # the weights moved, so the comparisons are not trivial

    # the checkpoints (gathered on rank 0) hold the same weights
    name = f"ckpt-{STEPS:010d}/model.safetensors"
    weights_1 = load_file(str(single_data / "checkpoints" / name))
    weights_2 = load_file(str(fsdp_data / "checkpoints" / name))
    assert weights_1.keys() == weights_2.keys()
    for key in weights_1:
        torch.testing.assert_close(weights_2[key], weights_1[key], rtol=1e-5, atol=1e-6, msg=key)

    # the publish (gathered on rank 0) reached the policy server
    assert policy_versions(trainer_stub(sharded.address))[policy.address] == (1, True)


@pytest.mark.slow
def test_a_restarted_fsdp_trainer_resumes_weights_and_optimizer_state(start_trainer, trained_tiny_model_dir,
                                                                      tmp_path):
    # AdamW (the LoRA mode's args): the next step after the restart matches the single process's
    # only if the sharded optimizer state came back too
    args = MODES["lora"]
    sharded = start_trainer(trained_tiny_model_dir, tmp_path / "fsdp", *args, "--fsdp", **TORCHRUN)
    single = start_trainer(trained_tiny_model_dir, tmp_path / "single", *args)
    assert_same_progress(run(single, 2), run(sharded, 2))
    sharded.stop(timeout=60)
    log = sharded.log_tail(400)
    assert "trainer[0] WARNING" not in log and "trainer[1] WARNING" not in log, log
    sharded = start_trainer(trained_tiny_model_dir, tmp_path / "fsdp", *args, "--fsdp", **TORCHRUN)
    assert status(trainer_stub(sharded.address)).step == 2
    assert_same_progress(run(single, 1, submit=False), run(sharded, 1, submit=False))
