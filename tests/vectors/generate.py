"""Write tests/vectors/annotations.json: the annotation test vectors every client submits.

    .venv/bin/python tests/vectors/generate.py [--model data/demo-model] [--check]

The cases are written here in text (a prompt, a completion, labels on named tokens or on
substrings), and this script turns them into exact SubmitAnnotationsRequest JSON plus the
expected answers, against the demo model's tokenizer. The expected training rows are computed
here from the rules of docs/design.md ("The loss", "Spans"), with this file's own small
implementation that uses nothing of the servers but the tokenizer's encode/decode, so that a
trainer that stores other rows fails the vectors. See tests/vectors/README.md for the format.

Rebuild after the demo model's tokenizer changes (the vectors' probe detects that), and review
the diff: it should only move token ids and positions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = HERE / "annotations.json"
FORMAT = "tokenfeedback-annotation-vectors/1"
PROBE = "The capital of Canada is Ottawa 🍁, 加拿大的首都."
REPLACEMENT_CHAR = "\ufffd"


# ---- the rules, independently of the servers -------------------------------------------------


@dataclass(frozen=True)
class Piece:
    token_id: int
    text: str  # the characters the token adds ("" while a multi-byte character is incomplete)
    start: int  # code-point offsets into the decoded completion
    end: int
    special: bool


class Rules:
    """docs/design.md's span and row rules over a Hugging Face tokenizer."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tok = tokenizer
        self.vocab_size = vocab_size
        self.special = set(tokenizer.all_special_ids)

    def encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def pieces(self, ids: list[int]) -> tuple[str, list[Piece]]:
        """Offsets from decoding the ids: each token adds what the decoded prefix gains, except
        that text ending in an incomplete UTF-8 sequence is held back until a token completes it."""
        out, emitted = [], ""
        for i, token in enumerate(ids):
            text = self.decode(ids[: i + 1])
            held = text.endswith(REPLACEMENT_CHAR) and i < len(ids) - 1
            added = "" if held else text[len(emitted):]
            assert held or text.startswith(emitted), f"decoded prefix {text!r} does not extend {emitted!r}"
            out.append(Piece(token, added, len(emitted), len(emitted) + len(added), token in self.special))
            emitted += added
        return emitted, out

    @staticmethod
    def overlaps(piece: Piece, start: int, end: int) -> bool:
        """A token belongs to a span when their ranges overlap, ignoring the token's leading
        whitespace; a token that adds no characters belongs where its character starts."""
        if piece.special:
            return False
        if piece.start == piece.end:
            return start <= piece.start < end
        stripped = piece.text.lstrip()
        token_start = piece.start + (len(piece.text) - len(stripped) if stripped else 0)
        return token_start < end and start < piece.end

    def replacement(self, text: str, pieces: list[Piece], ids: list[int], first: int, start: int, end: int,
                    replacement: str) -> tuple[int, int]:
        """The corrected text from the span's first token on, tokenized; the first token that
        differs from the sampled ids is the replacement row (EOS when the correction ends early)."""
        corrected = text[pieces[first].start:start] + replacement + text[end:]
        new = self.encode(corrected)
        for j, (a, b) in enumerate(zip(new, ids[first:], strict=False)):
            if a != b:
                return first + j, a
        assert len(new) < len(ids[first:]), f"replacement {replacement!r} changes nothing"
        return first + len(new), self.tok.eos_token_id


# ---- building cases --------------------------------------------------------------------------


