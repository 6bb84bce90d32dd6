"""The Label Studio backend over HTTP against real policy and trainer servers (tiny model).

Label Studio's payloads are written by hand here, in the shapes Label Studio 1.23 sends them;
test_labelstudio_integration.py drives a real Label Studio. Expected
token rows are derived from the policy's own token offsets with the span rules (docs/design.md,
"Spans"), so they check the shared conversion and the trainer together.
"""

from __future__ import annotations

import math

import pytest
from labelstudio_harness import http_json

from tokenfeedback.client import PolicyClient, TrainerClient
from tokenfeedback.errors import NotFoundError
from tokenfeedback.imports import labelstudio_annotation_id
from tokenfeedback.labelstudio import NAMES

PROMPT = "Paris is the capital of"
CAPITAL = " Canada. Berlin is the capital of Germany."
EMOJI_CJK = " 😀 Ünïcödé and 漢字 too."


def call(backend, path: str, body=None, method: str = "POST"):
    status, reply, seconds = http_json(method, f"http://{backend.address}{path}", body, timeout=60)
    return status, reply, seconds


def region(rid: str, text: str, needle: str, label: str, *, occurrence: int = 0, length: int | None = None):
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(needle, start + 1)
    end = start + (len(needle) if length is None else length)
    return {"id": rid, "from_name": NAMES.labels, "to_name": NAMES.completion, "type": "labels",
            "value": {"start": start, "end": end, "text": text[start:end], "labels": [label]}}


def replacement(rid: str, text: str):
    return {"id": rid, "from_name": NAMES.replacement, "to_name": NAMES.completion, "type": "textarea",
            "value": {"text": [text]}}


def saved(action: str, task_id: int, annotation_id: int, completion: str, results: list, updated: str,
          prompt: str = PROMPT, **annotation):
    return {
        "action": action,
        "task": {"id": task_id, "data": {"prompt": prompt, "completion": completion}},
        "annotation": {"id": annotation_id, "task": task_id, "result": results, "updated_at": updated,
                       "was_cancelled": False, "completed_by": 1, **annotation},
        "project": {"id": 1, "title": "t"},
    }


def covered(tokens, text: str, start: int, end: int) -> list[int]:
    """Positions of the tokens a span [start, end) covers: overlap ignoring a token's leading
    whitespace; a token that adds no characters belongs when the span starts at or before it."""
    out = []
    for token in tokens:
        if token.char_start == token.char_end:
            if start <= token.char_start < end:
                out.append(token.position)
            continue
        piece = text[token.char_start:token.char_end]
        lead = len(piece) - len(piece.lstrip())
        first = token.char_start + lead if lead < len(piece) else token.char_start
        if first < end and start < token.char_end:
            out.append(token.position)
    return out


def rows(stored) -> list[tuple[int, int, float, bool]]:
    return sorted((r.position, r.token_id, round(r.weight, 6), r.replacement) for r in stored.rows)


@pytest.fixture(scope="module")
def clients(servers):
    policy, trainer = PolicyClient(servers.policy.address), TrainerClient(servers.trainer.address)
    yield policy, trainer
    policy.close()
    trainer.close()


@pytest.fixture(scope="module")
def backend(servers, start_backend):
    return start_backend(servers.policy.address, servers.trainer.address, "--threshold", "0.2",
                         "--max-marks", "2", "--seed", "7", "--max-new-tokens", "12")


# ---- /health, /setup ---------------------------------------------------------------------------


def test_health_and_setup(backend, clients):
    policy, _ = clients
    status, reply, _ = call(backend, "/health", method="GET")
    assert (status, reply["status"]) == (200, "UP")
    status, reply, _ = call(backend, "/setup", {"project": "3.1700000000", "schema": "<View/>",
                                                "hostname": "http://127.0.0.1:1", "access_token": "x"})
    assert status == 200
    assert reply["model_version"] == f"tokenfeedback-v{policy.model_info().model_version}"


def test_unreachable_policy_is_a_json_error(start_backend, servers):
    dead = start_backend("127.0.0.1:1", servers.trainer.address)
    status, reply, _ = call(dead, "/health", method="GET")
    assert status == 503 and reply["status"] == "DOWN" and "policy" in reply["error"]
    status, reply, _ = call(dead, "/predict", {"tasks": [{"id": 1, "data": {"prompt": PROMPT, "completion": CAPITAL}}]})
    assert status == 503 and "127.0.0.1:1" in reply["error"]


