"""Annotation files -> AnnotatedSequence messages: JSONL, Label Studio exports, doccano exports.

Pure functions (no network, no tokenizer): they turn what a labeling tool saved into the proto's
AnnotatedSequence with character-span labels, and leave the span -> token alignment to the trainer
(docs/design.md, "Spans"). What they can check without a tokenizer they check, and
every error names the line, task, annotation and region it is about. The CLI's `annotate` and the
Label Studio ML backend (webhooks) share this one implementation:

    imported = load("export.json")                      # format from the content
    imported = from_labelstudio(json.load(f))           # a Label Studio JSON export (list of tasks)
    sequence = labelstudio_sequence(task, annotation)   # one annotation (what a webhook carries)
    imported = from_doccano(lines)                      # doccano JSONL, [[start, end, "Bad"], ...]
    imported = parse_jsonl(lines)                       # AnnotatedSequence per line, proto JSON

Offsets are Unicode code points, half-open [start, end), into the completion text. A region's own
copy of its text must match the text at its offsets (whitespace runs compared loosely, since
Label Studio's copy can differ around doubled whitespace); when it does not and the text holds
characters outside the Basic Multilingual Plane, the offsets are retried as UTF-16 code units.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format

import tokenfeedback.v1.trainer_pb2 as trainer_pb2

FORMATS = ("jsonl", "labelstudio", "doccano")

# Span label name (compared case-insensitively) -> weight of the span.
DEFAULT_LABEL_WEIGHTS: dict[str, float] = {"bad": -1.0, "good": 1.0}


class ConversionError(ValueError):
    """An annotation that cannot be converted; the message names where it is."""

    def __init__(self, message: str, *, where: str = ""):
        self.where = where
        self.detail = message
        super().__init__(f"{where}: {message}" if where else message)


class Skipped(Exception):
    """An annotation with nothing to submit (cancelled, deleted, no labeled region)."""

    def __init__(self, reason: str, *, where: str = ""):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}" if where else reason)


@dataclass
class Imported:
    """The converted sequences, and what was skipped and why ("task 3, annotation 7: cancelled")."""

    sequences: list[trainer_pb2.AnnotatedSequence] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ---- files ---------------------------------------------------------------------------------


def load(path: str | Path, format: str = "auto", *, label_weights: Mapping[str, float] | None = None) -> Imported:
    """Read an annotation file: format "jsonl" (AnnotatedSequence per line), "labelstudio" (a
    Label Studio JSON export) or "doccano" (doccano JSONL), or "auto" to tell from the content."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConversionError(f"cannot read: {exc.strerror}", where=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConversionError(f"not UTF-8 text: {exc}", where=str(path)) from None
    return loads(text, format, label_weights=label_weights, source=str(path))


def loads(text: str, format: str = "auto", *, label_weights: Mapping[str, float] | None = None,
          source: str = "") -> Imported:
    """`load` for text already read (stdin, an HTTP body); `source` names it in errors."""
    if format == "auto":
        format = detect_format(text, where=source)
    weights = label_weights or DEFAULT_LABEL_WEIGHTS
    if format == "jsonl":
        return parse_jsonl(text.splitlines(), source=source)
    if format == "labelstudio":
        return from_labelstudio(_parse_json(text, source), label_weights=weights)
    if format == "doccano":
        return from_doccano(text.splitlines(), label_weights=weights, source=source)
    raise ConversionError(f"unknown format {format!r}; one of {FORMATS} or 'auto'", where=source)


def detect_format(text: str, *, where: str = "") -> str:
    """A Label Studio export is one JSON array (or task object) with `data`; JSONL whose first
    record has `text` and `label`/`entities` is doccano; other JSONL is AnnotatedSequences."""
    stripped = text.lstrip()
    if not stripped:
        raise ConversionError("empty file", where=where)
    if stripped.startswith("["):
        return "labelstudio"
    first = stripped.splitlines()[0]
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        record = None
    if record is None:  # a pretty-printed single object
        record = _parse_json(text, where)
    if not isinstance(record, dict):
        raise ConversionError("cannot tell the format: expected JSON objects", where=where)
    if "data" in record and ("annotations" in record or "completions" in record or "id" in record):
        return "labelstudio"
    if "text" in record and ("label" in record or "entities" in record):
        return "doccano"
    return "jsonl"


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"not valid JSON: {exc}", where=where) from None


# ---- JSONL of AnnotatedSequence ---------------------------------------------------------------


