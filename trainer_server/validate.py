"""Validation of submitted annotations: every check before anything is written.

`Validator.sequence` turns one submitted sequence (plain dataclasses, no protobuf) into an
`Annotation` with its base rows, or raises InvalidArgument whose field names the sequence and the
part of it that is wrong: `sequences[3] (annotation_id='a-17').token_labels[0].position`. The
engine validates a whole request first and stores nothing when any sequence fails (unless the
client asked for partial acceptance).

Span labels follow docs/design.md, "Spans", through common/spans.py (the same
rules the policy server's AlignSpans applies). Labels are merged per position: a position judged
twice must be judged with the same weight (overlapping spans with the same weight are merged
into one span first), otherwise the sequence is rejected as conflicting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from common import spans as spanlib
from common.errors import InvalidArgument, quote
from trainer_server.api import SequenceInput
from trainer_server.rows import MAX_ABS_WEIGHT, MIN_BEHAVIOR_LOGPROB, Annotation, merge_token_rewards

MAX_ID_CHARS = 200  # annotation_id / annotator_id length limit
MAX_METADATA_BYTES = 64 * 1024  # all metadata keys + values, UTF-8
# Texts are capped before tokenizing at max_seq_len * this many characters (docs/design.md, "Errors and limits": no request may
# cost more work than the longest sequence the trainer accepts); no tokenizer packs more per token.
MAX_CHARS_PER_TOKEN = 64
def weight_problem(value: float, positive: bool = False) -> str | None:
    """Why `value` cannot be a weight or reward (None: it can): finite, |value| <= MAX_ABS_WEIGHT,
    and > 0 when `positive`."""
    bound = f"(0, {MAX_ABS_WEIGHT:g}]" if positive else f"[-{MAX_ABS_WEIGHT:g}, {MAX_ABS_WEIGHT:g}]"
    low_ok = value > 0 if positive else value >= -MAX_ABS_WEIGHT
    if math.isfinite(value) and low_ok and value <= MAX_ABS_WEIGHT:
        return None
    return f"must be finite and in {bound}, got {quote(value)}"


def sequence_field(index: int, annotation_id: str) -> str:
    """How errors name a sequence: sequences[3] (annotation_id='a-17')."""
    shown = annotation_id if len(annotation_id) <= 60 else annotation_id[:57] + "..."
    return f"sequences[{index}] (annotation_id={shown!r})"


class Validator:
    """Checks sequences against the model (vocabulary, tokenizer) and the trainer's limits."""

    def __init__(self, tokenizer, vocab_size: int, max_seq_len: int, bad_span_share: float = 0.0):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.bad_span_share = bad_span_share

    def sequence(self, seq: SequenceInput, current_version: int, where: str) -> Annotation:
        """Validate one sequence; `where` prefixes every error's field (see sequence_field)."""

        def fail(name: str, message: str) -> InvalidArgument:
            return InvalidArgument(message, f"{where}.{name}")

        self._check_sizes(seq, fail)
        if not 1 <= len(seq.annotation_id) <= MAX_ID_CHARS:
            raise fail("annotation_id", f"must be 1..{MAX_ID_CHARS} characters, got {len(seq.annotation_id)}")
        if len(seq.annotator_id) > MAX_ID_CHARS:
            raise fail("annotator_id", f"at most {MAX_ID_CHARS} characters, got {len(seq.annotator_id)}")
        meta_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in seq.metadata.items())
        if meta_bytes > MAX_METADATA_BYTES:
            raise fail("metadata", f"at most {MAX_METADATA_BYTES} bytes, got {meta_bytes}")
        if not 0 <= seq.model_version <= current_version:
            raise fail(
                "model_version",
                f"must be in [0, {current_version}] (the trainer's current version), got {seq.model_version}",
            )

        prompt = self._prompt_ids(seq, fail)
        completion = self._completion_ids(seq, prompt, fail)
        if len(prompt) + len(completion) > self.max_seq_len:
            raise fail(
                "completion_token_ids",
                f"prompt ({len(prompt)}) + completion ({len(completion)}) tokens exceed the trainer's "
                f"max sequence length {self.max_seq_len}",
            )

        behavior = None
        if len(seq.behavior_logprobs):
            if len(seq.behavior_logprobs) != len(completion):
                raise fail(
                    "behavior_logprobs",
                    f"must have one value per completion token ({len(completion)}), got {len(seq.behavior_logprobs)}",
                )
            values = seq.behavior_logprobs
            # fast path: a finite sum (no NaN or inf anywhere) and both ends within the bound
            if not (values and math.isfinite(sum(values)) and min(values) >= MIN_BEHAVIOR_LOGPROB
                    and max(values) <= 0):
                for i, value in enumerate(values):
                    if not (math.isfinite(value) and MIN_BEHAVIOR_LOGPROB <= value <= 0):
                        raise fail(f"behavior_logprobs[{i}]",
                                   f"must be a log-probability in [{MIN_BEHAVIOR_LOGPROB:g}, 0], got {quote(value)}")
            behavior = tuple(map(float, values))

        if seq.sequence_reward is not None and (problem := weight_problem(seq.sequence_reward)):
            raise fail("sequence_reward", problem)
        if not seq.token_labels and not seq.span_labels and seq.sequence_reward is None:
            raise fail("token_labels", "no labels: give token_labels, span_labels or a sequence_reward")

        sampled: dict[int, tuple[float, str]] = {}  # position -> (reward, which label said so)
        replacements: dict[int, tuple[int, float, str]] = {}  # position -> (token, weight, which label)

        def judge(position: int, weight: float, source: str) -> None:
            if position in sampled and sampled[position][0] != weight:
                other_weight, other = sampled[position]
                raise fail(source, f"gives completion position {position} weight {weight}, but {other} "
                                   f"gives it {other_weight} (conflicting labels)")
            sampled.setdefault(position, (weight, source))

        def replace(position: int, token: int, weight: float, source: str) -> None:
            if position in replacements and replacements[position][:2] != (token, weight):
                other_token, other_weight, other = replacements[position]
                raise fail(source, f"replaces completion position {position} with token {token} (weight {weight}), "
                                   f"but {other} with token {other_token} (weight {other_weight})")
            replacements.setdefault(position, (token, weight, source))

        for j, label in enumerate(seq.token_labels):
            name = f"token_labels[{j}]"
            if not 0 <= label.position < len(completion):
                raise fail(f"{name}.position",
                           f"must be in [0, {len(completion)}) (the completion's tokens), got {label.position}")
            if any(other.position == label.position for other in seq.token_labels[:j]):
                raise fail(f"{name}.position", f"position {label.position} is labeled twice")
            if problem := weight_problem(label.weight):
                raise fail(f"{name}.weight", problem)
            judge(label.position, float(label.weight), name)
            if label.replacement_token_id is not None:
                token = label.replacement_token_id
                if not 0 <= token < self.vocab_size:
                    raise fail(f"{name}.replacement_token_id", f"must be in [0, {self.vocab_size}), got {token}")
                if token == completion[label.position]:
                    raise fail(f"{name}.replacement_token_id", f"is the sampled token {token} itself")
                weight = label.replacement_weight
                if weight is None:
                    weight = abs(label.weight) or 1.0
                elif problem := weight_problem(weight, positive=True):
                    raise fail(f"{name}.replacement_weight", problem)
                replace(label.position, int(token), float(weight), name)
            elif label.replacement_weight is not None:
                raise fail(f"{name}.replacement_weight", "given without a replacement_token_id")

        if seq.span_labels:
            self._span_rows(seq, prompt, completion, judge, replace, fail)

        rows = merge_token_rewards(
            completion,
            {t: w for t, (w, _) in sampled.items()},
            [(t, tok, w) for t, (tok, w, _) in replacements.items()],
        )
        return Annotation(
            annotation_id=seq.annotation_id,
            prompt_ids=tuple(prompt),
            completion_ids=tuple(completion),
            model_version=int(seq.model_version),
            rows=rows,
            behavior_logprobs=behavior,
            sequence_reward=None if seq.sequence_reward is None else float(seq.sequence_reward),
            annotator_id=seq.annotator_id,
            metadata=dict(seq.metadata),
        )

    # ---- parts ----

    def _check_sizes(self, seq: SequenceInput, fail) -> None:
        """Lists and texts no longer than a sequence of max_seq_len tokens can be, checked before
        any tokenizing or per-label work (which would otherwise grow with whatever a client sends)."""
        tokens, chars = self.max_seq_len, self.max_seq_len * MAX_CHARS_PER_TOKEN
        sizes = [("prompt_token_ids", len(seq.prompt_token_ids), tokens),
                 ("completion_token_ids", len(seq.completion_token_ids), tokens),
                 ("behavior_logprobs", len(seq.behavior_logprobs), tokens),
                 ("token_labels", len(seq.token_labels), tokens),
                 ("span_labels", len(seq.span_labels), tokens),
                 ("prompt_text", len(seq.prompt_text), chars),
                 ("completion_text", len(seq.completion_text), chars)]
        for k, label in enumerate(seq.span_labels):
            sizes += [(f"span_labels[{k}].text", len(label.text), chars),
                      (f"span_labels[{k}].replacement_text", len(label.replacement_text or ""), chars)]
        for name, size, limit in sizes:
            if size > limit:
                raise fail(name, f"{size} long; at most {limit} (the trainer's --max-seq-len {self.max_seq_len})")

    def _check_ids(self, ids: Sequence[int], name: str, fail) -> list[int]:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # then find the first one outside
            for i, token in enumerate(ids):
                if not 0 <= token < self.vocab_size:
                    raise fail(f"{name}[{i}]", f"token id must be in [0, {self.vocab_size}), got {token}")
        return ids

    def _prompt_ids(self, seq: SequenceInput, fail) -> list[int]:
        """Prompt ids win when given (the policy server streamed them); else the text is tokenized."""
        if len(seq.prompt_token_ids):
            return self._check_ids(seq.prompt_token_ids, "prompt_token_ids", fail)
        if not seq.prompt_text:
            raise fail("prompt_token_ids", "empty prompt: give prompt_token_ids or prompt_text")
        ids = [int(i) for i in self.tokenizer(seq.prompt_text, add_special_tokens=True)["input_ids"]]
        if not ids:
            raise fail("prompt_text", "tokenizes to no tokens")
        return self._check_ids(ids, "prompt_text", fail)

    def _completion_ids(self, seq: SequenceInput, prompt: list[int], fail) -> list[int]:
        """The sampled ids are the truth; a completion_text alone is tokenized in the prompt's
        context (tokenize prompt + completion and keep what follows the prompt's ids, or the text
        on its own when the tokenizer merged across the boundary)."""
        if len(seq.completion_token_ids):
            ids = self._check_ids(seq.completion_token_ids, "completion_token_ids", fail)
            if seq.completion_text:
                decoded, _ = spanlib.pieces_from_ids(self.tokenizer, ids, context_ids=prompt)
                if decoded != seq.completion_text:
                    raise fail("completion_text", f"differs from the text decoded from completion_token_ids "
                                                  f"({decoded[:80]!r}); send one of them, or both consistent")
            return ids
        if not seq.completion_text:
            raise fail("completion_token_ids", "empty completion: give completion_token_ids or completion_text")
        prompt_text = spanlib._decode(self.tokenizer, prompt)
        joint = [int(i) for i in self.tokenizer(prompt_text + seq.completion_text, add_special_tokens=False)["input_ids"]]
        bare_prompt = [t for t in prompt if t not in spanlib.special_ids(self.tokenizer)]
        if joint[: len(bare_prompt)] == bare_prompt and len(joint) > len(bare_prompt):
            ids = joint[len(bare_prompt) :]
        else:
            ids = [int(i) for i in self.tokenizer(seq.completion_text, add_special_tokens=False)["input_ids"]]
        if not ids:
            raise fail("completion_text", "tokenizes to no tokens")
        return self._check_ids(ids, "completion_text", fail)

    def _span_rows(self, seq: SequenceInput, prompt, completion, judge, replace, fail) -> None:
        """Span labels -> judged positions and replacement rows (docs/design.md, "Spans")."""
        text, pieces = spanlib.pieces_from_ids(self.tokenizer, completion, context_ids=prompt)
        resolved = []  # (start, end, label index)
        for k, label in enumerate(seq.span_labels):
            name = f"span_labels[{k}]"
            if problem := weight_problem(label.weight):
                raise fail(f"{name}.weight", problem)
            try:
                start, end = spanlib.resolve_span(text, spanlib.Span(label.start, label.end, label.text), "")
            except InvalidArgument as exc:
                raise fail(f"{name}{exc.field}", exc.detail) from None
            resolved.append((start, end, k))
        # Overlapping spans: same weight -> merged into their union; different weight -> conflict.
        merged: list[list] = []  # [start, end, weight, [label indices]]
        for start, end, k in sorted(resolved):
            label = seq.span_labels[k]
            if merged and start < merged[-1][1]:
                last = merged[-1]
                first = seq.span_labels[last[3][0]]
                if label.weight != last[2]:
                    raise fail(f"span_labels[{k}]", f"[{start}, {end}) overlaps span_labels[{last[3][0]}] "
                                                    f"[{first.start}, {first.end}) with a different weight "
                                                    f"({label.weight} vs {last[2]})")
                if label.replacement_text is not None or first.replacement_text is not None:
                    raise fail(f"span_labels[{k}]", f"overlaps span_labels[{last[3][0]}] and one of them has a "
                                                    "replacement_text (ambiguous correction)")
                last[1] = max(last[1], end)
                last[3].append(k)
            else:
                merged.append([start, end, float(label.weight), [k]])
        for start, end, weight, indices in merged:
            name = f"span_labels[{indices[0]}]"
            positions = [i for i, p in enumerate(pieces) if spanlib.token_overlaps(p, start, end)]
            if not positions:
                raise fail(name, f"[{start}, {end}) covers no token of the completion")
            for position, w in spanlib.span_token_weights(positions, weight, self.bad_span_share):
                judge(position, w, name)
            label = seq.span_labels[indices[0]]
            if label.replacement_text is not None:
                row = spanlib.replacement_row(self.tokenizer, text, pieces, completion, start, end,
                                              label.replacement_text)
                if row is None:
                    raise fail(f"{name}.replacement_text",
                               f"{quote(label.replacement_text)} gives the sampled tokens again (nothing to replace)")
                position, token = row
                if not 0 <= token < self.vocab_size:
                    raise fail(f"{name}.replacement_text", f"tokenizes to id {token} outside the vocabulary")
                replace(position, int(token), abs(weight) or 1.0, name)
