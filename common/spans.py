"""Characters <-> tokens: text pieces of generated ids, and character spans to token rows.

Used by the policy server (TokenEvent text and spans, Tokenize, AlignSpans), the trainer (spans in
annotations), the Label Studio backend and the labeling page's server side, so that all of them
apply the same rules (DESIGN.md, "Spans from labeling tools"):

- The generated token ids are the truth; character offsets come from decoding them, one token at
  a time (`IncrementalDecoder`). Offsets are Unicode code points, half-open [start, end).
- A token that only starts a multi-byte character adds "" and sits at that character's offset;
  the token that completes the character adds it. Special tokens (EOS, BOS, ...) add "".
- A span whose own copy of its text disagrees with the text at its offsets is retried as UTF-16
  code units, only when the text holds characters outside the Basic Multilingual Plane;
  otherwise it is rejected, naming it.
- A token belongs to a span when their character ranges overlap, ignoring the token's leading
  whitespace (a token of whitespace only keeps its range; a token that adds no characters
  belongs to a span that contains the character it starts; special tokens belong to none).
- A bad span (weight < 0) puts its full weight on its first token and `later_share` of it on the
  later ones; a good span weighs every token (`span_token_weights`).
- A replacement text is tokenized in its context; the first token where the corrected ids differ
  from the sampled ids is the replacement row (`replacement_row`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import InvalidArgument, quote

REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence
CONTEXT_TOKENS = 5  # tokens of left context the decoder re-decodes (enough for SentencePiece's space rules)


@dataclass(frozen=True)
class Piece:
    """One token of a text with the characters it adds (TokenPiece in common.proto)."""

    token_id: int
    text: str  # the characters this token adds; "" for a special token or a partial character
    char_start: int  # code points into the decoded text, half-open
    char_end: int
    special: bool = False  # a special token (EOS, BOS, ...): belongs to no span


def _decode(tokenizer, ids: Sequence[int]) -> str:
    # No clean-up of spaces: the pieces must concatenate to exactly the decoded text.
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def special_ids(tokenizer) -> frozenset[int]:
    return frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])


class IncrementalDecoder:
    """Decodes generated ids one at a time into the characters each adds.

    Re-decodes a small window (the last tokens before the ones not yet emitted) so that the cost
    per token is constant, and holds text back while it ends in an incomplete UTF-8 sequence
    (U+FFFD), so a character split across tokens is emitted whole, by the token that completes it.
    `context_ids` (e.g. the end of the prompt) give the decoder the left context that tokenizers
    which strip a leading space at the start of a text need.
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._special = special_ids(tokenizer)
        self._ids: list[int] = list(context_ids)[-CONTEXT_TOKENS:]
        self._prefix_offset = 0  # start of the re-decoded window
        self._read_offset = len(self._ids)  # first id whose characters are not emitted yet
        self.text = ""  # the completion text so far (concatenation of the emitted pieces)

    def push(self, token_id: int, final: bool = False) -> Piece:
        """Add one generated token; `final` flushes held-back bytes (the stream ends here)."""
        self._ids.append(int(token_id))
        prefix_text = _decode(self.tokenizer, self._ids[self._prefix_offset : self._read_offset])
        new_text = _decode(self.tokenizer, self._ids[self._prefix_offset :])
        delta = ""
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT_CHAR)):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        start = len(self.text)
        self.text += delta
        return Piece(int(token_id), delta, start, len(self.text), int(token_id) in self._special)


def pieces_from_ids(tokenizer, ids: Sequence[int], context_ids: Sequence[int] = ()) -> tuple[str, list[Piece]]:
    """(decoded text, one Piece per id) for token ids, with the generation's decoding rules."""
    decoder = IncrementalDecoder(tokenizer, context_ids)
    pieces = [decoder.push(t, final=(i == len(ids) - 1)) for i, t in enumerate(ids)]
    return decoder.text, pieces


def pieces_from_text(tokenizer, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[Piece]]:
    """Tokenize text; pieces refer to `text` itself.

    When decoding the ids gives back the text (byte-level BPE always does), the pieces are the
    decoded ones, exactly as a generation would show them; otherwise (normalizing tokenizers) the
    tokenizer's own offsets are used, made monotone and non-overlapping.
    """
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = [int(i) for i in encoding["input_ids"]]
    decoded, pieces = pieces_from_ids(tokenizer, ids)
    if decoded == text:
        return ids, pieces
    special = special_ids(tokenizer)
    pieces, end = [], 0
    for token_id, (start, stop) in zip(ids, encoding["offset_mapping"], strict=True):
        start = max(int(start), end)
        stop = max(int(stop), start)
        pieces.append(Piece(token_id, text[start:stop], start, stop, token_id in special))
        end = stop
    return ids, pieces