@dataclass
class Seq:
    """One annotated sequence under construction: its request JSON and its expected stored form."""

    rules: Rules
    annotation_id: str
    prompt: str
    completion: str
    send_prompt_ids: bool = False  # send prompt_token_ids instead of prompt_text
    send_completion_ids: bool = True  # send completion_token_ids (else completion_text)
    request: dict = field(default_factory=dict)
    sampled: dict = field(default_factory=dict)  # position -> weight
    replaced: dict = field(default_factory=dict)  # position -> (token, weight)

    def __post_init__(self):
        r = self.rules
        self.prompt_ids = r.encode(self.prompt, special=True)
        self.ids = r.encode(self.completion)
        joint = r.encode(self.prompt + self.completion)
        assert joint == r.encode(self.prompt) + self.ids, (
            f"{self.prompt!r} + {self.completion!r} tokenizes differently together and apart; pick a clean boundary")
        self.text, self.pieces = r.pieces(self.ids)
        assert self.text == self.completion, (self.text, self.completion)
        self.request = {"annotationId": self.annotation_id}
        if self.send_prompt_ids:
            self.request["promptTokenIds"] = self.prompt_ids
        else:
            self.request["promptText"] = self.prompt
        if self.send_completion_ids:
            self.request["completionTokenIds"] = self.ids
        else:
            self.request["completionText"] = self.completion
        self.reward = None

    def position(self, token_text: str, nth: int = 0) -> int:
        found = [i for i, p in enumerate(self.pieces) if p.text == token_text]
        assert len(found) > nth, f"no token {token_text!r} in {[p.text for p in self.pieces]}"
        return found[nth]

    def token(self, token_text: str, weight: float, *, replacement: str | None = None,
              replacement_weight: float | None = None, nth: int = 0) -> Seq:
        """A TokenLabel on the token whose text is token_text; a replacement given as a token's text."""
        t = self.position(token_text, nth)
        label: dict[str, Any] = {"position": t, "weight": weight}
        self._judge(t, weight)
        if replacement is not None:
            [rid] = self.rules.encode(replacement)[:1]
            label["replacementTokenId"] = rid
            if replacement_weight is not None:
                label["replacementWeight"] = replacement_weight
            self._replace(t, rid, replacement_weight if replacement_weight is not None else (abs(weight) or 1.0))
        self.request.setdefault("tokenLabels", []).append(label)
        return self

    def span(self, substring: str, weight: float, *, replacement: str | None = None, quote: bool = True,
             nth: int = 0, utf16: bool = False) -> Seq:
        """A SpanLabel over the nth occurrence of substring (code points; UTF-16 units if utf16)."""
        label, start, end = self.span_label(substring, weight, replacement=replacement, quote=quote, nth=nth,
                                            utf16=utf16)
        self.request.setdefault("spanLabels", []).append(label)
        positions = [i for i, p in enumerate(self.pieces) if Rules.overlaps(p, start, end)]
        assert positions, f"span {substring!r} covers no token"
        # A bad span weighs its first token (the later ones get the default share 0, no row); a good
        # span weighs every token.
        for t in positions if weight >= 0 else positions[:1]:
            self._judge(t, weight)
        if replacement is not None:
            t, token = self.rules.replacement(self.text, self.pieces, self.ids, positions[0], start, end, replacement)
            self._replace(t, token, abs(weight) or 1.0)
        return self

    def span_label(self, substring: str, weight: float, *, replacement: str | None = None, quote: bool = True,
                   nth: int = 0, utf16: bool = False) -> tuple[dict, int, int]:
        """The SpanLabel JSON for a substring, and its code-point offsets."""
        start = -1
        for _ in range(nth + 1):
            start = self.completion.index(substring, start + 1)
        end = start + len(substring)
        sent_start, sent_end = start, end
        if utf16:
            sent_start = len(self.completion[:start].encode("utf-16-le")) // 2
            sent_end = len(self.completion[:end].encode("utf-16-le")) // 2
            assert (sent_start, sent_end) != (start, end), "utf16 offsets equal code points here: no test"
        label: dict[str, Any] = {"start": sent_start, "end": sent_end, "weight": weight}
        if quote:
            label["text"] = substring
        if replacement is not None:
            label["replacementText"] = replacement
        return label, start, end

    def set(self, **fields: Any) -> Seq:
        """Other AnnotatedSequence fields, in proto JSON (camelCase)."""
        self.request.update(fields)
        if "sequenceReward" in fields:
            self.reward = fields["sequenceReward"]
        return self

    def _judge(self, t: int, weight: float) -> None:
        assert self.sampled.get(t, weight) == weight, f"position {t} judged twice with different weights"
        self.sampled[t] = float(weight)

    def _replace(self, t: int, token: int, weight: float) -> None:
        assert token != self.ids[t], f"replacement at {t} is the sampled token"
        self.replaced[t] = (int(token), float(weight))

    # ---- expectations ----

    def rows(self) -> list[dict]:
        rows = [(t, self.ids[t], w, False) for t, w in self.sampled.items()]
        rows += [(t, tok, w, True) for t, (tok, w) in self.replaced.items()]
        return [{"position": t, "tokenId": tok, "weight": w, "replacement": rep}
                for t, tok, w, rep in sorted(rows, key=lambda r: (r[0], r[3], r[1]))]

    def result_rows(self) -> int:
        """SubmitResult.rows under the default horizon 1: the judged positions, the last position
        when a sequence reward is placed on it, and the replacement rows."""
        judged = set(self.sampled) | ({len(self.ids) - 1} if self.reward is not None else set())
        return len(judged) + len(self.replaced)

    def stored(self) -> dict:
        out = {
            "annotationId": self.annotation_id,
            "state": "ANNOTATION_STATE_PENDING",
            "promptTokenIds": self.prompt_ids,
            "completionTokenIds": self.ids,
            "modelVersion": int(self.request.get("modelVersion", 0)),
            "rows": self.rows(),
            "sequenceReward": self.reward,
            "annotatorId": self.request.get("annotatorId", ""),
            "metadata": self.request.get("metadata", {}),
        }
        return out