# ---- /predict --------------------------------------------------------------------------------


def expected_marks(scored, text: str, threshold: float, count: int) -> list[tuple[int, int, str, float]]:
    """(start, end, text, probability) of the `count` least likely visible tokens below threshold."""
    low = [t for t in scored.tokens if math.exp(t.logprob) < threshold and text[t.char_start:t.char_end].strip()]
    low = sorted(low, key=lambda t: (t.logprob, t.position))[:count]
    marks = []
    for t in sorted(low, key=lambda t: t.position):
        piece = text[t.char_start:t.char_end]
        start = t.char_start + len(piece) - len(piece.lstrip())
        end = t.char_end - (len(piece) - len(piece.rstrip()))
        marks.append((start, end, text[start:end], math.exp(t.logprob)))
    return marks


def test_predict_marks_the_least_likely_tokens_one_result_per_task_in_order(backend, clients):
    policy, _ = clients
    tasks = [
        {"id": 11, "data": {"prompt": PROMPT, "completion": CAPITAL}},
        {"id": 12, "data": {"prompt": "The answer is 42!", "completion": EMOJI_CJK}},
        {"id": 13, "data": {"prompt": "", "completion": ""}},  # no text at all
        {"id": 14, "data": {"prompt": "Tokyo is the capital of", "completion": " Japan."}},
    ]
    status, reply, _ = call(backend, "/predict", {"tasks": tasks, "project": "1.1700000000"})
    assert status == 200
    results = reply["results"]
    assert len(results) == len(tasks)
    assert results[2]["result"] == [] and "task 13" in results[2]["error"] and "no text" in results[2]["error"]
    for task, item in zip(tasks, results, strict=True):
        if task["id"] == 13:
            continue
        text = task["data"]["completion"]
        scored = policy.score(task["data"]["prompt"], text)
        expected = expected_marks(scored, text, 0.2, 2)
        got = [(r["value"]["start"], r["value"]["end"], r["value"]["text"], r["score"]) for r in item["result"]]
        assert [g[:3] for g in got] == [e[:3] for e in expected], task
        for g, e in zip(got, expected, strict=True):
            assert g[3] == pytest.approx(e[3], rel=1e-3)
            assert text[g[0]:g[1]] == g[2]
        assert item["model_version"] == f"tokenfeedback-v{scored.model_version}"
        assert item["score"] == pytest.approx(math.exp(min(t.logprob for t in scored.tokens)), rel=1e-3)
        assert all(r["value"]["labels"] == [NAMES.bad] for r in item["result"])
    assert any(item["result"] for item in results), "threshold 0.2 on a random tiny model marks something"


def test_predictions_follow_the_projects_own_tag_names(backend, clients):
    policy, _ = clients
    config = ('<View><Text name="p" value="$prompt"/><Labels name="tag" toName="text"><Label value="Bad"/>'
              '<Label value="Good"/></Labels><Text name="text" value="$text"/></View>')
    task = {"id": 15, "data": {"prompt": PROMPT, "text": CAPITAL}}
    status, reply, _ = call(backend, "/predict", {"tasks": [task], "label_config": config})
    assert status == 200
    [item] = reply["results"]
    expected = expected_marks(policy.score(PROMPT, CAPITAL), CAPITAL, 0.2, 2)
    assert expected, "the tiny model finds some token of CAPITAL unlikely"
    assert [(r["from_name"], r["to_name"], r["value"]["start"]) for r in item["result"]] == [
        ("tag", "text", e[0]) for e in expected]


def test_prompt_only_task_gets_a_generated_completion(backend, clients):
    policy, _ = clients
    task = {"id": 21, "data": {"prompt": "Berlin is the capital of", "completion": ""}}
    status, reply, _ = call(backend, "/predict", {"tasks": [task], "project": "99.1"})
    assert status == 200
    [item] = reply["results"]
    generated = item["completion"]
    assert generated["completion"] and 1 <= len(generated["completion_token_ids"]) <= 12
    scored = policy.score(generated["prompt_token_ids"], generated["completion_token_ids"])
    assert scored.completion_text == generated["completion"]
    text = generated["completion"]
    expected = expected_marks(scored, text, 0.2, 2)
    assert [(r["value"]["start"], r["value"]["end"]) for r in item["result"]] == [e[:2] for e in expected]
    assert item["task_updated"] is False  # no Label Studio behind this /setup: nothing to write into


# ---- /webhook: conversion to token rows --------------------------------------------------------


