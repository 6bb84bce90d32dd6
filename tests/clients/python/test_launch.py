"""The launcher (tokenfeedback/launch.py) that `serve`, `label`, the demo, the load test and these
tests start servers with: what it does when a start fails. (Starting and stopping both servers
is what every fixture of this folder does; `serve` with Connect ports is in test_pyclient_cli.py.)"""

from __future__ import annotations

import pytest

from tokenfeedback import launch


def test_a_trainer_that_fails_to_start_takes_the_policy_server_down_with_it(tiny_model_dir, tmp_path, monkeypatch):
    started = []
    real = launch.start_server

    def recording(*args, **kwargs):
        server = real(*args, **kwargs)
        started.append(server)
        return server

    monkeypatch.setattr(launch, "start_server", recording)
    notes = []
    with pytest.raises(launch.LaunchError, match="trainer_server .* did not start") as raised:
        launch.start_servers(tiny_model_dir, tmp_path / "data", trainer_args=["--no-such-flag"], say=notes.append)
    assert "--no-such-flag" in str(raised.value)  # the trainer's own complaint, from its log
    [policy] = started
    assert policy.name == "policy" and policy.proc.poll() is not None  # stopped, not left running
    assert notes == [f"starting the policy server on {tiny_model_dir} ...", "starting the trainer server ..."]


def test_a_missing_local_model_is_named_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "start_server", lambda *a, **k: pytest.fail("started a server"))
    with pytest.raises(FileNotFoundError, match="--model: no model at data/no-such-model .*make model"):
        launch.start_servers("data/no-such-model", tmp_path)