def accepted(seq: Seq) -> dict:
    return {"annotationId": seq.annotation_id, "status": "SUBMIT_STATUS_ACCEPTED", "rows": seq.result_rows()}


def duplicate(seq: Seq) -> dict:
    return {"annotationId": seq.annotation_id, "status": "SUBMIT_STATUS_DUPLICATE"}


def step(sequences: list[dict], expect: dict, partial_ok: bool = False) -> dict:
    request: dict[str, Any] = {"sequences": sequences}
    if partial_ok:
        request["partialOk"] = True
    return {"request": request, "expect": expect}


def error(*contains: str) -> dict:
    return {"error": {"code": "INVALID_ARGUMENT", "messageContains": list(contains)}}


# ---- the cases -------------------------------------------------------------------------------

PROMPT = "The capital of Canada is"


def valid_cases(r: Rules) -> list[dict]:
    cases = []

    def case(name: str, description: str, steps: list[dict], stored: list[Seq], absent: tuple[str, ...] = ()):
        cases.append({"name": name, "description": description, "steps": steps,
                      "stored": [s.stored() for s in stored], "absent": list(absent)})

    s = Seq(r, "v-token-replacement", PROMPT, " Paris.").token(" Paris", -1.0, replacement=" Ottawa")
    case("token-bad-with-replacement",
         "A bad token with the token that should have come instead: a sampled row with weight -1 and a "
         "replacement row with weight |w| = 1. Resending it is a DUPLICATE that changes nothing.",
         [step([s.request], {"results": [accepted(s)]}), step([s.request], {"results": [duplicate(s)]})], [s])

    s = (Seq(r, "v-token-weights", PROMPT, " Ottawa, and Paris is the capital of France.", send_prompt_ids=True)
         .token(" Ottawa", 0.5).token(",", 0.0).token(" Paris", -0.25, replacement=" Ottawa", replacement_weight=2.5)
         .token(" France", 1.0)
         .set(modelVersion=0, annotatorId="vectors 🧪", metadata={"tool": "vectors", "語": "日本"}))
    s.set(behaviorLogprobs=[-0.5] * len(s.ids))
    case("token-weights-fractional",
         "Fractional and zero weights, an explicit replacement weight, prompt as ids, behavior logprobs, "
         "unicode annotator and metadata kept as given.",
         [step([s.request], {"results": [accepted(s)]})], [s])

    s = Seq(r, "v-span-bad-replacement", PROMPT, " Paris is the capital of France.", send_completion_ids=False)
    s.span("Paris is", -1.0, replacement="Ottawa")
    case("span-bad-with-replacement-text",
         "A bad span over two tokens, completion sent as text (the trainer tokenizes it after the prompt): "
         "only the span's first token gets a row (later share 0), and the replacement text, tokenized in "
         "context, gives the replacement row at the first token that differs.",
         [step([s.request], {"results": [accepted(s)]})], [s])

    s = Seq(r, "v-span-good", PROMPT, " Ottawa, the capital of Canada.").span("the capital of Canada", 1.0)
    case("span-good-several-tokens", "A good span weighs every token it overlaps.",
         [step([s.request], {"results": [accepted(s)]})], [s])

    text = " Ottawa 🍁 is 加拿大的首都."
    s = (Seq(r, "v-unicode", PROMPT, text).span("🍁", -1.0).span("加拿大", 1.0))
    case("unicode-emoji-cjk-spans",
         "Spans over an emoji and CJK characters that the byte-level tokenizer splits across several "
         "tokens: offsets are code points, tokens that start a character belong to the span that holds it.",
         [step([s.request], {"results": [accepted(s)]})], [s])

    s = Seq(r, "v-utf16", PROMPT, text).span("加拿大", -1.0, utf16=True)
    case("span-utf16-offsets-retried",
         "Offsets counted in UTF-16 units (one more than code points after the emoji) with the span's own "
         "text: they disagree as code points, so the trainer retries them as UTF-16 and finds the span.",
         [step([s.request], {"results": [accepted(s)]})], [s])

    # Expected: the union "Paris is a" as one bad span; sent: the two overlapping spans.
    s = Seq(r, "v-overlap", PROMPT, " Paris is a city in France.").span("Paris is a", -1.0)
    s.request["spanLabels"] = [s.span_label("Paris is", -1.0)[0], s.span_label("is a", -1.0)[0]]
    case("overlapping-spans-same-weight",
         "Two overlapping bad spans of the same weight merge into one span: one row on its first token.",
         [step([s.request], {"results": [accepted(s)]})], [s])

    s = Seq(r, "v-reward", PROMPT, " Ottawa.").set(sequenceReward=1.0)
    case("sequence-reward-only",
         "A sequence reward and no token labels: stored with no base rows; under the default horizon 1 it "
         "becomes one row on the last token at training time (SubmitResult.rows = 1).",
         [step([s.request], {"results": [accepted(s)]})], [s])

    s = Seq(r, "v-reward-tokens", PROMPT, " Paris.").token(" Paris", -1.0).set(sequenceReward=-0.5)
    case("sequence-reward-with-token-labels", "A sequence reward next to token labels; both are kept.",
         [step([s.request], {"results": [accepted(s)]})], [s])

    s = Seq(r, "v-text-and-ids", PROMPT, " Ottawa.").token(" Ottawa", 1.0)
    s.request["completionText"] = " Ottawa."
    case("completion-text-and-ids-consistent", "Completion ids and the same text together are accepted.",
         [step([s.request], {"results": [accepted(s)]})], [s])

    a = Seq(r, "v-batch-a", PROMPT, " Ottawa.").token(" Ottawa", 1.0)
    b = Seq(r, "v-batch-b", PROMPT, " Paris.").token(" Paris", -1.0, replacement=" Ottawa")
    case("batch-and-duplicate-inside-a-request",
         "Several sequences in one request, one of them twice: results in order, the second copy DUPLICATE.",
         [step([a.request, b.request, a.request], {"results": [accepted(a), accepted(b), duplicate(a)]})], [a, b])

    good = Seq(r, "v-partial-good", PROMPT, " Ottawa.").token(" Ottawa", 1.0)
    bad = Seq(r, "v-partial-bad", PROMPT, " Ottawa.")
    bad.request["tokenLabels"] = [{"position": len(bad.ids), "weight": -1.0}]
    case("partial-ok-mixed",
         "With partialOk, the valid sequence is stored and the invalid one REJECTED with a reason naming "
         "its field; without partialOk the same request fails whole and stores nothing.",
         [step([good.request, bad.request], error("sequences[1]", "token_labels[0].position")),
          step([good.request, bad.request], {"results": [
              accepted(good),
              {"annotationId": bad.annotation_id, "status": "SUBMIT_STATUS_REJECTED",
               "reasonContains": ["token_labels[0].position"]}]}, partial_ok=True)],
         [good], absent=(bad.annotation_id,))
    return cases


