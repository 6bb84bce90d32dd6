"""Conversion of labeling-tool exports into AnnotatedSequence messages (pure, no servers).

Hand-written Label Studio and doccano payloads, shaped like the tools' real exports, including
emoji (outside the BMP, two UTF-16 units) and CJK text, overlapping regions, a Good region over
several words, a Bad region with a replacement, cancelled annotations and invalid regions.
"""

from __future__ import annotations

import json

import pytest

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from tokenfeedback.imports import (
    ConversionError,
    Skipped,
    detect_format,
    from_doccano,
    from_labelstudio,
    labelstudio_annotation_id,
    labelstudio_sequence,
    load,
    loads,
    parse_jsonl,
    resolve_span,
)

PROMPT = "The capital of Canada is"
COMPLETION = " Paris, a city of 🌸 and 東京 food."


def region(rid, start, end, label, text=None, to_name="text"):
    value = {"start": start, "end": end, "labels": [label]}
    if text is not None:
        value["text"] = text
    return {"id": rid, "from_name": "label", "to_name": to_name, "type": "labels", "value": value}


def textarea(rid, text, start=None, end=None):
    value = {"text": [text]}
    if start is not None:
        value |= {"start": start, "end": end}
    return {"id": rid, "from_name": "replacement", "to_name": "text", "type": "textarea", "value": value}


def task(results, *, task_id=17, annotation_id=5, updated_at="2026-01-02T03:04:05.123456Z", data=None, **extra):
    return {
        "id": task_id,
        "data": data or {"prompt": PROMPT, "completion": COMPLETION},
        "annotations": [{"id": annotation_id, "completed_by": 1, "result": results, "was_cancelled": False,
                         "updated_at": updated_at, "created_at": "2026-01-01T00:00:00Z", **extra}],
        "predictions": [],
    }


def span_tuple(span: trainer_pb2.SpanLabel):
    return (span.start, span.end, span.weight, span.text,
            span.replacement_text if span.HasField("replacement_text") else None)


def test_bad_region_with_replacement_and_good_region():
    paris = COMPLETION.index("Paris")
    city = COMPLETION.index("a city")
    imported = from_labelstudio([task([
        region("r1", paris, paris + 5, "Bad", "Paris"),
        textarea("r1", "Ottawa", paris, paris + 5),
        region("r2", city, city + 6, "Good", "a city"),
    ])])
    assert imported.skipped == []
    [seq] = imported.sequences
    assert seq.annotation_id == "ls-17-5-2026-01-02T03:04:05.123456Z"
    assert seq.prompt_text == PROMPT and seq.completion_text == COMPLETION
    assert not seq.prompt_token_ids and not seq.completion_token_ids
    assert [span_tuple(s) for s in seq.span_labels] == [
        (paris, paris + 5, -1.0, "Paris", "Ottawa"),
        (city, city + 6, 1.0, "a city", None),
    ]
    assert seq.annotator_id == "1"
    assert dict(seq.metadata) == {"source": "labelstudio", "task_id": "17", "annotation_id": "5",
                                  "updated_at": "2026-01-02T03:04:05.123456Z"}


@pytest.mark.parametrize("needle", ["🌸", "東京", "東", " food."])
def test_code_point_offsets_over_emoji_and_cjk(needle):
    start = COMPLETION.index(needle)
    [seq] = from_labelstudio([task([region("r", start, start + len(needle), "Bad", needle)])]).sequences
    [span] = seq.span_labels
    assert (span.start, span.end, span.text) == (start, start + len(needle), needle)


def test_utf16_offsets_are_retried_when_the_text_has_emoji():
    needle = "東京"  # after the emoji, so its UTF-16 offsets are one more than its code-point offsets
    start = COMPLETION.index(needle)
    utf16_start = len(COMPLETION[:start].encode("utf-16-le")) // 2
    assert utf16_start == start + 1
    [seq] = from_labelstudio([task([region("r", utf16_start, utf16_start + 2, "Bad", needle)])]).sequences
    assert (seq.span_labels[0].start, seq.span_labels[0].end) == (start, start + 2)


