"""common/spans.py: pieces of ids, span resolution (code points, UTF-16 retry) and alignment."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from common.errors import InvalidArgument
from common.spans import (
    IncrementalDecoder,
    Piece,
    Span,
    align_spans,
    pieces_from_ids,
    pieces_from_text,
    replacement_row,
    resolve_span,
    span_token_weights,
    utf16_to_codepoints,
)

TEXTS = [
    "Ottawa is the capital of Canada.",
    "  two leading spaces\nand a newline\n\n",
    "ß straße 🎉🎉 señor ∑ 漢 z",  # characters the tiny tokenizer splits into byte tokens
    "😀",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def check_pieces(text: str, pieces: list[Piece]) -> None:
    """Pieces tile the text: contiguous, each piece's text is the text at its span."""
    end = 0
    for piece in pieces:
        assert piece.char_start == end, pieces
        assert text[piece.char_start : piece.char_end] == piece.text
        end = piece.char_end
    assert end == len(text)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_tile_the_text(tokenizer, text):
    ids, pieces = pieces_from_text(tokenizer, text)
    check_pieces(text, pieces)
    assert [p.token_id for p in pieces] == ids
    decoded, again = pieces_from_ids(tokenizer, ids)
    assert decoded == text and again == pieces


def test_split_character_goes_to_the_completing_token(tokenizer):
    ids, pieces = pieces_from_text(tokenizer, "🎉")
    assert len(ids) > 1, "the tiny tokenizer should split this emoji into byte tokens"
    assert [p.text for p in pieces] == [""] * (len(ids) - 1) + ["🎉"]
    assert all(p.char_start == 0 for p in pieces)


def test_random_ids_decode_consistently(tokenizer):
    """Whatever a model samples (random byte tokens, invalid UTF-8, specials), the pieces tile
    the decoded text and the final flush leaves nothing behind."""
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        text, pieces = pieces_from_ids(tokenizer, ids)
        check_pieces(text, pieces)
        assert text == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for piece in pieces:
            if piece.token_id == tokenizer.eos_token_id:
                assert piece.special and piece.text == ""


def test_decoder_with_context(tokenizer):
    prompt = tokenizer("Paris is the")["input_ids"]
    completion = tokenizer(" capital of 🎉 France")["input_ids"]
    decoder = IncrementalDecoder(tokenizer, prompt)
    pieces = [decoder.push(t, final=i == len(completion) - 1) for i, t in enumerate(completion)]
    assert decoder.text == " capital of 🎉 France"
    check_pieces(decoder.text, pieces)


def test_utf16_conversion():
    text = "a😀b"
    assert [utf16_to_codepoints(text, o) for o in range(5)] == [0, 1, None, 2, 3]
    assert utf16_to_codepoints(text, 5) is None


@pytest.mark.parametrize(
    "text,span,expected",
    [
        ("hello world", Span(6, 11), (6, 11)),
        ("hello world", Span(6, 11, "world"), (6, 11)),
        ("😀 Paris is", Span(2, 7, "Paris"), (2, 7)),  # code points agree: no retry
        ("😀 Paris is", Span(3, 8, "Paris"), (2, 7)),  # UTF-16 units, retried
        ("😀😀 x 😀", Span(7, 9, "😀"), (5, 6)),  # UTF-16 end beyond the code-point length
    ],
)
def test_resolve_span(text, span, expected):
    assert resolve_span(text, span) == expected


@pytest.mark.parametrize(
    "text,span,field",
    [
        ("hello", Span(3, 3), "spans[0].start"),
        ("hello", Span(-1, 2), "spans[0].start"),
        ("hello", Span(2, 9), "spans[0].end"),
        ("hello world", Span(0, 5, "world"), "spans[0].text"),  # BMP only: no UTF-16 retry
        ("😀 Paris", Span(2, 6, "Lyon"), "spans[0].text"),
        ("😀 Paris", Span(3, 8, "Lyon"), "spans[0].end"),
    ],
)
def test_bad_spans_are_named(text, span, field):
    with pytest.raises(InvalidArgument) as err:
        align_spans(text, [], [span])
    assert err.value.field == field


def test_overlap_ignores_leading_whitespace():
    text = "Paris is the capital of Canada."
    pieces = [Piece(i, t, s, s + len(t)) for i, (t, s) in enumerate(
        [("Paris", 0), (" is", 5), (" the", 8), (" capital", 12), (" of", 20), (" Canada", 23), (".", 30)])]
    span = lambda s, e: align_spans(text, pieces, [Span(s, e)])[0].token_positions  # noqa: E731
    assert span(24, 30) == (5,)  # "Canada"
    assert span(23, 30) == (5,)  # " Canada": the space before belongs to no one's span
    assert span(22, 25) == (4, 5)  # "f C"
    assert span(22, 24) == (4,)  # "f "
    assert span(23, 24) == ()  # only the leading space of " Canada"
    assert span(0, 31) == tuple(range(7))


def test_zero_width_and_special_tokens():
    text = "a 🎉"
    pieces = [Piece(0, "a", 0, 1), Piece(1, "", 1, 1), Piece(2, " ", 1, 2), Piece(3, "", 2, 2),
              Piece(4, "🎉", 2, 3), Piece(9, "", 3, 3, special=True)]
    assert align_spans(text, pieces, [Span(2, 3)])[0].token_positions == (3, 4)
    assert align_spans(text, pieces, [Span(0, 3)])[0].token_positions == (0, 1, 2, 3, 4)
    assert align_spans(text, pieces, [Span(1, 2)])[0].token_positions == (1, 2)  # whitespace-only token


def test_real_alignment(tokenizer):
    text = "Paris is the capital of Canada."
    ids, pieces = pieces_from_text(tokenizer, text)
    [alignment] = align_spans(text, pieces, [Span(24, 30, "Canada")])
    covered = "".join(pieces[i].text for i in alignment.token_positions)
    assert covered.strip() == "Canada"


def test_span_token_weights():
    assert span_token_weights([3, 4, 5], 1.0) == [(3, 1.0), (4, 1.0), (5, 1.0)]
    assert span_token_weights([3, 4, 5], -1.0) == [(3, -1.0)]
    assert span_token_weights([3, 4], -2.0, later_share=0.25) == [(3, -2.0), (4, -0.5)]
    assert span_token_weights([], -1.0) == []


def test_replacement_row(tokenizer):
    text = "Paris is the capital of Canada."
    ids, pieces = pieces_from_text(tokenizer, text)
    position, token = replacement_row(tokenizer, text, pieces, ids, 24, 30, "France")
    corrected = tokenizer("Paris is the capital of France.", add_special_tokens=False)["input_ids"]
    assert ids[:position] == corrected[:position] and corrected[position] == token != ids[position]
    assert replacement_row(tokenizer, text, pieces, ids, 24, 30, "Canada") is None