def invalid_cases(r: Rules) -> list[dict]:
    vocab = r.vocab_size
    base = Seq(r, "i-base", PROMPT, " Paris is the capital of France.")
    n = len(base.ids)
    paris = base.position(" Paris")

    def seq(aid: str, **changes: Any) -> dict:
        out = {k: v for k, v in base.request.items() if k not in ("tokenLabels", "spanLabels")}
        out["annotationId"] = aid
        out["tokenLabels"] = [{"position": paris, "weight": -1.0}]
        for key, value in changes.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
        return out

    bmp = " Paris is the capital of France."
    specs = [
        ("empty-annotation-id", seq(""), ["annotation_id"]),
        ("annotation-id-too-long", seq("x" * 201), ["annotation_id", "1..200"]),
        ("no-prompt", seq("i-no-prompt", promptText=None), ["prompt_token_ids"]),
        ("no-completion", seq("i-no-completion", completionTokenIds=None), ["completion_token_ids"]),
        ("completion-id-outside-vocabulary", seq("i-vocab", completionTokenIds=base.ids[:1] + [vocab]),
         ["completion_token_ids[1]"]),
        ("prompt-id-negative", seq("i-neg", promptText=None, promptTokenIds=[-1]), ["prompt_token_ids[0]"]),
        ("completion-text-disagrees-with-ids", seq("i-text-ids", completionText=" Rome."), ["completion_text"]),
        ("model-version-from-the-future", seq("i-version", modelVersion=1_000_000), ["model_version"]),
        ("behavior-logprobs-count", seq("i-behavior-count", behaviorLogprobs=[-0.1]), ["behavior_logprobs"]),
        ("behavior-logprob-positive", seq("i-behavior-sign", behaviorLogprobs=[0.5] + [-0.1] * (n - 1)),
         ["behavior_logprobs[0]"]),
        ("no-labels", seq("i-no-labels", tokenLabels=None), ["token_labels", "no labels"]),
        ("token-position-out-of-range", seq("i-position", tokenLabels=[{"position": n, "weight": -1.0}]),
         ["token_labels[0].position"]),
        ("token-position-twice", seq("i-twice", tokenLabels=[{"position": 0, "weight": 1.0},
                                                            {"position": 0, "weight": 1.0}]),
         ["token_labels[1].position"]),
        ("token-weight-nan", seq("i-nan", tokenLabels=[{"position": 0, "weight": "NaN"}]), ["token_labels[0].weight"]),
        ("token-weight-infinite", seq("i-inf", tokenLabels=[{"position": 0, "weight": "-Infinity"}]),
         ["token_labels[0].weight"]),
        ("replacement-outside-vocabulary",
         seq("i-repl-vocab", tokenLabels=[{"position": paris, "weight": -1.0, "replacementTokenId": vocab}]),
         ["token_labels[0].replacement_token_id"]),
        ("replacement-is-the-sampled-token",
         seq("i-repl-same", tokenLabels=[{"position": paris, "weight": -1.0, "replacementTokenId": base.ids[paris]}]),
         ["token_labels[0].replacement_token_id"]),
        ("replacement-weight-not-positive",
         seq("i-repl-weight", tokenLabels=[{"position": paris, "weight": -1.0,
                                            "replacementTokenId": r.encode(" Ottawa")[0], "replacementWeight": 0}]),
         ["token_labels[0].replacement_weight"]),
        ("replacement-weight-without-token",
         seq("i-repl-orphan", tokenLabels=[{"position": paris, "weight": -1.0, "replacementWeight": 1.0}]),
         ["token_labels[0].replacement_weight"]),
        ("sequence-reward-nan", seq("i-reward", sequenceReward="NaN"), ["sequence_reward"]),
        ("span-end-past-the-text",
         seq("i-span-end", tokenLabels=None, spanLabels=[{"start": 1, "end": len(bmp) + 1, "weight": -1.0}]),
         ["span_labels[0].end"]),
        ("span-empty", seq("i-span-empty", tokenLabels=None, spanLabels=[{"start": 3, "end": 3, "weight": -1.0}]),
         ["span_labels[0].start"]),
        ("span-text-disagrees",
         seq("i-span-text", tokenLabels=None, spanLabels=[{"start": 1, "end": 6, "weight": -1.0, "text": "Rome!"}]),
         ["span_labels[0].text"]),
        ("span-covers-no-token",
         seq("i-span-space", tokenLabels=None,
             spanLabels=[{"start": bmp.index(" is"), "end": bmp.index(" is") + 1, "weight": -1.0}]),
         ["span_labels[0]", "covers no token"]),
        ("spans-overlap-with-different-weights",
         seq("i-span-conflict", tokenLabels=None, spanLabels=[{"start": 1, "end": 9, "weight": -1.0},
                                                              {"start": 7, "end": 13, "weight": 1.0}]),
         ["span_labels[1]", "different weight"]),
        ("span-replacement-changes-nothing",
         seq("i-span-noop", tokenLabels=None,
             spanLabels=[{"start": 1, "end": 6, "weight": -1.0, "replacementText": "Paris"}]),
         ["span_labels[0].replacement_text"]),
        ("token-and-span-labels-conflict",
         seq("i-mixed-conflict", spanLabels=[{"start": 1, "end": 6, "weight": 1.0}]),
         ["span_labels[0]", "conflicting"]),
    ]
    cases = []
    for name, sequence, contains in specs:
        ids = [sequence["annotationId"]] if sequence["annotationId"] else []
        cases.append({
            "name": f"invalid-{name}",
            "description": f"Rejected with INVALID_ARGUMENT naming sequences[0] and {contains[0]}; nothing stored.",
            "steps": [step([sequence], error("sequences[0]", *contains))],
            "stored": [], "absent": ids,
        })
    cases.append({
        "name": "invalid-empty-request",
        "description": "A request without sequences is rejected, naming the sequences field.",
        "steps": [step([], error("sequences"))], "stored": [], "absent": [],
    })
    return cases