# ---- spans -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A character span as a labeling tool marks it (CharSpan in common.proto)."""

    start: int
    end: int
    text: str = ""  # the tool's own copy of the spanned text; "" when not given


@dataclass(frozen=True)
class Alignment:
    """The tokens a span covers (SpanAlignment in policy.proto)."""

    token_positions: tuple[int, ...]  # ascending indices into the pieces
    start: int  # the span's code-point offsets as resolved (after a UTF-16 retry)
    end: int


def has_non_bmp(text: str) -> bool:
    return any(ord(ch) > 0xFFFF for ch in text)


def utf16_to_codepoints(text: str, offset: int) -> int | None:
    """Code-point index of a UTF-16 code-unit offset; None when outside the text or inside a
    surrogate pair."""
    units = 0
    for index, ch in enumerate(text):
        if units == offset:
            return index
        if units > offset:
            return None
        units += 2 if ord(ch) > 0xFFFF else 1
    return len(text) if units == offset else None


def resolve_span(text: str, span: Span, field: str = "span") -> tuple[int, int]:
    """The span's code-point offsets, after the UTF-16 retry; InvalidArgument naming the field."""
    start, end = int(span.start), int(span.end)
    in_range = 0 <= start < end <= len(text)
    if in_range and (not span.text or text[start:end] == span.text):
        return start, end
    if span.text and has_non_bmp(text):  # some tools count UTF-16 units
        start16, end16 = utf16_to_codepoints(text, start), utf16_to_codepoints(text, end)
        if start16 is not None and end16 is not None and start16 < end16 and text[start16:end16] == span.text:
            return start16, end16
    if not in_range:
        name = "start" if not 0 <= start < len(text) or start >= end else "end"
        raise InvalidArgument(
            f"[{start}, {end}) is not a span of the text of {len(text)} characters (0 <= start < end <= length)",
            f"{field}.{name}",
        )
    raise InvalidArgument(
        f"the span's text {quote(span.text)} differs from the text at [{start}, {end}): {quote(text[start:end])}",
        f"{field}.text",
    )


def token_overlaps(piece: Piece, start: int, end: int) -> bool:
    """Whether a token belongs to the span [start, end) (rules in the module docstring)."""
    if piece.special:
        return False
    if piece.char_start == piece.char_end:  # starts a character that a later token completes
        return start <= piece.char_start < end
    leading = len(piece.text) - len(piece.text.lstrip())
    token_start = piece.char_start + leading if leading < len(piece.text) else piece.char_start
    return token_start < end and start < piece.char_end


def align_spans(text: str, pieces: Sequence[Piece], spans: Sequence[Span], field: str = "spans") -> list[Alignment]:
    """One Alignment per span, in order. `pieces` must refer to `text`."""
    out = []
    for index, span in enumerate(spans):
        start, end = resolve_span(text, span, f"{field}[{index}]")
        positions = tuple(i for i, piece in enumerate(pieces) if token_overlaps(piece, start, end))
        out.append(Alignment(positions, start, end))
    return out


def span_token_weights(positions: Sequence[int], weight: float, later_share: float = 0.0) -> list[tuple[int, float]]:
    """(position, weight) rows for a span: a bad span weighs its first token fully and the later
    ones (generated after the error) by later_share; a good span weighs every token."""
    if not positions:
        return []
    if weight >= 0:
        return [(int(p), float(weight)) for p in positions]
    first, *later = positions
    return [(int(first), float(weight))] + ([(int(p), float(weight) * later_share) for p in later] if later_share else [])


def replacement_row(
    tokenizer,
    text: str,
    pieces: Sequence[Piece],
    completion_ids: Sequence[int],
    start: int,
    end: int,
    replacement: str,
) -> tuple[int, int] | None:
    """The (position, token id) row a replacement text gives a span of a completion.

    The corrected text from the span's first token on is tokenized in its context (from that
    token's start, so the preceding space is part of it as in the sampled ids) and compared with
    the sampled ids; the first differing token is the row. A correction that ends the text early
    gives EOS at that position when the tokenizer has one. None when nothing differs.
    """
    positions = [i for i, piece in enumerate(pieces) if token_overlaps(piece, start, end)]
    if not positions:
        raise InvalidArgument(f"the span [{start}, {end}) covers no token", "span")
    first = positions[0]
    base = pieces[first].char_start
    corrected = text[base:start] + replacement + text[end:]
    new_ids = [int(i) for i in tokenizer(corrected, add_special_tokens=False)["input_ids"]]
    old_ids = [int(i) for i in completion_ids[first:]]
    for j, (new, old) in enumerate(zip(new_ids, old_ids, strict=False)):
        if new != old:
            return first + j, new
    if len(new_ids) < len(old_ids) and tokenizer.eos_token_id is not None:
        return first + len(new_ids), int(tokenizer.eos_token_id)
    return None