def parse_jsonl(lines: Iterable[str], *, source: str = "") -> Imported:
    """One AnnotatedSequence per line in the proto's JSON mapping (camelCase or original field
    names); blank lines are ignored. Unknown fields are an error (a typo would lose data)."""
    imported = Imported()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}" if source else f"line {number}"
        try:
            imported.sequences.append(json_format.Parse(line, trainer_pb2.AnnotatedSequence()))
        except json_format.ParseError as exc:
            raise ConversionError(f"not an AnnotatedSequence: {exc}", where=where) from None
    return imported


# ---- Label Studio ------------------------------------------------------------------------------


def from_labelstudio(
    export: list | Mapping,
    *,
    label_weights: Mapping[str, float] | None = None,
    to_name: str | None = None,
) -> Imported:
    """A Label Studio JSON export (a list of tasks, each with `data` and `annotations`) -> one
    sequence per annotation. Cancelled and deleted annotations, and ones without a labeled
    region, are skipped (listed in `skipped`). See `labelstudio_sequence` for the rules."""
    tasks = [export] if isinstance(export, Mapping) else export
    if not isinstance(tasks, list):
        raise ConversionError(f"a Label Studio export is a list of tasks, got {type(export).__name__}")
    imported = Imported()
    for index, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            raise ConversionError(f"expected a task object, got {type(task).__name__}", where=f"tasks[{index}]")
        annotations = task.get("annotations", task.get("completions")) or []
        if not annotations:
            imported.skipped.append(f"{_task_where(task, index)}: no annotations")
        for annotation in annotations:
            try:
                imported.sequences.append(
                    labelstudio_sequence(task, annotation, label_weights=label_weights, to_name=to_name, index=index)
                )
            except Skipped as skip:
                imported.skipped.append(str(skip))
    return imported


def labelstudio_sequence(
    task: Mapping,
    annotation: Mapping,
    *,
    label_weights: Mapping[str, float] | None = None,
    to_name: str | None = None,
    index: int | None = None,
) -> trainer_pb2.AnnotatedSequence:
    """One Label Studio annotation of one task -> an AnnotatedSequence with span labels.

    - Text: `data.completion` (else `data.text`) is the completion the regions mark; `data.prompt`
      (else "") the prompt. `data.completion_token_ids` / `data.prompt_token_ids` /
      `data.model_version`, when present (a task made from a generation), are sent as the truth.
    - Regions: `labels` results with label Bad / Good (weights from `label_weights`); a
      `textarea` result with the same region `id` gives the replacement text. `to_name`, when
      given, keeps only the regions on that Text tag.
    - annotation_id: "ls-<task id>-<annotation id>-<updated_at>", so an updated annotation is a
      new one and a re-import of the same one a DUPLICATE.
    Raises Skipped for cancelled/deleted annotations and ones without labeled regions, and
    ConversionError naming the task, annotation and region for anything invalid."""
    weights = _normalized_weights(label_weights)
    task_where = _task_where(task, index)
    annotation_id = annotation.get("id")
    where = f"{task_where}, annotation {annotation_id}"
    if annotation.get("was_cancelled"):
        raise Skipped("cancelled", where=where)
    if annotation.get("is_deleted") or annotation.get("deleted"):
        raise Skipped("deleted", where=where)
    data = task.get("data")
    if not isinstance(data, Mapping):
        raise ConversionError("task has no `data` object", where=task_where)
    text_key = "completion" if "completion" in data else "text"
    completion = data.get(text_key)
    if not isinstance(completion, str) or not completion:
        raise ConversionError("task data has no `completion` or `text` string (the text the regions mark)",
                              where=task_where)
    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        raise ConversionError(f"data.prompt: expected a string, got {type(prompt).__name__}", where=task_where)

    results = annotation.get("result")
    if not isinstance(results, list):
        raise ConversionError("annotation has no `result` list", where=where)
    regions: dict[str, dict] = {}  # region id -> {"label": item, "replacement": str}
    order: list[str] = []
    for number, item in enumerate(results):
        if not isinstance(item, Mapping):
            raise ConversionError(f"result[{number}]: expected an object", where=where)
        kind = item.get("type")
        if kind not in ("labels", "textarea"):
            continue  # other controls (choices, ratings) say nothing about spans
        if to_name is not None and item.get("to_name") != to_name:
            continue
        region_id = str(item.get("id", f"#{number}"))
        region = regions.setdefault(region_id, {})
        if region_id not in order:
            order.append(region_id)
        value = item.get("value") or {}
        if kind == "labels":
            if "label" in region:
                raise ConversionError("two label results share this region id", where=f"{where}, region {region_id!r}")
            region["label"] = value
        else:
            texts = value.get("text")
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or len(texts) != 1 or not isinstance(texts[0], str):
                raise ConversionError(f"replacement: expected one text, got {texts!r}",
                                      where=f"{where}, region {region_id!r}")
            region["replacement"] = texts[0]

    spans = []
    for region_id in order:
        region = regions[region_id]
        region_where = f"{where}, region {region_id!r}"
        if "label" not in region:
            raise ConversionError("a replacement text without a labeled span (its region id matches no labels result)",
                                  where=region_where)
        spans.append(_labelstudio_span(completion, region["label"], region.get("replacement"), weights, region_where))
    if not spans:
        raise Skipped("no labeled region", where=where)

    sequence = trainer_pb2.AnnotatedSequence(
        annotation_id=labelstudio_annotation_id(task.get("id"), annotation_id,
                                                annotation.get("updated_at") or annotation.get("created_at")),
        span_labels=spans,
        annotator_id=_annotator(annotation.get("completed_by")),
        metadata={
            "source": "labelstudio",
            "task_id": str(task.get("id", "")),
            "annotation_id": str(annotation_id or ""),
            "updated_at": str(annotation.get("updated_at") or ""),
        },
    )
    _set_text_or_ids(sequence, data, prompt, completion, task_where)
    return sequence