def submit(backend, payload):
    status, reply, _ = call(backend, "/webhook", payload)
    assert status == 200, reply
    return reply


def test_bad_region_with_replacement(backend, clients):
    policy, trainer = clients
    completion = CAPITAL
    results = [region("r1", completion, " Canada", "Bad"), replacement("r1", " France")]
    reply = submit(backend, saved("ANNOTATION_CREATED", 31, 301, completion, results, "2026-01-01T00:00:00Z"))
    key = labelstudio_annotation_id(31, 301, "2026-01-01T00:00:00Z")
    assert (reply["status"], reply["annotation_id"]) == ("accepted", key)
    scored = policy.score(PROMPT, completion)
    [position] = covered(scored.tokens[:1], completion, 0, len(" Canada"))
    france = policy.tokenize(" France" + completion[len(" Canada"):]).tokens[0].token_id
    assert rows(trainer.get_annotation(key)) == sorted([
        (position, scored.tokens[position].token_id, -1.0, False),
        (position, france, 1.0, True),
    ])
    # Label Studio resending the same webhook stores nothing new.
    again = submit(backend, saved("ANNOTATION_CREATED", 31, 301, completion, results, "2026-01-01T00:00:00Z"))
    assert again["status"] == "duplicate"


@pytest.mark.parametrize(
    ("completion", "needle", "label", "expect"),
    [
        (CAPITAL, " Berlin is the capital", "Good", "every"),
        (CAPITAL, " Berlin is the capital", "Bad", "first"),
        (EMOJI_CJK, "漢字", "Bad", "first"),
        (EMOJI_CJK, "😀 Ünïcödé", "Good", "every"),
        (EMOJI_CJK, "😀", "Bad", "first"),
    ],
)
def test_span_over_tokens_emoji_and_cjk(backend, clients, completion, needle, label, expect):
    policy, trainer = clients
    prompt = "The answer is 42!"
    task_id = 40 + len(needle) + (100 if label == "Bad" else 0) + (1000 if completion == CAPITAL else 0)
    results = [region("g", completion, needle, label)]
    reply = submit(backend, saved("ANNOTATION_CREATED", task_id, task_id, completion, results, "t1", prompt=prompt))
    stored = trainer.get_annotation(reply["annotation_id"])
    scored = policy.score(prompt, completion)
    start = completion.index(needle)
    positions = covered(scored.tokens, completion, start, start + len(needle))
    assert positions, "the span covers tokens"
    weight = 1.0 if label == "Good" else -1.0
    judged = positions if expect == "every" else positions[:1]
    assert rows(stored) == sorted((p, scored.tokens[p].token_id, weight, False) for p in judged)


def test_region_offsets_are_code_points_and_utf16_offsets_are_retried(backend, clients):
    """Label Studio counts code points; a tool that counts UTF-16 units is recognized by the
    region's text and its offsets converted (the text has a character outside the BMP)."""
    policy, trainer = clients
    completion, prompt = EMOJI_CJK, "The answer is 42!"
    start = completion.index("漢字")
    utf16 = start + sum(1 for c in completion[:start] if ord(c) > 0xFFFF)
    item = {"id": "u", "from_name": NAMES.labels, "to_name": NAMES.completion, "type": "labels",
            "value": {"start": utf16, "end": utf16 + 2, "text": "漢字", "labels": ["Bad"]}}
    reply = submit(backend, saved("ANNOTATION_CREATED", 51, 501, completion, [item], "t1", prompt=prompt))
    scored = policy.score(prompt, completion)
    first = covered(scored.tokens, completion, start, start + 2)[0]
    assert rows(trainer.get_annotation(reply["annotation_id"])) == [(first, scored.tokens[first].token_id, -1.0, False)]


def test_overlapping_regions(backend, clients):
    policy, trainer = clients
    completion = CAPITAL
    # Two Bad regions that overlap are one bad span: their union, its first token.
    both_bad = [region("a", completion, " Canada. Berlin", "Bad"), region("b", completion, "Berlin is", "Bad")]
    reply = submit(backend, saved("ANNOTATION_CREATED", 61, 601, completion, both_bad, "t1"))
    scored = policy.score(PROMPT, completion)
    first = covered(scored.tokens, completion, 0, len(completion))[0]
    assert rows(trainer.get_annotation(reply["annotation_id"])) == [(first, scored.tokens[first].token_id, -1.0, False)]
    # A Bad and a Good region over the same token contradict each other: rejected, nothing stored.
    conflict = [region("a", completion, " Canada", "Bad"), region("c", completion, "Canada.", "Good")]
    status, reply, _ = call(backend, "/webhook", saved("ANNOTATION_CREATED", 62, 602, completion, conflict, "t1"))
    assert status == 400 and reply["task"] == 62 and reply["annotation"] == 602
    assert "overlaps" in reply["error"] and reply["region"]["text"] in (" Canada", "Canada.")
    with pytest.raises(NotFoundError):
        trainer.get_annotation(labelstudio_annotation_id(62, 602, "t1"))


