"""Which tokens /predict pre-marks, on hand-made scored tokens (no server)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from tokenfeedback.imports import labelstudio_sequence
from tokenfeedback.labelstudio import NAMES, label_config
from tokenfeedback.labelstudio.config import names_from_config
from tokenfeedback.labelstudio.predict import (
    MarkOptions,
    bad_region,
    prediction,
    suspicious_tokens,
    visible_span,
)


@dataclass
class Piece:
    position: int
    token_id: int
    text: str
    char_start: int
    char_end: int
    logprob: float


def pieces(text_pieces: list[str], probs: list[float]) -> tuple[str, list[Piece]]:
    """Tokens covering the concatenated text, with the given probabilities."""
    out, offset = [], 0
    for i, (piece, prob) in enumerate(zip(text_pieces, probs, strict=True)):
        out.append(Piece(i, 100 + i, piece, offset, offset + len(piece), math.log(prob)))
        offset += len(piece)
    return "".join(text_pieces), out


CAPITAL = ([" Ottawa", ",", " the", " capital", " of", " Canada", "."], [0.5, 0.9, 0.8, 0.6, 0.95, 0.01, 0.7])


def test_least_likely_token_is_marked_bad_without_its_leading_space():
    text, tokens = pieces(*CAPITAL)
    item = prediction(text, tokens, "tokenfeedback-v0", MarkOptions(threshold=0.1, max_marks=3))
    [region] = item["result"]
    assert region["value"]["text"] == "Canada"
    assert text[region["value"]["start"]:region["value"]["end"]] == "Canada"
    assert region["value"]["labels"] == [NAMES.bad]
    assert (region["from_name"], region["to_name"], region["type"]) == (NAMES.labels, NAMES.completion, "labels")
    assert region["score"] == pytest.approx(0.01, rel=1e-6)
    assert item["score"] == pytest.approx(0.01, rel=1e-6)  # the task's least likely token
    assert item["model_version"] == "tokenfeedback-v0"


@pytest.mark.parametrize(
    ("threshold", "max_marks", "expected"),
    [
        (0.1, 3, ["Canada"]),
        (0.55, 3, ["Ottawa", "Canada"]),
        (0.65, 3, ["Ottawa", "capital", "Canada"]),
        (0.65, 2, ["Ottawa", "Canada"]),  # the two least likely, in text order
        (0.65, 1, ["Canada"]),
        (0.65, 0, []),
        (0.005, 3, []),
        (1.0, 10, ["Ottawa", ",", "the", "capital", "of", "Canada", "."]),
    ],
)
def test_threshold_and_count(threshold, max_marks, expected):
    text, tokens = pieces(*CAPITAL)
    item = prediction(text, tokens, "v", MarkOptions(threshold=threshold, max_marks=max_marks))
    assert [r["value"]["text"] for r in item["result"]] == expected
    starts = [r["value"]["start"] for r in item["result"]]
    assert starts == sorted(starts)
    assert len({r["id"] for r in item["result"]}) == len(expected)


def test_whitespace_only_tokens_are_never_marked():
    text, tokens = pieces(["A", "\n", " ", "B"], [0.9, 0.001, 0.002, 0.5])
    assert [t.text for t in suspicious_tokens(tokens, text, MarkOptions(threshold=0.1, max_marks=5))] == []


@pytest.mark.parametrize(
    ("text_pieces", "bad"),
    [
        (["Café", " au", " lait", " 😀", "!"], " 😀"),
        (["漢", "字", " too"], "字"),
        (["é", "€", "😀", "x"], "😀"),
    ],
)
def test_offsets_are_code_points_over_emoji_and_cjk(text_pieces, bad):
    probs = [0.001 if piece == bad else 0.9 for piece in text_pieces]
    text, tokens = pieces(text_pieces, probs)
    [region] = prediction(text, tokens, "v", MarkOptions())["result"]
    start, end = region["value"]["start"], region["value"]["end"]
    assert text[start:end] == bad.strip() == region["value"]["text"]


def test_tokens_whose_offsets_disagree_with_the_text_are_skipped():
    text, tokens = pieces(*CAPITAL)
    shifted = text[1:]  # the task's text is not the one the offsets index
    assert suspicious_tokens(tokens, shifted, MarkOptions(threshold=1.0, max_marks=10)) == []


def test_options_are_checked():
    for threshold in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            MarkOptions(threshold=threshold)
    with pytest.raises(ValueError, match="max_marks"):
        MarkOptions(max_marks=-1)


def test_visible_span():
    assert visible_span(" Canada.", 0, 7) == (1, 7)
    assert visible_span("a \n b", 1, 4) is None
    assert visible_span("x ", 0, 2) == (0, 1)


def test_an_accepted_prediction_converts_with_the_shared_conversion():
    """What an annotator saves after accepting a prediction (plus a replacement in the shipped
    config's text area) is a valid annotation for the one Label Studio conversion."""
    text, tokens = pieces(*CAPITAL)
    region = bad_region(text, tokens[5])
    replacement = {"id": region["id"], "from_name": NAMES.replacement, "to_name": NAMES.completion,
                   "type": "textarea", "value": {"text": ["France"]}}
    task = {"id": 7, "data": {"prompt": "Ottawa is the capital of", "completion": text}}
    annotation = {"id": 3, "updated_at": "2026-01-01T00:00:00Z", "result": [region, replacement]}
    sequence = labelstudio_sequence(task, annotation, to_name=NAMES.completion)
    [span] = sequence.span_labels
    assert (span.start, span.end, span.text, span.weight) == (text.index("Canada"), len(text) - 1, "Canada", -1.0)
    assert span.replacement_text == "France"
    assert sequence.annotation_id == "ls-7-3-2026-01-01T00:00:00Z"


def test_shipped_config_names_the_tags_the_backend_uses():
    config = label_config()
    for name in (NAMES.prompt, NAMES.completion, NAMES.labels, NAMES.replacement):
        assert f'name="{name}"' in config
    assert 'perRegion="true"' in config
    assert f'value="{NAMES.bad}"' in config and f'value="{NAMES.good}"' in config
    assert "$prompt" in config and "$completion" in config


def test_tag_names_are_read_from_the_projects_config():
    assert names_from_config(label_config()) == NAMES
    plain = ('<View><Labels name="tag" toName="text"><Label value="good"/><Label value="bad"/></Labels>'
             '<Text name="text" value="$text"/><TextArea name="fix" toName="text" perRegion="true"/></View>')
    names = names_from_config(plain)
    assert (names.labels, names.completion, names.completion_key, names.replacement, names.bad, names.good) == (
        "tag", "text", "text", "fix", "bad", "good")
    for unusable in ("<View>", "<View><Text name='t' value='$t'/></View>",
                     '<View><Labels name="l" toName="t"><Label value="PER"/></Labels><Text name="t" value="$t"/></View>'):
        assert names_from_config(unusable) == NAMES
