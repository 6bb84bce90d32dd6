"""tokenfeedback as a Label Studio ML backend, its logic: pre-marks unlikely tokens, turns saved
spans into training data, and starts training when Label Studio asks. server.py serves it over
HTTP; each method here takes the request's JSON object and returns the answer's.

    tokenfeedback labelstudio-backend --policy 127.0.0.1:50051 --trainer 127.0.0.1:50052 --port 9090

Label Studio's ML backend contract (as its own label_studio_ml reference server answers it):
- GET /health: UP when the policy server answers (Label Studio waits 1 s).
- POST /setup: remembers the project's Label Studio address and token (used to write generated
  completions into prompt-only tasks) and answers the policy's model version.
- POST /predict: one result per task, in order. A task with a completion is scored by the policy;
  a task with only a prompt gets a completion generated first (written into the task and returned
  in the prediction). The least likely tokens are pre-marked Bad, scored with their probability.
- POST /webhook: ANNOTATION_CREATED / UPDATED -> the shared Label Studio conversion
  (tokenfeedback.imports.labelstudio_sequence) -> SubmitAnnotations with the key
  "ls-<task>-<annotation>-<updated_at>"; an update withdraws the annotation's earlier versions, a
  delete withdraws them all. Label Studio waits 1 s for a webhook: the request only stores (the
  trainer acknowledges after its durable commit) and answers; START_TRAINING starts the trainer's
  Train in a background thread and answers at once.
- GET /rejected (and /health's "rejected"): the annotations the backend could not store.
Errors (a task without text, a region whose text disagrees with its offsets, an unreachable
trainer) are a JSON body {"error": ..., "task": ..., "annotation": ...} with a 4xx/5xx status and
one log line naming the task and region; a rejected annotation stores nothing. Label Studio saves
it all the same, so the backend also writes the error into the task's data (rest.ERROR_KEY, shown
by the shipped labeling config) and lists it until a later version of the annotation is stored
(docs/design.md, "Errors and limits").
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from tokenfeedback.client import PolicyClient, TrainerClient
from tokenfeedback.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    TokenfeedbackError,
    UnavailableError,
)
from tokenfeedback.imports import ConversionError, Skipped, labelstudio_annotation_id, labelstudio_sequence
from tokenfeedback.labelstudio.config import NAMES, LabelNames, names_from_config
from tokenfeedback.labelstudio.predict import MarkOptions, prediction
from tokenfeedback.labelstudio.rest import ERROR_KEY, LabelStudioApi, LabelStudioError
from tokenfeedback.labelstudio.state import SubmissionLog

log = logging.getLogger("tokenfeedback.labelstudio")

_SPAN_FIELD = re.compile(r"span_labels\[(\d+)\]")
ANNOTATION_SAVED = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
ANNOTATION_DELETED = ("ANNOTATIONS_DELETED", "ANNOTATION_DELETED")


@dataclass(frozen=True)
class BackendConfig:
    """Everything the backend reads; filled from the command line and logged at start."""

    policy: str  # policy server HOST:PORT (scores and generates)
    trainer: str  # trainer server HOST:PORT (stores annotations, trains)
    host: str = "127.0.0.1"  # bind address of the HTTP server
    port: int = 9090  # HTTP port; 0 picks a free one (announced on stdout)
    threshold: float = 0.1  # pre-mark tokens whose probability under the policy is below this
    max_marks: int = 3  # at most this many pre-marked tokens per task, the least likely first
    max_new_tokens: int = 32  # length of a completion generated for a prompt-only task
    temperature: float = 1.0  # sampling temperature of those completions (0: greedy)
    seed: int | None = None  # sampling seed of those completions (None: a fresh one each)
    train_steps: int = 0  # optimizer steps per START_TRAINING; 0: one pass over pending annotations
    state: str = "data/labelstudio-backend.sqlite"  # which trainer ids were submitted (":memory:" ok)
    webhook_budget: float = 0.8  # seconds a webhook may spend on trainer calls (Label Studio waits 1)
    feedback_retries: int = 5  # tries at writing a rejection into a Label Studio task, 0.5 s, 1 s, 2 s, 4 s apart
    predict_concurrency: int = 8  # tasks of one /predict scored at the same time
    to_name: str = ""  # keep only regions on this Text tag; "" keeps all labels/textarea regions
    label_studio_url: str = ""  # Label Studio's address for writing generated completions; "" from /setup
    label_studio_token: str = field(default="", repr=False)  # its API token; "" uses the one /setup sends
    tls_ca: str | None = None  # PEM root certificate(s) of the gRPC servers; None: plaintext
    token: str | None = field(default=None, repr=False)  # bearer token for the gRPC servers (auth on)

    def __post_init__(self):
        MarkOptions(self.threshold, self.max_marks)  # validates both
        if self.webhook_budget <= 0:
            raise ValueError(f"webhook_budget: must be > 0 seconds, got {self.webhook_budget}")
        if self.feedback_retries < 1:
            raise ValueError(f"feedback_retries: must be >= 1, got {self.feedback_retries}")
        if self.predict_concurrency < 1:
            raise ValueError(f"predict_concurrency: must be >= 1, got {self.predict_concurrency}")


class RequestError(Exception):
    """A request the backend refuses: HTTP status and the JSON body's fields."""

    def __init__(self, code: int, message: str, **where: Any):
        self.status = code  # the HTTP status
        self.message = message
        self.where = {k: v for k, v in where.items() if v is not None}
        super().__init__(message)

    def body(self) -> dict:
        return {"error": self.message, **self.where}