def labelstudio_annotation_id(task_id: Any, annotation_id: Any, updated_at: Any) -> str:
    """The idempotency key of a Label Studio annotation version: task id + annotation id +
    update time, so editing an annotation yields a new key and resending one a DUPLICATE."""
    parts = ["ls", str(task_id if task_id is not None else "?"), str(annotation_id if annotation_id is not None else "?")]
    if updated_at:
        parts.append(str(updated_at))
    key = "-".join(parts)
    if len(key) > 200:  # the trainer's limit; keep it stable and unique
        key = key[:150] + "-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return key


def _labelstudio_span(text: str, value: Mapping, replacement: str | None, weights: dict[str, float], where: str):
    labels = value.get("labels")
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or len(labels) != 1:
        raise ConversionError(f"expected exactly one label, got {labels!r}", where=where)
    weight = _label_weight(labels[0], weights, where)
    start, end = _int_offsets(value.get("start"), value.get("end"), where)
    quoted = value.get("text")
    start, end = resolve_span(text, start, end, quoted if isinstance(quoted, str) else None, where=where)
    span = trainer_pb2.SpanLabel(start=start, end=end, weight=weight, text=text[start:end])
    if replacement is not None:
        span.replacement_text = replacement
    return span


def _annotator(completed_by: Any) -> str:
    if isinstance(completed_by, Mapping):
        return str(completed_by.get("email") or completed_by.get("id") or "")
    return "" if completed_by is None else str(completed_by)


def _task_where(task: Mapping, index: int | None) -> str:
    if task.get("id") is not None:
        return f"task {task.get('id')}"
    return f"tasks[{index}]" if index is not None else "task"


# ---- doccano -------------------------------------------------------------------------------


def from_doccano(
    lines: Iterable[str], *, label_weights: Mapping[str, float] | None = None, source: str = ""
) -> Imported:
    """doccano's JSONL export for sequence labeling: per line `text` and `label` as
    [[start, end, "Bad"], ...] (or `entities` as [{start_offset, end_offset, label}]); `prompt`
    (else "") and `completion` (else `text`) when the records carry them. Lines without labels
    are skipped. annotation_id: "doccano-<id>-<hash of text and labels>", so a relabeled record
    is a new annotation and an unchanged one a DUPLICATE."""
    weights = _normalized_weights(label_weights)
    imported = Imported()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}" if source else f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConversionError(f"not valid JSON: {exc}", where=where) from None
        if not isinstance(record, Mapping):
            raise ConversionError("expected a JSON object", where=where)
        if record.get("id") is not None:
            where += f" (id {record['id']})"
        completion = record.get("completion", record.get("text"))
        if not isinstance(completion, str) or not completion:
            raise ConversionError("no `text` string", where=where)
        prompt = record.get("prompt", "")
        if not isinstance(prompt, str):
            raise ConversionError(f"prompt: expected a string, got {type(prompt).__name__}", where=where)
        spans = [
            _doccano_span(completion, entry, weights, f"{where}, label[{i}]")
            for i, entry in enumerate(_doccano_labels(record, where))
        ]
        if not spans:
            imported.skipped.append(f"{where}: no labels")
            continue
        digest = hashlib.sha256(
            json.dumps([prompt, completion, [(s.start, s.end, s.weight) for s in spans]]).encode()
        ).hexdigest()[:16]
        sequence = trainer_pb2.AnnotatedSequence(
            annotation_id=f"doccano-{record['id']}-{digest}" if record.get("id") is not None else f"doccano-{digest}",
            span_labels=spans,
            metadata={"source": "doccano", "id": str(record.get("id", ""))},
        )
        _set_text_or_ids(sequence, record, prompt, completion, where)
        imported.sequences.append(sequence)
    return imported