def test_no_utf16_retry_without_characters_outside_the_bmp():
    text = " Paris is 東京."
    with pytest.raises(ConversionError, match="disagrees"):
        resolve_span(text, 1, 6, "aris ")


def test_doubled_whitespace_in_the_region_copy_is_tolerated():
    data = {"prompt": PROMPT, "completion": " Paris,  a  city."}
    [seq] = from_labelstudio([task([region("r", 1, 16, "Bad", "Paris, a city")], data=data)]).sequences
    assert seq.span_labels[0].text == "Paris,  a  city"  # the exact text at the offsets is sent


def test_overlapping_regions_are_kept_for_the_trainer_to_merge():
    paris = COMPLETION.index("Paris")
    [seq] = from_labelstudio([task([
        region("a", paris, paris + 5, "Bad", "Paris"),
        region("b", paris + 2, paris + 12, "Bad", COMPLETION[paris + 2:paris + 12]),
    ])]).sequences
    assert [(s.start, s.end, s.weight) for s in seq.span_labels] == [
        (paris, paris + 5, -1.0), (paris + 2, paris + 12, -1.0)]


def test_region_text_disagreeing_with_offsets_names_task_annotation_region():
    with pytest.raises(ConversionError) as info:
        from_labelstudio([task([region("abc", 1, 6, "Bad", "Rome!")])])
    message = str(info.value)
    assert "task 17" in message and "annotation 5" in message and "'abc'" in message and "Rome!" in message


@pytest.mark.parametrize("start,end", [(-1, 3), (3, 3), (5, 2), (0, len(COMPLETION) + 1)])
def test_offsets_outside_the_text(start, end):
    with pytest.raises(ConversionError, match="outside the text"):
        from_labelstudio([task([region("r", start, end, "Bad")])])


def test_unknown_label_and_custom_weights():
    with pytest.raises(ConversionError, match="unknown label 'Meh'"):
        from_labelstudio([task([region("r", 1, 6, "Meh", "Paris")])])
    [seq] = from_labelstudio([task([region("r", 1, 6, "Meh", "Paris")])], label_weights={"Meh": -0.5}).sequences
    assert seq.span_labels[0].weight == -0.5


def test_labels_are_case_insensitive():
    [seq] = from_labelstudio([task([region("r", 1, 6, "bad", "Paris")])]).sequences
    assert seq.span_labels[0].weight == -1.0


def test_replacement_without_a_labeled_region_is_an_error():
    with pytest.raises(ConversionError, match="replacement text without a labeled span"):
        from_labelstudio([task([region("r", 1, 6, "Bad", "Paris"), textarea("zzz", "Ottawa")])])


def test_cancelled_deleted_empty_annotations_and_tasks_are_skipped():
    export = [
        task([region("r", 1, 6, "Bad", "Paris")], task_id=1, was_cancelled=True),
        task([region("r", 1, 6, "Bad", "Paris")], task_id=2, is_deleted=True),
        task([], task_id=3),
        {"id": 4, "data": {"completion": COMPLETION}, "annotations": []},
        task([region("r", 1, 6, "Bad", "Paris")], task_id=5),
    ]
    imported = from_labelstudio(export)
    assert [s.metadata["task_id"] for s in imported.sequences] == ["5"]
    assert imported.skipped == ["task 1, annotation 5: cancelled", "task 2, annotation 5: deleted",
                                "task 3, annotation 5: no labeled region", "task 4: no annotations"]
    with pytest.raises(Skipped, match="cancelled"):
        labelstudio_sequence(export[0], export[0]["annotations"][0])


