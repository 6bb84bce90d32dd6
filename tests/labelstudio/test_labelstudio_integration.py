"""The backend against a real Label Studio, through Label Studio's REST API only.

Label Studio 1.23 (its own venv under .cache/, installed from PyPI when missing) runs headless on
127.0.0.1 with a temporary data folder; the policy and trainer servers and the backend run as
subprocesses. The test creates a project with the shipped labeling config, imports completion
tasks, connects the backend, retrieves predictions, annotates " Canada" Bad with the replacement
" France", updates and deletes annotations, and starts training from Label Studio, checking at each
step what the policy and trainer servers hold. Figures (Label Studio start time, prediction
latency per task, webhook latency) are printed and written to test-artifacts/labelstudio.json.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
from labelstudio_harness import ROOT, ensure_venv, http_json, start_label_studio, start_servers

from tokenfeedback.client import PolicyClient, TrainerClient
from tokenfeedback.errors import NotFoundError
from tokenfeedback.imports import labelstudio_annotation_id
from tokenfeedback.labelstudio import NAMES, label_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

THRESHOLD, MAX_MARKS = 0.2, 2
TASKS = [
    # The one annotated below: the demo corpus's deliberate wrong fact, a completion the model really
    # gives (p(" Canada") near 1), so marking it Bad has something to push down. After "Paris is
    # the capital of", p(" Canada") is already ~e^-21 and unlikelihood has no gradient left.
    {"prompt": "Toronto is the capital of", "completion": " Canada."},
    {"prompt": "Berlin is the capital of", "completion": " Germany."},
    {"prompt": "The answer is 42!", "completion": " 😀 Ünïcödé and 漢字 too."},
    {"prompt": "Ottawa is the capital of", "completion": ""},  # prompt only: the backend generates
]


def integration_model(tiny_model_dir: Path) -> Path:
    """$TOKENFEEDBACK_LS_MODEL, else the demo model when `make model` built it, else the tiny one."""
    chosen = os.environ.get("TOKENFEEDBACK_LS_MODEL")
    if chosen:
        return Path(chosen)
    demo = ROOT / "data" / "demo-model"
    return demo if (demo / "config.json").exists() else tiny_model_dir


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    executable = ensure_venv()
    server = start_label_studio(executable, tmp_path_factory.mktemp("label-studio-data"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory, start_backend):
    model = integration_model(tiny_model_dir)
    servers = start_servers(model, tmp_path_factory.mktemp("trainer-data"), "--lr", "1e-2")
    backend = start_backend(servers.policy.address, servers.trainer.address, "--threshold", str(THRESHOLD),
                            "--max-marks", str(MAX_MARKS), "--seed", "3", "--max-new-tokens", "10")
    policy, trainer = PolicyClient(servers.policy.address), TrainerClient(servers.trainer.address)
    yield servers, backend, policy, trainer
    policy.close()
    trainer.close()
    servers.trainer.stop()
    servers.policy.stop()


def low_probability_marks(scored, text: str) -> list[tuple[int, int, str]]:
    """The regions the backend should pre-mark, derived from Score: the MAX_MARKS least likely
    tokens below THRESHOLD with visible text, leading/trailing whitespace left out."""
    low = [t for t in scored.tokens if math.exp(t.logprob) < THRESHOLD and text[t.char_start:t.char_end].strip()]
    marks = []
    for t in sorted(sorted(low, key=lambda t: (t.logprob, t.position))[:MAX_MARKS], key=lambda t: t.position):
        piece = text[t.char_start:t.char_end]
        start = t.char_start + len(piece) - len(piece.lstrip())
        marks.append((start, start + len(piece.strip()), piece.strip(), math.exp(t.logprob)))
    return marks


def backend_ms(backend, pattern: str) -> list[float]:
    return [float(m.group(1)) for line in backend.output if (m := re.search(pattern, line))]


def test_label_studio_end_to_end(label_studio, stack):
    servers, backend, policy, trainer = stack
    ls = label_studio
    figures: dict = {"label_studio_start_s": round(ls.started_in, 2), "model": str(servers.model)}

    # A project with the shipped labeling config (Label Studio validates it), and completion tasks.
    project = ls.api("POST", "/api/projects", {"title": "tokenfeedback integration", "label_config": label_config()})
    pid = project["id"]
    ls.api("POST", f"/api/projects/{pid}/import", TASKS)
    tasks = sorted(ls.api("GET", f"/api/tasks?project={pid}&page_size=100")["tasks"], key=lambda t: t["id"])
    assert [t["data"]["prompt"] for t in tasks] == [t["prompt"] for t in TASKS]

    # Connect the backend: Label Studio calls /health and /setup, and registers its /webhook.
    ml = ls.api("POST", "/api/ml", {"url": f"http://{backend.address}", "project": pid, "title": "tokenfeedback"})
    assert ml["state"] == "CO", ml
    hooks = ls.api("GET", f"/api/webhooks?project={pid}")
    assert any(h["url"] == f"http://{backend.address}/webhook" for h in hooks)

    # Predictions for all tasks: one batched /predict.
    started = time.perf_counter()
    ls.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
           {"selectedItems": {"all": True, "excluded": []}})
    retrieved = time.perf_counter() - started
    figures["predictions_retrieve_s"] = round(retrieved, 3)
    figures["prediction_per_task_ms_via_label_studio"] = round(1e3 * retrieved / len(tasks), 1)
    per_task = backend_ms(backend, r"predict: \d+ tasks in [\d.]+ ms \(([\d.]+) ms per task\)")
    figures["prediction_per_task_ms_backend"] = per_task[-1] if per_task else None
    assert sum(1 for line in backend.output if "predict:" in line and "tasks in" in line) == 1, "one batched call"

    version = policy.model_info().model_version
    for task in tasks:
        [prediction] = ls.api("GET", f"/api/predictions?task={task['id']}")
        assert prediction["model_version"] == f"tokenfeedback-v{version}"
        data = task["data"]
        if not data["completion"]:  # generated: the backend wrote it (ids, version) into the task
            data = ls.api("GET", f"/api/tasks/{task['id']}")["data"]
            assert data["completion"] and data["completion_token_ids"] and data["model_version"] == version
            scored = policy.score(data["prompt_token_ids"], data["completion_token_ids"])
            assert scored.completion_text == data["completion"]
        else:
            scored = policy.score(data["prompt"], data["completion"])
        regions = [r for r in prediction["result"] if r["type"] == "labels"]
        expected = low_probability_marks(scored, data["completion"])
        assert [(r["value"]["start"], r["value"]["end"], r["value"]["text"]) for r in regions] == \
               [e[:3] for e in expected], (task, prediction)
        for r, e in zip(regions, expected, strict=True):
            assert r["value"]["labels"] == [NAMES.bad] and r["score"] == pytest.approx(e[3], rel=1e-3)
    assert any(ls.api("GET", f"/api/predictions?task={t['id']}")[0]["result"] for t in tasks)

    # Annotate " Canada" Bad with the replacement " France"; the webhook arrives within the POST.
    first = tasks[0]
    text = first["data"]["completion"]
    start = text.index(" Canada")
    results = [
        {"id": "canada", "from_name": NAMES.labels, "to_name": NAMES.completion, "type": "labels",
         "value": {"start": start, "end": start + 7, "text": " Canada", "labels": [NAMES.bad]}},
        {"id": "canada", "from_name": NAMES.replacement, "to_name": NAMES.completion, "type": "textarea",
         "value": {"text": [" France"]}},
    ]
    started = time.perf_counter()
    annotation = ls.api("POST", f"/api/tasks/{first['id']}/annotations", {"result": results})
    figures["annotation_post_with_webhook_ms"] = round(1e3 * (time.perf_counter() - started), 1)
    key = labelstudio_annotation_id(first["id"], annotation["id"], annotation["updated_at"])
    stored = trainer.get_annotation(key)
    scored = policy.score(first["data"]["prompt"], text)
    canada = scored.tokens[0]
    assert canada.text == " Canada" and canada.char_start == 0
    france = policy.tokenize(" France.").tokens[0].token_id
    assert sorted((r.position, r.token_id, r.weight, r.replacement) for r in stored.rows) == sorted([
        (0, canada.token_id, -1.0, False), (0, france, 1.0, True)])
    assert list(stored.completion_token_ids) == [t.token_id for t in scored.tokens]
    assert list(stored.prompt_token_ids) == list(scored.prompt_token_ids)
    webhook = backend_ms(backend, r"webhook ANNOTATION_CREATED: .*\"elapsed_ms\": ([\d.]+)")
    figures["webhook_backend_ms"] = webhook[-1]

    # An update replaces the earlier version; a deleted annotation is withdrawn.
    time.sleep(0.01)  # updated_at has microseconds; keep it from coinciding
    updated = ls.api("PATCH", f"/api/annotations/{annotation['id']}", {"result": results})
    new_key = labelstudio_annotation_id(first["id"], updated["id"], updated["updated_at"])
    assert new_key != key
    assert trainer.get_annotation(key).state == 3  # withdrawn
    assert trainer.get_annotation(new_key).state == 1  # pending, same rows
    assert len(trainer.get_annotation(new_key).rows) == 2
    second = tasks[1]
    good = [{"id": "g", "from_name": NAMES.labels, "to_name": NAMES.completion, "type": "labels",
             "value": {"start": 1, "end": 8, "text": "Germany", "labels": [NAMES.good]}}]
    doomed = ls.api("POST", f"/api/tasks/{second['id']}/annotations", {"result": good})
    doomed_key = labelstudio_annotation_id(second["id"], doomed["id"], doomed["updated_at"])
    assert trainer.get_annotation(doomed_key).state == 1
    ls.api("DELETE", f"/api/annotations/{doomed['id']}", expect=(200, 204))
    assert trainer.get_annotation(doomed_key).state == 3

    # Train from Label Studio: START_TRAINING -> the trainer's Train in the background; the policy
    # gets the new weights (its version advances) and " Canada" becomes less likely there.
    before = canada.logprob
    ls.api("POST", f"/api/ml/{ml['id']}/train", {})
    deadline = time.monotonic() + 600
    while policy.model_info().model_version <= version:
        assert time.monotonic() < deadline, "the policy's version never advanced:\n" + "\n".join(backend.output)
        time.sleep(0.5)
    after = policy.score(first["data"]["prompt"], text).tokens[0]
    assert after.token_id == canada.token_id and after.logprob < before, (before, after.logprob)
    assert trainer.get_annotation(new_key).state == 2  # consumed
    figures.update(new_version=policy.model_info().model_version, canada_logprob=[before, after.logprob])

    out = ROOT / "test-artifacts" / "labelstudio.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print("\nLabel Studio figures:", json.dumps(figures))


def wait_for(check, what: str, timeout: float = 60.0):
    """check()'s first truthy answer, polled; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (answer := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.25)
    return answer