def _doccano_labels(record: Mapping, where: str) -> list:
    if "entities" in record:
        entities = record["entities"] or []
        if not isinstance(entities, list):
            raise ConversionError("entities: expected a list", where=where)
        out = []
        for i, entity in enumerate(entities):
            if not isinstance(entity, Mapping):
                raise ConversionError(f"entities[{i}]: expected an object", where=where)
            out.append([entity.get("start_offset"), entity.get("end_offset"), entity.get("label")])
        return out
    labels = record.get("label", []) or []
    if not isinstance(labels, list):
        raise ConversionError("label: expected a list of [start, end, label]", where=where)
    return labels


def _doccano_span(text: str, entry: Any, weights: dict[str, float], where: str):
    if not isinstance(entry, list | tuple) or len(entry) != 3:
        raise ConversionError(f"expected [start, end, label], got {entry!r}", where=where)
    start, end = _int_offsets(entry[0], entry[1], where)
    start, end = resolve_span(text, start, end, None, where=where)
    weight = _label_weight(entry[2], weights, where)
    return trainer_pb2.SpanLabel(start=start, end=end, weight=weight, text=text[start:end])


# ---- shared rules --------------------------------------------------------------------------


def resolve_span(text: str, start: int, end: int, quoted: str | None, *, where: str = "") -> tuple[int, int]:
    """Check a span against the text and return its code-point offsets. The offsets must lie in
    [0, len(text)] with start < end; when the tool's own copy `quoted` is given it must match the
    text there (whitespace runs compared loosely). On a mismatch in a text with characters outside
    the BMP, the offsets are retried as UTF-16 code units (docs/design.md, "Spans")."""
    if not 0 <= start < end <= len(text):
        raise ConversionError(f"offsets [{start}, {end}) outside the text (length {len(text)} code points) "
                              "or empty", where=where)
    if quoted is None or _same_text(text[start:end], quoted):
        return start, end
    if any(ord(c) > 0xFFFF for c in text):
        converted = _utf16_to_code_points(text, start, end)
        if converted is not None and _same_text(text[converted[0]:converted[1]], quoted):
            return converted
    raise ConversionError(
        f"the region's text {quoted!r} disagrees with the text at [{start}, {end}): {text[start:end]!r}", where=where
    )


def _same_text(actual: str, quoted: str) -> bool:
    return actual == quoted or " ".join(actual.split()) == " ".join(quoted.split())


def _utf16_to_code_points(text: str, start: int, end: int) -> tuple[int, int] | None:
    """UTF-16 unit offsets -> code-point offsets; None if one falls inside a surrogate pair or
    past the end."""
    positions = {0: 0}
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        positions[units] = index + 1
    if start not in positions or end not in positions or positions[start] >= positions[end]:
        return None
    return positions[start], positions[end]


def _int_offsets(start: Any, end: Any, where: str) -> tuple[int, int]:
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConversionError(f"{name}: expected an integer offset, got {value!r}", where=where)
    return start, end


def _normalized_weights(label_weights: Mapping[str, float] | None) -> dict[str, float]:
    return {k.lower(): float(v) for k, v in (label_weights or DEFAULT_LABEL_WEIGHTS).items()}


def _label_weight(label: Any, weights: dict[str, float], where: str) -> float:
    if not isinstance(label, str) or label.lower() not in weights:
        raise ConversionError(f"unknown label {label!r}; known: {sorted(weights)}", where=where)
    return weights[label.lower()]


def _set_text_or_ids(sequence, data: Mapping, prompt: str, completion: str, where: str) -> None:
    """Prompt and completion as token ids when the record carries them (the sampled ids are the
    truth), else as text for the trainer to tokenize; model_version when given."""
    for name in ("prompt_token_ids", "completion_token_ids"):
        ids = data.get(name)
        if ids is None:
            continue
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConversionError(f"data.{name}: expected a list of token ids", where=where)
        getattr(sequence, name).extend(ids)
    if not sequence.prompt_token_ids:
        sequence.prompt_text = prompt
    if not sequence.completion_token_ids:
        sequence.completion_text = completion
    version = data.get("model_version")
    if version is not None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ConversionError(f"data.model_version: expected a non-negative integer, got {version!r}", where=where)
        sequence.model_version = version