def test_task_with_text_only_and_generated_ids():
    data = {"text": " Paris.", "prompt_token_ids": [1, 2, 3], "completion_token_ids": [7, 8], "model_version": 3}
    [seq] = from_labelstudio([task([region("r", 1, 6, "Bad", "Paris")], data=data)]).sequences
    assert list(seq.prompt_token_ids) == [1, 2, 3] and list(seq.completion_token_ids) == [7, 8]
    assert seq.completion_text == "" and seq.prompt_text == "" and seq.model_version == 3
    [seq] = from_labelstudio([task([region("r", 1, 6, "Bad", "Paris")], data={"text": " Paris."})]).sequences
    assert (seq.prompt_text, seq.completion_text) == ("", " Paris.")


def test_task_without_text_is_an_error_naming_the_task():
    with pytest.raises(ConversionError, match="task 17: task data has no `completion` or `text`"):
        from_labelstudio([task([region("r", 1, 6, "Bad")], data={"prompt": "x"})])


def test_to_name_keeps_only_regions_on_that_text():
    results = [region("p", 0, 3, "Bad", to_name="prompt"), region("c", 1, 6, "Bad", "Paris", to_name="completion")]
    [seq] = from_labelstudio([task(results)], to_name="completion").sequences
    assert [(s.start, s.end) for s in seq.span_labels] == [(1, 6)]


def test_other_controls_are_ignored():
    choice = {"id": "x", "from_name": "quality", "to_name": "text", "type": "choices", "value": {"choices": ["ok"]}}
    [seq] = from_labelstudio([task([choice, region("r", 1, 6, "Good", "Paris")])]).sequences
    assert len(seq.span_labels) == 1


def test_annotation_id_changes_with_updated_at_and_stays_within_limits():
    a = labelstudio_annotation_id(1, 2, "2026-01-01T00:00:00Z")
    b = labelstudio_annotation_id(1, 2, "2026-01-01T00:00:01Z")
    assert a != b and a == labelstudio_annotation_id(1, 2, "2026-01-01T00:00:00Z")
    long = labelstudio_annotation_id("t" * 300, 2, "x")
    assert len(long) <= 200 and long != labelstudio_annotation_id("t" * 301, 2, "x")


def test_webhook_shaped_single_annotation():
    """What the ML backend gets: a task and one annotation, converted on their own."""
    t = task([region("r", 1, 6, "Bad", "Paris"), textarea("r", "Ottawa")])
    seq = labelstudio_sequence({k: v for k, v in t.items() if k != "annotations"}, t["annotations"][0])
    assert seq.span_labels[0].replacement_text == "Ottawa"


# ---- doccano ---------------------------------------------------------------------------------


def test_doccano_label_triples_and_entities():
    text = " Paris is the capital of 🇨🇦 Canada 東京"
    flag = text.index("🇨🇦")
    lines = [
        json.dumps({"id": 1, "text": text, "label": [[1, 6, "Bad"], [flag, flag + 2, "Good"]]}, ensure_ascii=False),
        "",
        json.dumps({"id": 2, "prompt": "Q:", "text": text,
                    "entities": [{"id": 9, "start_offset": 1, "end_offset": 6, "label": "Good"}]}),
        json.dumps({"id": 3, "text": text, "label": []}),
    ]
    imported = from_doccano(lines, source="x.jsonl")
    first, second = imported.sequences
    assert [(s.start, s.end, s.weight, s.text) for s in first.span_labels] == [
        (1, 6, -1.0, "Paris"), (flag, flag + 2, 1.0, "🇨🇦")]
    assert first.completion_text == text and first.prompt_text == ""
    assert second.prompt_text == "Q:" and second.span_labels[0].weight == 1.0
    assert first.annotation_id.startswith("doccano-1-") and second.annotation_id.startswith("doccano-2-")
    assert imported.skipped == ["x.jsonl:4 (id 3): no labels"]


def test_doccano_annotation_id_is_stable_and_follows_the_labels():
    def ids(label):
        line = json.dumps({"id": 1, "text": " Paris x", "label": label})
        return from_doccano([line]).sequences[0].annotation_id

    assert ids([[1, 6, "Bad"]]) == ids([[1, 6, "Bad"]])
    assert ids([[1, 6, "Bad"]]) != ids([[1, 6, "Good"]])