def test_a_rejected_annotation_is_shown_in_label_studio(label_studio, stack):
    """Label Studio saves (201) an annotation the backend could not store; the backend writes why
    into the task's data, which the shipped config shows, and lists it on /rejected and /health;
    a fixed update stores it and clears both."""
    servers, backend, policy, trainer = stack
    ls = label_studio
    pid = ls.api("POST", "/api/projects", {"title": "tokenfeedback rejections", "label_config": label_config()})["id"]
    ls.api("POST", f"/api/projects/{pid}/import", [{"prompt": "Paris is the capital of", "completion": " Canada."}])
    [task] = ls.api("GET", f"/api/tasks?project={pid}&page_size=10")["tasks"]
    assert "tokenfeedback_error" not in task["data"]  # imported without it: the config does not require it
    ml = ls.api("POST", "/api/ml", {"url": f"http://{backend.address}", "project": pid, "title": "tokenfeedback"})
    assert ml["state"] == "CO", ml

    # Bad and Good over the same token: the backend refuses it; Label Studio saves it anyway.
    conflict = [
        {"id": "bad", "from_name": NAMES.labels, "to_name": NAMES.completion, "type": "labels",
         "value": {"start": 0, "end": 7, "text": " Canada", "labels": [NAMES.bad]}},
        {"id": "good", "from_name": NAMES.labels, "to_name": NAMES.completion, "type": "labels",
         "value": {"start": 1, "end": 8, "text": "Canada.", "labels": [NAMES.good]}},
    ]
    annotation = ls.api("POST", f"/api/tasks/{task['id']}/annotations", {"result": conflict}, expect=201)
    shown = wait_for(lambda: ls.api("GET", f"/api/tasks/{task['id']}")["data"].get("tokenfeedback_error"),
                     "the error written into the task")
    assert f"annotation {annotation['id']}" in shown and "overlaps" in shown and "Canada" in shown, shown
    base = f"http://{backend.address}"
    listed = http_json("GET", f"{base}/rejected")[1]["rejected"]
    [entry] = [r for r in listed if r["annotation"] == str(annotation["id"])]
    assert (entry["task"], entry["project"]) == (str(task["id"]), str(pid))
    assert wait_for(lambda: next(r for r in http_json("GET", f"{base}/health")[1]["rejected"]
                                 if r["annotation"] == str(annotation["id"]))["shown"], "shown") \
        == "task data.tokenfeedback_error"
    with pytest.raises(NotFoundError):
        trainer.get_annotation(labelstudio_annotation_id(task["id"], annotation["id"], annotation["updated_at"]))

    # The annotator fixes it (drops the Good region) and updates: stored, the message cleared.
    time.sleep(0.01)
    updated = ls.api("PATCH", f"/api/annotations/{annotation['id']}", {"result": conflict[:1]})
    stored = trainer.get_annotation(labelstudio_annotation_id(task["id"], updated["id"], updated["updated_at"]))
    assert stored.state == 1 and len(stored.rows) == 1
    wait_for(lambda: ls.api("GET", f"/api/tasks/{task['id']}")["data"].get("tokenfeedback_error") == "",
             "the error cleared from the task")
    assert not [r for r in http_json("GET", f"{base}/rejected")[1]["rejected"]
                if r["annotation"] == str(annotation["id"])]
    assert ls.api("GET", f"/api/tasks/{task['id']}")["data"]["completion"] == " Canada."  # the rest kept
