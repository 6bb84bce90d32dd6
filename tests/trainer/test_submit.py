"""SubmitAnnotations against a real trainer: every bad input is INVALID_ARGUMENT naming the sequence
and field and stores nothing; partial_ok; duplicates; GetAnnotation; WithdrawAnnotations."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from transformers import AutoTokenizer

import tokenfeedback.v1.trainer_pb2 as pb

from .helpers import simple_sequence, status, trainer_stub

MAX_SEQ_LEN = 32
MAX_BATCH = 8


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    from common.process import start_server

    from .conftest import FAST, ROOT

    server = start_server(
        "trainer_server",
        ["--model", str(tiny_model_dir), "--data", str(tmp_path_factory.mktemp("submit")), "--port", "0",
         "--max-seq-len", str(MAX_SEQ_LEN), "--max-batch-sequences", str(MAX_BATCH), *FAST],
        name="trainer", cwd=ROOT, timeout=180,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(trainer):
    return trainer_stub(trainer.address)


@pytest.fixture(scope="module")
def vocab(tiny_model_dir) -> int:
    return json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]


@pytest.fixture(scope="module")
def text_ids(tiny_model_dir):
    """Prompt and completion ids of real text, for the span cases."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok("Paris is the capital of")["input_ids"]
    completion = tok(" Canada. Ottawa")["input_ids"]
    return prompt, completion, tok.decode(completion)


def span_sequence(text_ids, annotation_id, spans, **fields):
    prompt, completion, _ = text_ids
    return pb.AnnotatedSequence(annotation_id=annotation_id, prompt_token_ids=prompt,
                                completion_token_ids=completion, span_labels=spans, **fields)


def TL(position, weight, **kw):  # noqa: N802 - reads like the message it builds
    return pb.TokenLabel(position=position, weight=weight, **kw)


def bad_cases(vocab, text_ids):
    """(name, the bad sequence, the field the error must name)."""
    text = text_ids[2]
    s = simple_sequence
    return [
        ("future version", s("bad", model_version=1), "model_version"),
        ("negative version", s("bad", model_version=-1), "model_version"),
        ("position past the end", s("bad", token_labels=[TL(4, -1.0)]), "token_labels[0].position"),
        ("negative position", s("bad", token_labels=[TL(-1, -1.0)]), "token_labels[0].position"),
        ("position twice", s("bad", token_labels=[TL(1, -1.0), TL(1, -1.0)]), "token_labels[1].position"),
        ("completion id outside vocab", s("bad", completion=(4, vocab, 6)), "completion_token_ids[1]"),
        ("prompt id negative", s("bad", prompt=(1, -3)), "prompt_token_ids[1]"),
        ("replacement outside vocab", s("bad", token_labels=[TL(1, -1.0, replacement_token_id=vocab + 5)]),
         "token_labels[0].replacement_token_id"),
        ("replacement is the sampled token", s("bad", token_labels=[TL(1, -1.0, replacement_token_id=5)]),
         "token_labels[0].replacement_token_id"),
        ("NaN weight", s("bad", token_labels=[TL(1, math.nan)]), "token_labels[0].weight"),
        ("infinite weight", s("bad", token_labels=[TL(1, -math.inf)]), "token_labels[0].weight"),
        ("replacement weight 0", s("bad", token_labels=[TL(1, -1.0, replacement_token_id=9, replacement_weight=0.0)]),
         "token_labels[0].replacement_weight"),
        ("no labels", s("bad", token_labels=[]), "token_labels"),
        ("NaN sequence reward", s("bad", token_labels=[], sequence_reward=math.nan), "sequence_reward"),
        ("empty prompt", s("bad", prompt=()), "prompt_token_ids"),
        ("empty completion", s("bad", completion=()), "completion_token_ids"),
        ("too long", s("bad", completion=tuple(range(4, 4 + MAX_SEQ_LEN))), "completion_token_ids"),
        ("empty annotation id", s(""), "annotation_id"),
        ("behavior logprobs length", s("bad", behavior_logprobs=[-0.1, -0.2]), "behavior_logprobs"),
        ("behavior logprob positive", s("bad", behavior_logprobs=[-0.1, 0.5, -0.1, -0.1]), "behavior_logprobs[1]"),
        ("behavior logprob NaN", s("bad", behavior_logprobs=[-0.1, -0.1, math.nan, -0.1]), "behavior_logprobs[2]"),
        ("span past the text", span_sequence(text_ids, "bad", [pb.SpanLabel(start=0, end=len(text) + 3, weight=-1)]),
         "span_labels[0].end"),
        ("span empty", span_sequence(text_ids, "bad", [pb.SpanLabel(start=3, end=3, weight=-1)]),
         "span_labels[0].start"),
        ("span text differs", span_sequence(text_ids, "bad", [pb.SpanLabel(start=0, end=7, weight=-1, text="Germany")]),
         "span_labels[0].text"),
        ("overlapping spans, conflicting weights",
         span_sequence(text_ids, "bad", [pb.SpanLabel(start=0, end=7, weight=-1), pb.SpanLabel(start=3, end=9, weight=1)]),
         "span_labels[1]"),
        ("span and token label disagree",
         span_sequence(text_ids, "bad", [pb.SpanLabel(start=0, end=7, weight=-1)], token_labels=[TL(0, 0.5)]),
         "span_labels[0]"),
        ("span NaN weight", span_sequence(text_ids, "bad", [pb.SpanLabel(start=0, end=7, weight=math.nan)]),
         "span_labels[0].weight"),
    ]