@pytest.mark.parametrize("record,message", [
    ({"id": 7, "text": "abc", "label": [[0, 9, "Bad"]]}, r"line 1 \(id 7\), label\[0\]: offsets \[0, 9\)"),
    ({"id": 7, "text": "abc", "label": [[0, 1]]}, r"expected \[start, end, label\]"),
    ({"id": 7, "text": "abc", "label": [["0", 1, "Bad"]]}, "start: expected an integer"),
    ({"id": 7, "label": [[0, 1, "Bad"]]}, "no `text`"),
    ({"id": 7, "text": "abc", "label": [[0, 1, "Other"]]}, "unknown label"),
])
def test_doccano_errors_name_the_line(record, message):
    with pytest.raises(ConversionError, match=message):
        from_doccano([json.dumps(record)])


# ---- JSONL and files -------------------------------------------------------------------------


def test_jsonl_accepts_proto_json_in_both_spellings():
    lines = [
        '{"annotationId": "a", "promptText": "Q", "completionTokenIds": [1, 2], '
        '"tokenLabels": [{"position": 1, "weight": -1, "replacementTokenId": 5}], "sequenceReward": 0.5}',
        '{"annotation_id": "b", "prompt_token_ids": [3], "completion_text": " x", '
        '"span_labels": [{"start": 1, "end": 2, "weight": 1, "replacement_text": "y"}]}',
    ]
    a, b = parse_jsonl(lines).sequences
    assert a.annotation_id == "a" and a.token_labels[0].replacement_token_id == 5 and a.sequence_reward == 0.5
    assert b.span_labels[0].replacement_text == "y" and list(b.prompt_token_ids) == [3]


def test_jsonl_errors_name_the_line():
    with pytest.raises(ConversionError, match=r"f.jsonl:2: not an AnnotatedSequence"):
        parse_jsonl(['{"annotationId": "a"}', '{"annotationId": "b", "typo": 1}'], source="f.jsonl")


@pytest.mark.parametrize("content,expected", [
    ('[{"id": 1, "data": {"text": "x"}, "annotations": []}]', "labelstudio"),
    ('{\n  "id": 1,\n  "data": {"text": "x"},\n  "annotations": []\n}', "labelstudio"),
    ('{"id": 1, "text": "x", "label": [[0, 1, "Bad"]]}\n', "doccano"),
    ('{"id": 1, "text": "x", "entities": []}\n', "doccano"),
    ('{"annotationId": "a", "promptText": "x"}\n', "jsonl"),
])
def test_detect_format(content, expected):
    assert detect_format(content) == expected


def test_load_reads_files_in_every_format(tmp_path):
    ls = tmp_path / "export.json"
    ls.write_text(json.dumps([task([region("r", 1, 6, "Bad", "Paris")])], ensure_ascii=False), encoding="utf-8")
    dc = tmp_path / "doccano.jsonl"
    dc.write_text(json.dumps({"id": 1, "text": "🌸 Paris", "label": [[2, 7, "Bad"]]}) + "\n", encoding="utf-8")
    jl = tmp_path / "seqs.jsonl"
    jl.write_text('{"annotationId": "a", "promptText": "Q", "completionText": " A", "sequenceReward": 1}\n')
    assert load(ls).sequences[0].span_labels[0].text == "Paris"
    assert load(dc).sequences[0].span_labels[0].text == "Paris"
    assert load(jl, "jsonl").sequences[0].annotation_id == "a"
    assert loads(ls.read_text(encoding="utf-8"), "labelstudio").sequences[0].completion_text == COMPLETION
    with pytest.raises(ConversionError, match="cannot read"):
        load(tmp_path / "missing.json")
    with pytest.raises(ConversionError, match="unknown format"):
        load(ls, "csv")