def _unreachable(exc: TokenfeedbackError) -> bool:
    return isinstance(exc, UnavailableError | DeadlineExceededError)


class Backend:
    """The backend's state: clients, the submission log, the projects seen in /setup, training."""

    def __init__(self, config: BackendConfig):
        self.config = config
        self.marks = MarkOptions(config.threshold, config.max_marks)
        tls = dict(root_certificates=config.tls_ca, tls=True if config.tls_ca else None, token=config.token)
        self.policy = PolicyClient(config.policy, timeout=30.0, connect_timeout=2.0, **tls)
        # Few retries: a webhook has under a second, and a trainer that is down should be reported
        # as such at once rather than after the whole budget went on backoff.
        self.trainer = TrainerClient(config.trainer, timeout=30.0, connect_timeout=0.5, retries=2, **tls)
        self.submissions = SubmissionLog(config.state)
        self.projects: dict[str, dict] = {}  # Label Studio project id -> {hostname, access_token}
        self.webhook_lock = asyncio.Lock()  # webhooks one at a time: an update's withdraws stay ordered
        self.training_lock = threading.Lock()
        self.training: dict[str, Any] = {"running": False}
        # (project, task) whose rejections to write into Label Studio, in order, after the webhook
        # answered: Label Studio sends webhooks from inside the request that saves the annotation.
        self.feedback: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.feedback_thread = threading.Thread(target=self._feedback_loop, name="labelstudio-feedback", daemon=True)
        self.feedback_thread.start()

    def close(self) -> None:
        self.feedback.put(None)
        self.feedback_thread.join(timeout=5.0)
        self.policy.close()
        self.trainer.close()
        self.submissions.close()

    # ---- /health, /setup ---------------------------------------------------------------

    async def health(self) -> dict:
        try:
            serving = await asyncio.to_thread(self.policy.serving, 0.5)
        except TokenfeedbackError as exc:
            raise RequestError(503, f"policy server: {exc}", status="DOWN") from None
        if not serving:
            raise RequestError(503, "policy server: not SERVING yet", status="DOWN")
        return {"status": "UP", "model_class": "tokenfeedback", "training": dict(self.training),
                "rejected": self.submissions.rejected()}

    async def rejected(self) -> dict:
        """The annotations Label Studio saved but the backend could not store, newest first."""
        return {"rejected": self.submissions.rejected()}

    async def setup(self, body: dict) -> dict:
        project = _project_id(body.get("project"))
        if project:
            self.projects[project] = {"hostname": body.get("hostname") or "", "access_token": body.get("access_token") or ""}
        try:
            info = await asyncio.to_thread(self.policy.model_info, timeout=2.0)
        except TokenfeedbackError as exc:
            raise RequestError(503, f"policy server at {self.config.policy}: {exc}") from None
        return {"model_version": model_version_name(info.model_version)}

    # ---- /predict ----------------------------------------------------------------------

    async def predict(self, body: dict) -> dict:
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise RequestError(400, "tasks: expected a list of tasks")
        project = _project_id(body.get("project"))
        config = body.get("label_config")
        names = names_from_config(config) if isinstance(config, str) and config else NAMES
        started = time.perf_counter()
        limit = asyncio.Semaphore(self.config.predict_concurrency)

        async def one(index: int, task: Any) -> dict:
            async with limit:
                return await asyncio.to_thread(self._predict_task, index, task, project, names)

        results = await asyncio.gather(*(one(i, task) for i, task in enumerate(tasks)))
        elapsed = time.perf_counter() - started
        log.info("predict: %d tasks in %.1f ms (%.1f ms per task)", len(tasks), 1e3 * elapsed,
                 1e3 * elapsed / max(1, len(tasks)))
        return {"results": results}

    def _predict_task(self, index: int, task: Any, project: str, names: LabelNames) -> dict:
        """One task's prediction, or an empty one with an `error` (a task's own fault must not
        cost the other tasks theirs: Label Studio drops a results list of the wrong length)."""
        task_id = task.get("id") if isinstance(task, dict) else None
        where = f"task {task_id}" if task_id is not None else f"tasks[{index}]"
        try:
            return self._predict_or_raise(task, project, where, names)
        except (RequestError, TokenfeedbackError) as exc:  # not PolicyUnreachable: that fails the request
            message = exc.message if isinstance(exc, RequestError) else str(exc)
            log.warning("predict: %s: %s", where, message)
            return {"result": [], "score": 0.0, "model_version": "", "error": f"{where}: {message}", "task": task_id}

    def _predict_or_raise(self, task: Any, project: str, where: str, names: LabelNames) -> dict:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise RequestError(400, "task has no `data` object")
        data = task["data"]
        key = names.completion_key
        completion = data.get(key)
        prompt = data.get("prompt", "")
        if not isinstance(prompt, str) or not isinstance(completion, str | None):
            raise RequestError(400, f"data.prompt and data.{key} must be strings")
        if not completion and not prompt:
            raise RequestError(400, f"task has no text: data.{key} and data.prompt are empty")
        try:
            if completion:
                return self._score(data, prompt, completion, names)
            return self._generate(task, data, prompt, project, where, names)
        except TokenfeedbackError as exc:
            if _unreachable(exc):  # the whole request fails: Label Studio stores nothing, can retry
                raise PolicyUnreachable(f"policy server at {self.config.policy} unreachable: {exc}") from None
            raise

    def _score(self, data: dict, prompt: str, completion: str, names: LabelNames) -> dict:
        prompt_ids, completion_ids = data.get("prompt_token_ids"), data.get("completion_token_ids")
        scored = self.policy.score(prompt_ids or prompt, completion_ids or completion)
        if completion_ids and scored.completion_text != completion:
            raise RequestError(400, "data.completion_token_ids decode to "
                               f"{scored.completion_text!r}, not data.completion {completion!r}")
        return prediction(completion, scored.tokens, model_version_name(scored.model_version), self.marks, names)

    def _generate(self, task: dict, data: dict, prompt: str, project: str, where: str, names: LabelNames) -> dict:
        """A prompt-only task: sample a completion, write it (with its token ids, the truth, and
        model version) into the task through Label Studio's API so the annotator labels it, and
        return it with the prediction."""
        done = self.policy.complete(
            data.get("prompt_token_ids") or prompt,
            max_new_tokens=self.config.max_new_tokens,
            temperature=self.config.temperature,
            seed=self.config.seed,
        )
        generated = {
            names.completion_key: done.text,
            "prompt_token_ids": done.prompt_token_ids,
            "completion_token_ids": done.token_ids,
            "model_version": done.model_version,
        }
        item = prediction(done.text, done.tokens, model_version_name(done.model_version), self.marks, names)
        item["completion"] = generated
        item["task_updated"] = self._write_task_data(task, {**data, **generated}, project, where)
        return item

    def _label_studio(self, project: str) -> LabelStudioApi | None:
        """Label Studio's API for a project: the command line's address and token, else /setup's."""
        known = self.projects.get(project, {})
        base = self.config.label_studio_url or known.get("hostname") or ""
        token = self.config.label_studio_token or known.get("access_token") or ""
        return LabelStudioApi(base, token) if base and token else None

    def _write_task_data(self, task: dict, data: dict, project: str, where: str) -> bool:
        api = self._label_studio(project)
        if api is None or task.get("id") is None:
            log.warning("predict: %s: generated a completion but cannot write it into the task (no Label "
                        "Studio address/token from /setup or --label-studio-url/--label-studio-token-file)", where)
            return False
        try:
            api.write_task_data(task["id"], data)
            return True
        except LabelStudioError as exc:
            log.warning("predict: %s: writing the generated completion into the task failed: %s", where, exc)
            return False

    # ---- /webhook ----------------------------------------------------------------------

    async def webhook(self, body: dict) -> dict:
        started = time.perf_counter()
        action = body.get("action")
        if action == "START_TRAINING":
            reply = self.start_training(body)
        elif action in ANNOTATION_SAVED or action in ANNOTATION_DELETED:
            async with self.webhook_lock:
                deadline = time.monotonic() + self.config.webhook_budget
                if action in ANNOTATION_DELETED:
                    reply = await asyncio.to_thread(self._deleted, body, deadline)
                else:
                    reply = await asyncio.to_thread(self._saved_all, body, action, deadline)
        else:
            reply = {"status": "ignored", "action": action}
        reply["elapsed_ms"] = round(1e3 * (time.perf_counter() - started), 2)
        log.info("webhook %s: %s", action, json.dumps(reply, ensure_ascii=False))
        return reply

    def _saved_all(self, body: dict, action: str, deadline: float) -> dict:
        """ANNOTATION_CREATED/UPDATED carry one annotation and its task; ANNOTATIONS_CREATED lists."""
        annotations, tasks = body.get("annotation"), body.get("task")
        project = _project_id(_webhook_project(body))
        if action != "ANNOTATIONS_CREATED":
            return self._saved(tasks, annotations, action, deadline, project)
        if not isinstance(annotations, list) or not isinstance(tasks, list) or len(annotations) != len(tasks):
            raise RequestError(400, "ANNOTATIONS_CREATED: expected equally long `annotation` and `task` lists")
        replies = [self._saved(task, annotation, action, deadline, project)
                   for task, annotation in zip(tasks, annotations, strict=True)]
        return {"status": "ok", "annotations": replies}

    def _saved(self, task: Any, annotation: Any, action: str, deadline: float, project: str) -> dict:
        """Stores one saved annotation; a rejection is remembered and shown in Label Studio, and a
        stored (or skipped) version takes back an earlier version's rejection."""
        if not isinstance(task, dict) or not isinstance(annotation, dict):
            raise RequestError(400, f"{action}: expected `task` and `annotation` objects")
        task_id, annotation_id = task.get("id"), annotation.get("id")
        try:
            reply = self._store(task, annotation, action, deadline)
        except RequestError as exc:
            if task_id is not None and annotation_id is not None:
                self.submissions.reject(annotation_id, task_id, project, exc.message, exc.where.get("region"))
                self.feedback.put((project, str(task_id)))
            raise
        self._unreject(annotation_id, project)
        return reply

    def _store(self, task: dict, annotation: dict, action: str, deadline: float) -> dict:
        task_id, annotation_id = task.get("id"), annotation.get("id")
        where = {"task": task_id, "annotation": annotation_id}
        earlier = self.submissions.active(annotation_id)
        try:
            sequence = labelstudio_sequence(task, annotation, to_name=self.config.to_name or None)
        except Skipped as skip:  # cancelled, or every region removed: nothing to train on any more
            withdrawn = self._withdraw(earlier, deadline, where)
            return {"status": "skipped", "reason": skip.reason, "withdrawn": withdrawn, **where}
        except ConversionError as exc:
            log.warning("webhook %s rejected, nothing submitted: %s", action, exc)
            raise RequestError(400, str(exc), **where) from None
        sequence.metadata["labelstudio_action"] = action
        key = sequence.annotation_id
        try:
            [result] = self.trainer.submit([sequence], timeout=_remaining(deadline))
        except TokenfeedbackError as exc:
            raise self._trainer_error(exc, sequence, where, annotation) from None
        self.submissions.add(key, annotation_id, task_id)
        stale = [old for old in earlier if old != key]
        try:
            withdrawn = self._withdraw(stale, deadline, where)
        except RequestError:  # keep "nothing half-submitted": take the new version back too
            if result.status == trainer_pb2.SUBMIT_STATUS_ACCEPTED:
                try:
                    self.trainer.withdraw([key], timeout=1.0)
                    self.submissions.mark_withdrawn([key])
                except TokenfeedbackError as exc:
                    log.error("webhook %s: task %s annotation %s: %s is stored next to the earlier version "
                              "%s, and withdrawing it failed too: %s", action, task_id, annotation_id, key, stale, exc)
            raise
        status = trainer_pb2.SubmitStatus.Name(result.status).removeprefix("SUBMIT_STATUS_").lower()
        return {"status": status, "annotation_id": key, "rows": result.rows, "withdrawn": withdrawn, **where}

    def _deleted(self, body: dict, deadline: float) -> dict:
        """Label Studio sends only the deleted annotations' ids: withdraw every version stored."""
        annotations = body.get("annotations", body.get("annotation"))
        annotations = [annotations] if isinstance(annotations, dict) else annotations
        if not isinstance(annotations, list) or not all(isinstance(a, dict) and "id" in a for a in annotations):
            raise RequestError(400, "ANNOTATIONS_DELETED: expected `annotations`: [{\"id\": ...}, ...]")
        keys, ids = [], []
        for annotation in annotations:
            ids.append(annotation["id"])
            keys.extend(self.submissions.active(annotation["id"]))
            if annotation.get("updated_at") and isinstance(body.get("task"), dict):  # a full payload names its key
                keys.append(labelstudio_annotation_id(body["task"].get("id"), annotation["id"], annotation["updated_at"]))
        withdrawn = self._withdraw(sorted(set(keys)), deadline, {"annotation": ids})
        for annotation_id in ids:
            self._unreject(annotation_id, _project_id(_webhook_project(body)))
        return {"status": "withdrawn", "withdrawn": withdrawn, "annotation": ids}

    def _withdraw(self, keys: list[str], deadline: float, where: dict) -> int:
        if not keys:
            return 0
        try:
            reply = self.trainer.withdraw(keys, timeout=_remaining(deadline))
        except TokenfeedbackError as exc:
            log.warning("webhook: withdrawing %s (%s) failed: %s", keys, where, exc)
            raise RequestError(503 if _unreachable(exc) else 502,
                               f"trainer at {self.config.trainer}: withdrawing {keys} failed: {exc}", **where) from None
        self.submissions.mark_withdrawn(keys)
        return reply.withdrawn

    def _trainer_error(self, exc: TokenfeedbackError, sequence, where: dict, annotation: dict) -> RequestError:
        """The trainer refused or could not be reached; nothing of the annotation is stored."""
        region = None
        match = _SPAN_FIELD.search(exc.message)  # name the region the trainer's message is about
        if match and int(match.group(1)) < len(sequence.span_labels):
            span = sequence.span_labels[int(match.group(1))]
            region = {"id": _region_id(annotation, span), "start": span.start, "end": span.end, "text": span.text}
        if _unreachable(exc):
            status, message = 503, f"trainer at {self.config.trainer} unreachable: {exc}"
        elif isinstance(exc, InvalidArgumentError):
            status, message = 400, f"trainer rejected the annotation: {exc.message}"
        else:
            status, message = 502, f"trainer at {self.config.trainer}: {exc}"
        log.warning("webhook rejected, nothing submitted: task %s, annotation %s%s: %s", where.get("task"),
                    where.get("annotation"), f", region {region}" if region else "", message)
        return RequestError(status, message, region=region, **where)

    # ---- rejections, shown in Label Studio ----------------------------------------------

    def _unreject(self, annotation_id: Any, project: str) -> None:
        task = None if annotation_id is None else self.submissions.unreject(annotation_id)
        if task is not None:
            self.feedback.put((project, task))

    def _feedback_loop(self) -> None:
        """Writes each queued task's rejections (or "" once none are left) into its data."""
        while (item := self.feedback.get()) is not None:
            project, task = item
            try:
                self._show_rejections(project, task)
            except Exception:  # noqa: BLE001 - a background thread must report, not vanish
                log.exception("writing the rejections of task %s into Label Studio failed", task)

    def _show_rejections(self, project: str, task: str) -> None:
        rejected = self.submissions.rejected(task)
        message = "\n".join(rejection_message(r) for r in rejected)
        project = project or next((r["project"] for r in rejected if r["project"]), "")
        api = self._label_studio(project)
        if api is None:
            why = "not shown in Label Studio: no address/token (from /setup or --label-studio-url/--label-studio-token-file)"
            log.warning("task %s: %s", task, why)
            for r in rejected:
                self.submissions.mark_shown(r["annotation"], why)
            return
        for attempt in range(self.config.feedback_retries):
            try:
                data = api.task(task).get("data") or {}
                if data.get(ERROR_KEY, "") != message and (message or ERROR_KEY in data):
                    api.write_task_data(task, {**data, ERROR_KEY: message})
                shown = f"task data.{ERROR_KEY}"
                break
            except LabelStudioError as exc:
                shown = f"not shown in Label Studio: {exc}"
                if attempt + 1 < self.config.feedback_retries:
                    time.sleep(0.5 * 2**attempt)
        log.info("task %s: %d rejected annotation(s) -> %s", task, len(rejected), shown)
        for r in rejected:
            self.submissions.mark_shown(r["annotation"], shown)

    # ---- training ----------------------------------------------------------------------

    def start_training(self, body: dict) -> dict:
        """START_TRAINING: run the trainer's Train in a background thread; answer at once."""
        with self.training_lock:
            if self.training.get("running"):
                return {"status": "already training", "training": dict(self.training)}
            self.training = {"running": True, "started_at": time.time(), "project": _project_id(
                (body.get("project") or {}).get("id") if isinstance(body.get("project"), dict) else body.get("project"))}
        threading.Thread(target=self._train, name="labelstudio-train", daemon=True).start()
        return {"status": "training started", "steps": self.config.train_steps}

    def _train(self) -> None:
        last = None
        try:
            for progress in self.trainer.train(self.config.train_steps, timeout=None):
                last = progress
                self.training.update(step=progress.step, total_steps=progress.total_steps, loss=progress.loss,
                                     model_version=progress.model_version)
            outcome = {"published_version": last.published_version if last else None,
                       "message": last.message if last else "no progress"}
            log.info("training done: %s", outcome)
        except TokenfeedbackError as exc:
            outcome = {"error": str(exc)}
            log.error("training failed: %s", exc)
        except Exception as exc:  # noqa: BLE001 - a background thread must report, not vanish
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
            log.exception("training failed")
        with self.training_lock:
            self.training.update(running=False, finished_at=time.time(), **outcome)


