"""TrainerConfig is the one source of the trainer's flags, checked once (trainer_server/config.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.errors import InvalidArgument
from trainer_server.config import TrainerConfig, build_parser, check_training, config_from_args, flag_name


def test_no_flags_give_the_dataclass_defaults():
    assert config_from_args([]) == TrainerConfig()


def test_every_flag_field_is_a_flag_with_its_default():
    parser = build_parser()
    for f in dataclasses.fields(TrainerConfig):
        if "help" not in f.metadata:
            continue
        action = next(a for a in parser._actions if a.dest == f.name)
        assert flag_name(f.name) in action.option_strings
        assert action.default == f.default, f.name


def test_flag_names_are_the_documented_ones():
    config = config_from_args([
        "--model", "m", "--data", "d", "--port", "0", "--http-port", "0", "--policy", "a:1,b:2", "--variant", "pg_clip",
        "--lr", "0.01", "--batch-size", "4", "--horizon", "full", "--gamma", "0.5", "--baseline", "--kl-target", "0.2",
        "--staleness-limit", "2", "--stale-policy", "skip", "--sync", "normal", "--max-streams", "2",
        "--checkpoint-pause", "0.5", "--policy-tls", "--max-message-bytes", str(8 << 20),
    ])
    assert (config.model, config.data, config.http_port, config.policies) == ("m", Path("d"), 0, ("a:1", "b:2"))
    assert (config.variant, config.learning_rate, config.batch_size, config.horizon, config.gamma) == (
        "pg_clip", 0.01, 4, "full", 0.5)
    assert config.baseline and config.policy_tls and config.kl_target == 0.2 and config.checkpoint_pause == 0.5
    assert config_from_args(["--learning-rate", "0.02"]).learning_rate == 0.02


@pytest.mark.parametrize("argv, message", [
    (["--beta", "-1"], "--beta: must be finite and in [0, 10000]"),
    (["--lr", "0"], "--lr: must be in (0, 1]"),
    (["--gamma", "2"], "--gamma: must be in [0, 1]"),
    (["--horizon", "0"], "--horizon: must be a positive integer or 'full'"),
    (["--batch-size", "0"], "--batch-size: must be in [1, 65536]"),
    (["--policy", "nohost"], "--policy: expected HOST:PORT"),
])
def test_bad_flags_exit_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_overrides_pass_the_same_check():
    with pytest.raises(InvalidArgument) as error:
        check_training("beta", float("nan"))
    assert error.value.field == "beta" and "must be finite and in [0, 10000]" in error.value.detail
    with pytest.raises(ValueError, match=r"--beta: must be finite and in \[0, 10000\]"):
        TrainerConfig(beta=float("nan"))