# ---- /webhook: updates, deletes, errors ---------------------------------------------------------


def state(trainer, key: str) -> str:
    return {1: "pending", 2: "consumed", 3: "withdrawn"}[trainer.get_annotation(key).state]


def test_update_replaces_the_earlier_version_and_delete_withdraws(backend, clients):
    _, trainer = clients
    completion = CAPITAL
    first = submit(backend, saved("ANNOTATION_CREATED", 71, 701, completion,
                                  [region("r", completion, " Canada", "Bad")], "2026-01-01T00:00:00Z"))
    second = submit(backend, saved("ANNOTATION_UPDATED", 71, 701, completion,
                                   [region("r", completion, " Germany", "Bad")], "2026-01-01T00:05:00Z"))
    assert second["withdrawn"] == 1
    assert (state(trainer, first["annotation_id"]), state(trainer, second["annotation_id"])) == ("withdrawn", "pending")
    third = submit(backend, saved("ANNOTATION_UPDATED", 71, 701, completion,
                                  [region("r", completion, "Berlin", "Good")], "2026-01-01T00:09:00Z"))
    assert [state(trainer, r["annotation_id"]) for r in (first, second, third)] == ["withdrawn", "withdrawn", "pending"]
    # Label Studio's delete webhook carries only the annotation ids.
    gone = submit(backend, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 701}], "project": {"id": 1}})
    assert gone["withdrawn"] == 1
    assert state(trainer, third["annotation_id"]) == "withdrawn"


def test_cancelled_update_withdraws(backend, clients):
    _, trainer = clients
    first = submit(backend, saved("ANNOTATION_CREATED", 72, 702, CAPITAL, [region("r", CAPITAL, " Canada", "Bad")], "t1"))
    skipped = submit(backend, saved("ANNOTATION_UPDATED", 72, 702, CAPITAL, [], "t2", was_cancelled=True))
    assert (skipped["status"], skipped["withdrawn"]) == ("skipped", 1)
    assert state(trainer, first["annotation_id"]) == "withdrawn"


@pytest.mark.parametrize(
    ("task_data", "result", "status", "words"),
    [
        ({"prompt": PROMPT, "completion": ""}, region("r9", "xx Canada", " Canada", "Bad"), 400, ["task 81", "completion"]),
        ({"prompt": PROMPT, "completion": CAPITAL},
         {**region("r9", CAPITAL, " Canada", "Bad"), "value": {"start": 1, "end": 8, "text": " Canada", "labels": ["Bad"]}},
         400, ["task 81", "region 'r9'", "disagrees"]),
        ({"prompt": PROMPT, "completion": CAPITAL}, {**region("r9", CAPITAL, " Canada", "Bad"),
                                                     "value": {**region("r9", CAPITAL, " Canada", "Bad")["value"],
                                                               "labels": ["Meh"]}}, 400, ["region 'r9'", "Meh"]),
    ],
)
def test_bad_annotations_are_json_errors_and_store_nothing(backend, clients, task_data, result, status, words):
    _, trainer = clients
    payload = saved("ANNOTATION_CREATED", 81, 801, "", [result], "t1")
    payload["task"]["data"] = task_data
    got, reply, _ = call(backend, "/webhook", payload)
    assert got == status and reply["task"] == 81 and reply["annotation"] == 801
    for word in words:
        assert word in reply["error"]
    with pytest.raises(NotFoundError):
        trainer.get_annotation(labelstudio_annotation_id(81, 801, "t1"))
    assert "task 81" in "\n".join(backend.output)  # the log line names the task


def test_replacement_that_changes_nothing_is_refused_naming_the_region(backend, clients):
    _, trainer = clients
    results = [region("r", CAPITAL, " Canada", "Bad"), replacement("r", " Canada")]
    status, reply, _ = call(backend, "/webhook", saved("ANNOTATION_CREATED", 82, 802, CAPITAL, results, "t1"))
    assert status == 400 and reply["region"]["text"] == " Canada" and "replacement" in reply["error"]
    with pytest.raises(NotFoundError):
        trainer.get_annotation(labelstudio_annotation_id(82, 802, "t1"))