def test_every_bad_input_is_invalid_argument_and_stores_nothing(stub, vocab, text_ids):
    for name, bad, field in bad_cases(vocab, text_ids):
        request = pb.SubmitAnnotationsRequest(sequences=[simple_sequence("good"), bad])
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitAnnotations(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        expected = f"sequences[1] (annotation_id={bad.annotation_id!r}).{field}"
        assert expected in info.value.details(), f"{name}: {info.value.details()!r} does not name {expected!r}"
        assert status(stub).annotations_total == 0, f"{name}: something was stored"


def test_oversize_and_empty_batches(stub):
    for count in (0, MAX_BATCH + 1):
        request = pb.SubmitAnnotationsRequest(sequences=[simple_sequence(f"s{i}") for i in range(count)])
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitAnnotations(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("sequences:"), info.value.details()
    assert status(stub).annotations_total == 0


def test_partial_ok_rejects_per_sequence_and_stores_the_valid_ones(stub, vocab, text_ids):
    cases = bad_cases(vocab, text_ids)[:5]
    sequences = [simple_sequence("partial-good")]
    for i, (_, bad, _) in enumerate(cases):
        bad.annotation_id = f"partial-bad-{i}"
        sequences.append(bad)
    reply = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=sequences, partial_ok=True), timeout=30)
    assert [r.status for r in reply.results] == [pb.SUBMIT_STATUS_ACCEPTED] + [pb.SUBMIT_STATUS_REJECTED] * len(cases)
    for result, (_, _, field) in zip(reply.results[1:], cases, strict=True):
        assert field in result.reason, result.reason
    assert status(stub).annotations_total == 1
    with pytest.raises(grpc.RpcError) as info:
        stub.GetAnnotation(pb.GetAnnotationRequest(annotation_id="partial-bad-0"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_spans_become_rows_and_read_back(stub, text_ids, tiny_model_dir):
    prompt, completion, text = text_ids
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    france = tok(" France")["input_ids"][0]
    bad_span = pb.SpanLabel(start=0, end=text.index("."), weight=-1.0, replacement_text=" France", text=" Canada")
    seq = span_sequence(text_ids, "span-1", [bad_span], annotator_id="ann-7", metadata={"tool": "label-studio"},
                        sequence_reward=0.25)
    reply = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[seq]), timeout=30)
    assert reply.results[0].status == pb.SUBMIT_STATUS_ACCEPTED
    stored = stub.GetAnnotation(pb.GetAnnotationRequest(annotation_id="span-1"), timeout=30)
    assert stored.state == pb.ANNOTATION_STATE_PENDING
    assert list(stored.prompt_token_ids) == prompt and list(stored.completion_token_ids) == completion
    rows = {(r.position, r.token_id, r.replacement): r.weight for r in stored.rows}
    assert rows == {(0, completion[0], False): -1.0, (0, france, True): 1.0}
    assert stored.annotator_id == "ann-7" and dict(stored.metadata) == {"tool": "label-studio"}
    assert stored.sequence_reward == 0.25 and stored.stored_at > 0
    # the reply counts the rows after the horizon step: the sequence reward adds the last token's row
    assert reply.results[0].rows == 3


def test_text_inputs_are_tokenized(stub, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    seq = pb.AnnotatedSequence(annotation_id="text-1", prompt_text="Tokyo is the capital of",
                               completion_text=" Japan.", token_labels=[TL(0, 1.0)])
    reply = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[seq]), timeout=30)
    assert reply.results[0].status == pb.SUBMIT_STATUS_ACCEPTED
    stored = stub.GetAnnotation(pb.GetAnnotationRequest(annotation_id="text-1"), timeout=30)
    assert tok.decode(list(stored.completion_token_ids)) == " Japan."
    assert tok.decode(list(stored.prompt_token_ids)) == "Tokyo is the capital of"


def test_duplicates_change_nothing_and_withdraw(stub):
    first = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[simple_sequence("dup-1")]), timeout=30)
    assert first.results[0].status == pb.SUBMIT_STATUS_ACCEPTED
    before = status(stub).annotations_total
    # the same id again, even with other content, and twice within one request
    again = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[
        simple_sequence("dup-1", completion=(9, 9, 9)), simple_sequence("dup-2"), simple_sequence("dup-2")]), timeout=30)
    assert [r.status for r in again.results] == [pb.SUBMIT_STATUS_DUPLICATE, pb.SUBMIT_STATUS_ACCEPTED,
                                                 pb.SUBMIT_STATUS_DUPLICATE]
    assert status(stub).annotations_total == before + 1
    stored = stub.GetAnnotation(pb.GetAnnotationRequest(annotation_id="dup-1"), timeout=30)
    assert list(stored.completion_token_ids) == [4, 5, 6, 7]
    reply = stub.WithdrawAnnotations(pb.WithdrawAnnotationsRequest(annotation_ids=["dup-1", "nope"]), timeout=30)
    assert reply.withdrawn == 1 and list(reply.unknown_ids) == ["nope"]
    stored = stub.GetAnnotation(pb.GetAnnotationRequest(annotation_id="dup-1"), timeout=30)
    assert stored.state == pb.ANNOTATION_STATE_WITHDRAWN
    assert status(stub).annotations_withdrawn == 1
