"""The `tokenfeedback` command line, run as a subprocess against the real servers.

Every command with --json (one JSON object per line, errors included) and in its human form;
annotate from each file format; serve starting and stopping both servers; bad addresses and
deadlines as clear, prompt errors.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tokenfeedback import TrainerClient

PROMPT = "Ottawa is the capital of"


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def addresses(servers):
    return ["--policy", servers.policy_address, "--trainer", servers.trainer_address]


def test_help_lists_every_command(cli):
    result = cli("--help")
    assert result.returncode == 0
    for name in ("generate", "annotate", "train", "status", "serve", "tokenize"):
        assert name in result.stdout


def test_generate_json_events(cli, addresses):
    result = cli(*addresses, "generate", PROMPT, "-n", "5", "--seed", "4", "--no-eos-stop", "--alternatives", "2",
                 "--json")
    assert result.returncode == 0, result.stderr
    events = lines(result.stdout)
    assert [e["event"] for e in events] == ["start"] + ["token"] * 5 + ["end"]
    tokens = events[1:-1]
    assert [t["position"] for t in tokens] == list(range(5))
    assert all(len(t["alternatives"]) == 2 and t["logprob"] <= 0 for t in tokens)
    assert "".join(t["text"] for t in tokens) == events[-1]["completion_text"]
    assert events[0]["prompt_text"] == PROMPT and isinstance(events[-1]["model_version"], int)


def test_generate_human_colours_and_summary(cli, addresses):
    result = cli(*addresses, "generate", PROMPT, "-n", "6", "--temperature", "1.5", "--seed", "1", "--no-eos-stop",
                 "--color", "always")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT) and "\033[" in result.stdout
    assert "model version" in result.stderr and "6 tokens" in result.stderr
    plain = cli(*addresses, "generate", PROMPT, "-n", "3", "--color", "never", "--no-prompt")
    assert "\033[" not in plain.stdout and not plain.stdout.startswith(PROMPT)


def test_generate_save_then_annotate_then_duplicate(cli, addresses, tmp_path):
    saved = tmp_path / "completions.jsonl"
    result = cli(*addresses, "generate", PROMPT, "-n", "4", "--seed", "9", "--no-eos-stop", "--save", str(saved))
    assert result.returncode == 0, result.stderr
    [record] = lines(saved.read_text())
    assert len(record["completionTokenIds"]) == 4 and len(record["behaviorLogprobs"]) == 4
    record["tokenLabels"] = [{"position": 2, "weight": -1}]
    saved.write_text(json.dumps(record) + "\n")
    first = cli(*addresses, "annotate", str(saved), "--json")
    assert first.returncode == 0, first.stderr
    result, summary = lines(first.stdout)
    assert result == {"event": "result", "annotation_id": record["annotationId"], "status": "ACCEPTED", "rows": 1,
                      "reason": ""}
    assert summary == {"event": "summary", "accepted": 1, "duplicate": 0, "rejected": 0, "skipped": 0}
    again = cli(*addresses, "annotate", str(saved))
    assert again.returncode == 0 and again.stdout.startswith("duplicate")
    assert "0 accepted, 1 duplicate" in again.stderr


def test_annotate_label_studio_and_doccano_exports(cli, addresses, tmp_path):
    completion = " Paris is the capital of 東京 😀."
    stamp = time.time_ns()
    export = [
        {"id": 1, "data": {"prompt": PROMPT, "completion": completion}, "annotations": [
            {"id": stamp, "updated_at": "2026-01-01T00:00:00Z", "result": [
                {"id": "a", "type": "labels", "from_name": "l", "to_name": "text",
                 "value": {"start": 1, "end": 6, "text": "Paris", "labels": ["Bad"]}},
                {"id": "a", "type": "textarea", "from_name": "r", "to_name": "text", "value": {"text": ["Ottawa"]}},
            ]},
            {"id": stamp + 1, "was_cancelled": True, "result": []},
        ]},
    ]
    ls = tmp_path / "export.json"
    ls.write_text(json.dumps(export, ensure_ascii=False), encoding="utf-8")
    result = cli(*addresses, "annotate", str(ls), "--json")
    assert result.returncode == 0, result.stderr + result.stdout
    events = lines(result.stdout)
    assert events[0] == {"event": "skipped", "reason": f"task 1, annotation {stamp + 1}: cancelled"}
    assert events[1]["status"] == "ACCEPTED" and events[1]["rows"] == 2
    assert events[1]["annotation_id"] == f"ls-1-{stamp}-2026-01-01T00:00:00Z"

    doccano = tmp_path / "doccano.jsonl"
    emoji = completion.index("😀")
    doccano.write_text(json.dumps({"id": stamp, "prompt": PROMPT, "text": completion,
                                   "label": [[emoji, emoji + 1, "Bad"]]}) + "\n")
    result = cli(*addresses, "annotate", str(doccano), "--format", "doccano", "--annotator", "cli-test", "--json")
    assert result.returncode == 0, result.stderr
    [accepted, _] = lines(result.stdout)
    assert accepted["status"] == "ACCEPTED" and accepted["rows"] >= 1
    stored = TrainerClient(addresses[3]).get_annotation(accepted["annotation_id"])
    assert stored.annotator_id == "cli-test" and stored.rows[0].weight == -1.0


def test_annotate_dry_run_needs_no_server(cli, tmp_path):
    doccano = tmp_path / "d.jsonl"
    doccano.write_text('{"id": 3, "text": " Paris", "label": [[1, 6, "Good"]]}\n')
    result = cli("--trainer", f"127.0.0.1:{closed_port()}", "annotate", str(doccano), "--dry-run")
    assert result.returncode == 0, result.stderr
    [sequence] = lines(result.stdout)
    assert sequence["spanLabels"] == [{"start": 1, "end": 6, "weight": 1.0, "text": "Paris"}]


def test_annotate_invalid_all_or_nothing_and_partial(cli, addresses, tmp_path):
    stamp = time.time_ns()
    good = {"annotationId": f"g-{stamp}", "promptText": PROMPT, "completionText": " Canada.", "sequenceReward": 1}
    bad = {"annotationId": f"b-{stamp}", "promptText": PROMPT, "completionText": " Canada.",
           "tokenLabels": [{"position": 0, "weight": "NaN"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    result = cli(*addresses, "annotate", str(path), "--json")
    assert result.returncode == 1
    [error] = lines(result.stdout)
    assert error["event"] == "error" and error["code"] == "INVALID_ARGUMENT"
    assert error["field"].startswith("sequences[1]") and error["field"].endswith("token_labels[0].weight")
    assert "must be finite" in result.stderr
    partial = cli(*addresses, "annotate", str(path), "--partial-ok", "--json")
    assert partial.returncode == 1
    accepted, rejected, summary = lines(partial.stdout)
    assert accepted["status"] == "ACCEPTED" and rejected["status"] == "REJECTED"
    assert "token_labels[0].weight" in rejected["reason"] and summary["rejected"] == 1


def test_annotate_unreadable_file_is_a_clear_error(cli, addresses, tmp_path):
    result = cli(*addresses, "annotate", str(tmp_path / "missing.json"))
    assert result.returncode == 1 and "missing.json: cannot read" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 5, "data": {"completion": " x"}, "annotations": [
        {"id": 6, "result": [{"id": "q", "type": "labels", "value": {"start": 0, "end": 2, "text": "zz",
                                                                      "labels": ["Bad"]}}]}]}]))
    result = cli(*addresses, "annotate", str(bad), "--json")
    assert result.returncode == 1
    assert "task 5, annotation 6, region 'q'" in lines(result.stdout)[0]["message"]


def test_train_status_and_tokenize(cli, addresses):
    result = cli(*addresses, "train", "--steps", "2", "--lr", "1e-4", "--json")
    assert result.returncode == 0, result.stderr
    progress = lines(result.stdout)
    assert all(p["event"] == "progress" for p in progress) and progress[-1]["done"]
    assert [p["step"] for p in progress[:-1]] == [1, 2]
    assert all(p["horizon"] == 1 for p in progress)  # a number where it is one
    version = progress[-1]["model_version"]

    human = cli(*addresses, "train", "--steps", "1")
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith("trained 1 step(s): loss") and "step" in human.stderr  # the tqdm bar
    # the bar's last line counts the rows the steps trained on (the final message has none of its own)
    last_bar = [line for line in re.split(r"[\r\n]+", human.stderr) if "rows=" in line][-1]
    rows = int(re.search(r"rows=(\d+)", last_bar).group(1))
    assert rows > 0 and f", {rows} rows" in human.stdout, (human.stdout, last_bar)

    [status] = lines(cli(*addresses, "status", "--json").stdout)
    assert status["model_version"] == version + 1 and status["annotations_total"] >= 1
    assert status["horizon"] == 1 and isinstance(status["horizon"], int)
    assert status["policies"][0]["model_version"] == version + 1
    text = cli(*addresses, "status").stdout
    assert f"version {version + 1}" in text and "annotations:" in text

    tokens = lines(cli(*addresses, "tokenize", " Paris 😀", "--json").stdout)
    assert "".join(t["text"] for t in tokens) == " Paris 😀" and tokens[0]["position"] == 0


def test_horizon_is_a_number_where_it_is_one():
    from tokenfeedback.commands.registry import with_numeric_horizon

    assert with_numeric_horizon({"horizon": "3", "gamma": 1.0}) == {"horizon": 3, "gamma": 1.0}
    assert with_numeric_horizon({"horizon": "full"}) == {"horizon": "full"}
    assert with_numeric_horizon({"step": 1}) == {"step": 1}


def test_global_options_before_or_after_the_command(cli, servers):
    before = cli("--json", "--trainer", servers.trainer_address, "status")
    after = cli("status", "--trainer", servers.trainer_address, "--json")
    env = cli("status", "--json", env={"TOKENFEEDBACK_TRAINER": servers.trainer_address})
    for result in (before, after, env):
        assert result.returncode == 0, result.stderr
        assert "annotations_total" in lines(result.stdout)[0]


def test_bad_address_fails_fast_and_clearly(cli):
    port = closed_port()
    started = time.monotonic()
    result = cli("status", "--trainer", f"127.0.0.1:{port}")
    assert result.returncode == 1 and f"cannot reach a server at 127.0.0.1:{port}" in result.stderr
    result = cli("--json", "generate", "x", "--policy", f"127.0.0.1:{port}")
    assert result.returncode == 1 and lines(result.stdout)[0]["code"] == "UNAVAILABLE"
    assert time.monotonic() - started < 30
    result = cli("status", "--trainer", "no-port")
    assert result.returncode == 1 and "expected HOST:PORT" in result.stderr


def test_deadline_and_token_file_errors(cli, addresses, tmp_path):
    result = cli(*addresses, "--timeout", "0.05", "generate", PROMPT, "-n", "512", "--no-eos-stop", "--json")
    assert result.returncode == 1 and lines(result.stdout)[-1]["code"] == "DEADLINE_EXCEEDED"
    result = cli(*addresses, "status", "--token-file", str(tmp_path / "none"))
    assert result.returncode == 2 and "--token-file: cannot read" in result.stderr
    token = tmp_path / "token"
    token.write_text("abc\n")
    assert cli(*addresses, "status", "--token-file", str(token)).returncode == 0


@pytest.mark.slow
def test_serve_starts_both_and_stops_on_ctrl_c(tiny_model_dir, tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfeedback", "serve", "--model", str(tiny_model_dir), "--data", str(tmp_path),
         "--policy-port", "0", "--trainer-port", "0", "--policy-http-port", "0", "--trainer-http-port", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, start_new_session=True,
    )
    try:
        serving = json.loads(proc.stdout.readline())
        assert serving["event"] == "serving", proc.stderr.read()
        with TrainerClient(serving["trainer"]) as trainer:
            assert trainer.status().policies[0].address == serving["policy"]
        # the Connect ports answer what README's curl example sends
        for url, method, field in ((serving["trainer_http"], "TrainerService/GetStatus", "variant"),
                                   (serving["policy_http"], "PolicyService/GetModelInfo", "vocabSize")):
            request = urllib.request.Request(f"{url}/tokenfeedback.v1.{method}", data=b"{}",
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as reply:
                assert reply.status == 200 and field in json.loads(reply.read()), method
        proc.send_signal(signal.SIGINT)
        # communicate drains both pipes while waiting: a full stderr pipe would block the exit
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        stopped = json.loads(out.splitlines()[0])
        assert stopped == {"event": "stopped", "exit_codes": {"trainer": 0, "policy": 0}}
        for pid in serving["pids"].values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