# ---- main ------------------------------------------------------------------------------------


def build(model: Path) -> dict:
    from google.protobuf import json_format
    from transformers import AutoConfig, AutoTokenizer

    sys.path.insert(0, str(ROOT / "clients" / "python"))
    import tokenfeedback.v1.trainer_pb2 as trainer_pb2

    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab_size = AutoConfig.from_pretrained(model).vocab_size
    rules = Rules(tokenizer, vocab_size)
    cases = valid_cases(rules) + invalid_cases(rules)
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    owner: dict[str, str] = {}
    for c in cases:  # annotation ids are unique across cases (one trainer runs them all)
        for st in c["steps"]:
            for sequence in st["request"]["sequences"]:
                aid = sequence["annotationId"]
                assert not aid or owner.setdefault(aid, c["name"]) == c["name"], f"{aid} used by two cases"
    for c in cases:  # every request is valid proto JSON
        for st in c["steps"]:
            json_format.ParseDict(st["request"], trainer_pb2.SubmitAnnotationsRequest())
    for c in cases:
        for stored in c["stored"]:
            for row in stored["rows"]:
                assert math.isfinite(row["weight"])
    return {
        "format": FORMAT,
        "description": "Annotated sequences every tokenfeedback client submits to a real trainer, with the "
                       "expected results; generated by tests/vectors/generate.py, format in README.md.",
        "model": {
            "name": "demo-model",
            "vocabSize": vocab_size,
            "probe": {"text": PROBE, "tokenIds": rules.encode(PROBE)},
        },
        "trainer": {"horizon": "1", "gamma": 1.0, "badSpanShare": 0.0},
        "cases": cases,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "demo-model")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from a fresh build")
    args = parser.parse_args()
    text = json.dumps(build(args.model), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'differs from a fresh build'}")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
