"""policy_server/config.py: the flags are made from the config's fields and checked once."""

from __future__ import annotations

from dataclasses import fields

import pytest

from common.flags import flag_name, is_flag
from policy_server.config import EngineConfig, PolicyServerConfig, build_parser, parse_args


def test_defaults_and_every_field_a_flag():
    assert parse_args([]) == PolicyServerConfig()
    help_text = build_parser().format_help()
    for f in fields(PolicyServerConfig):
        if is_flag(f):
            assert flag_name(PolicyServerConfig, f.name) in help_text
    assert "--grace" in help_text and "--tls-cert" in help_text and "--admin-token-file" in help_text


def test_flags_set_fields():
    config = parse_args(["--model", "m", "--port", "0", "--http-port", "0", "--grace", "2.5", "--max-batch", "3",
                         "--dtype", "float32", "--max-update-bytes", "100"])
    assert (config.model, config.port, config.http_port, config.grace_s, config.max_batch, config.dtype,
            config.max_update_bytes) == ("m", 0, 0, 2.5, 3, "float32", 100)
    engine = config.engine_config()
    assert type(engine) is EngineConfig
    assert all(getattr(engine, f.name) == getattr(config, f.name) for f in fields(EngineConfig))


@pytest.mark.parametrize("argv, flag", [
    (["--max-batch", "0"], "--max-batch"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--grace", "-1"], "--grace"),
    (["--max-message-bytes", "1000"], "--max-message-bytes"),
    (["--max-streams", "0"], "--max-streams"),
    (["--threads", "-2"], "--threads"),
    (["--tls-cert", "x.pem"], "--tls-key"),
])
def test_bad_values_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err


def test_checked_when_built_in_code_too():
    with pytest.raises(ValueError, match="--max-new-tokens-limit"):
        EngineConfig(max_new_tokens_limit=0)