def test_unreachable_trainer_is_a_json_error(start_backend, servers):
    lost = start_backend(servers.policy.address, "127.0.0.1:1")
    payload = saved("ANNOTATION_CREATED", 91, 901, CAPITAL, [region("r", CAPITAL, " Canada", "Bad")], "t1")
    status, reply, seconds = call(lost, "/webhook", payload)
    assert status == 503 and "127.0.0.1:1" in reply["error"] and reply["task"] == 91
    assert any("task 91" in line and "nothing submitted" in line for line in lost.output)
    print(f"webhook answer with the trainer unreachable: {1e3 * seconds:.0f} ms")


def test_other_actions_are_acknowledged_and_ignored(backend):
    for action in ("TASKS_CREATED", "PROJECT_UPDATED"):
        status, reply, _ = call(backend, "/webhook", {"action": action, "project": {"id": 1}})
        assert (status, reply["status"]) == (200, "ignored")
    status, reply, _ = call(backend, "/webhook", None)
    assert status == 400 and "JSON" in reply["error"]


# ---- rejected annotations, and Label Studio's token --------------------------------------------


def test_rejected_annotations_are_listed_until_a_later_version_is_stored(backend, clients):
    """Label Studio saves an annotation whatever the webhook answers: the backend lists the ones it
    could not store (/rejected and /health), naming task, annotation, region and error, until a
    later version of the same annotation is stored."""
    _, trainer = clients
    conflict = [region("a", CAPITAL, " Canada", "Bad"), region("c", CAPITAL, "Canada.", "Good")]
    status, reply, _ = call(backend, "/webhook", saved("ANNOTATION_CREATED", 93, 903, CAPITAL, conflict, "t1"))
    assert status == 400
    status, listed, _ = call(backend, "/rejected", method="GET")
    assert status == 200
    [entry] = [r for r in listed["rejected"] if r["annotation"] == "903"]
    assert (entry["task"], entry["project"], entry["error"]) == ("93", "1", reply["error"])
    assert "overlaps" in entry["error"] and entry["region"]["text"] in (" Canada", "Canada.")
    # No Label Studio behind this backend's /setup: it says so instead of pretending it was shown.
    _, health, _ = call(backend, "/health", method="GET")
    [entry] = [r for r in health["rejected"] if r["annotation"] == "903"]
    assert entry["shown"].startswith("not shown in Label Studio") or entry["shown"] == ""

    fixed = submit(backend, saved("ANNOTATION_UPDATED", 93, 903, CAPITAL, conflict[:1], "t2"))
    assert fixed["status"] == "accepted" and state(trainer, fixed["annotation_id"]) == "pending"
    _, listed, _ = call(backend, "/rejected", method="GET")
    assert not [r for r in listed["rejected"] if r["annotation"] == "903"]


def test_label_studio_token_from_a_file_or_the_environment_never_logged(tmp_path, monkeypatch, capsys,
                                                                      start_backend, servers):
    import argparse

    from tokenfeedback.labelstudio.server import TOKEN_ENV, add_arguments, label_studio_token

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    secret = tmp_path / "ls-token"
    secret.write_text("file-token-123\n", encoding="utf-8")
    monkeypatch.setenv(TOKEN_ENV, "env-token-456")
    assert label_studio_token(parser.parse_args(["--label-studio-token-file", str(secret)])) == "file-token-123"
    assert label_studio_token(parser.parse_args([])) == "env-token-456"
    assert capsys.readouterr().err == ""
    # The old flag still works, with a warning that names the safe ways.
    assert label_studio_token(parser.parse_args(["--label-studio-token", "argv-token"])) == "argv-token"
    warning = capsys.readouterr().err
    assert "--label-studio-token-file" in warning and TOKEN_ENV in warning
    empty = tmp_path / "empty"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(Exception, match="--label-studio-token-file: .* is empty"):
        label_studio_token(parser.parse_args(["--label-studio-token-file", str(empty)]))

    # A backend started with it does not print it (its config line leaves tokens out).
    started = start_backend(servers.policy.address, servers.trainer.address, "--label-studio-token-file", str(secret),
                            "--label-studio-url", "http://127.0.0.1:1")
    status, _, _ = call(started, "/health", method="GET")
    assert status == 200
    output = "\n".join(started.output)
    assert "config:" in output and "file-token-123" not in output