class PolicyUnreachable(Exception):
    """The policy server cannot be reached: the whole /predict fails (503)."""


def _region_id(annotation: dict, span) -> str | None:
    """The Label Studio region a converted span came from (same offsets, else same text)."""
    labeled = [item for item in annotation.get("result") or [] if isinstance(item, dict) and item.get("type") == "labels"]
    for same in (lambda v: (v.get("start"), v.get("end")) == (span.start, span.end), lambda v: v.get("text") == span.text):
        for item in labeled:
            if same(item.get("value") or {}):
                return item.get("id")
    return None


def rejection_message(rejected: dict) -> str:
    """What the annotator reads in the task: which annotation, why, which region, what to do."""
    region = rejected.get("region") or {}
    where = f" (region {region.get('id')!r}: {region.get('text')!r})" if region.get("id") or region.get("text") else ""
    return (f"tokenfeedback did not store annotation {rejected['annotation']} for training: "
            f"{rejected['error']}{where}. Fix it and update the annotation.")


def _webhook_project(body: dict) -> Any:
    project = body.get("project")
    return project.get("id") if isinstance(project, dict) else project


def model_version_name(version: int) -> str:
    return f"tokenfeedback-v{version}"


def _remaining(deadline: float) -> float:
    return max(0.05, deadline - time.monotonic())


def _project_id(project: Any) -> str:
    """Label Studio sends "<id>.<created unix time>" in /setup and /predict, the id elsewhere."""
    return "" if project is None else str(project).split(".", 1)[0]
