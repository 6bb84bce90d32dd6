"""The Python client against the real policy and trainer servers (subprocesses on 127.0.0.1).

Generate, score, tokenize, align spans, model info; submit (messages and dicts, duplicates,
rejections with the field named, partial acceptance), read back, withdraw, train with progress,
status, checkpoint; deadlines and bad addresses as typed errors, never a hang.
"""

from __future__ import annotations

import math
import socket
import time

import pytest

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from tokenfeedback import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PolicyClient,
    TrainerClient,
    UnavailableError,
)
from tokenfeedback.imports import from_labelstudio

PROMPT = "Ottawa is the capital of"


@pytest.fixture(scope="module")
def policy(servers):
    with PolicyClient(servers.policy_address) as client:
        yield client


@pytest.fixture(scope="module")
def trainer(servers):
    with TrainerClient(servers.trainer_address) as client:
        yield client


def test_model_info_and_health(policy, trainer):
    info = policy.model_info()
    assert info.vocab_size > 256 and info.max_new_tokens >= 1 and info.model_version >= 0
    assert policy.serving() and trainer.serving()
    policy.wait_ready(timeout=5)


def test_generate_streams_tokens_that_add_up(policy):
    generation = policy.generate(PROMPT, max_new_tokens=6, temperature=0.8, seed=3, num_alternatives=3,
                                 stop_on_eos=False)
    tokens = []
    for token in generation:
        assert generation.start is not None  # the start event came first
        tokens.append(token)
    done = generation.result()
    assert [t.position for t in tokens] == list(range(6)) == [t.position for t in done.tokens]
    assert "".join(t.text for t in tokens) == done.text and done.finish_reason == "length"
    assert done.prompt_text == PROMPT and len(done.prompt_token_ids) >= 1
    for t in tokens:
        assert t.logprob <= 0 and len(t.alternatives) == 3 and t.rank >= 1
        assert t.model_version == done.model_version
        assert [a.logprob for a in t.alternatives] == sorted((a.logprob for a in t.alternatives), reverse=True)


def test_same_seed_same_tokens_and_prompt_ids(policy):
    a = policy.complete(PROMPT, max_new_tokens=5, seed=11, stop_on_eos=False)
    b = policy.complete(a.prompt_token_ids, max_new_tokens=5, seed=11, stop_on_eos=False)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_score_matches_the_streamed_logprobs(policy):
    done = policy.complete(PROMPT, max_new_tokens=5, temperature=0, stop_on_eos=False)
    scored = policy.score(done.prompt_token_ids, done.token_ids, candidate_token_ids=[done.token_ids[0]])
    assert [t.token_id for t in scored.tokens] == done.token_ids
    for streamed, teacher_forced in zip(done.tokens, scored.tokens, strict=True):
        assert teacher_forced.logprob == pytest.approx(streamed.logprob, abs=1e-3)
        assert teacher_forced.rank == 1  # greedy: every token was the most likely one
    assert scored.total_logprob == pytest.approx(sum(done.logprobs), abs=1e-3)
    assert scored.tokens[0].candidate_logprobs[0] == pytest.approx(scored.tokens[0].logprob, abs=1e-5)


def test_tokenize_and_align_spans_over_emoji_and_cjk(policy):
    text = " Paris 😀 漢字 is"
    reply = policy.tokenize(text)
    assert reply.text == text and "".join(t.text for t in reply.tokens) == text
    ids = [t.token_id for t in reply.tokens]
    assert policy.tokenize(ids).text == text
    emoji = text.index("😀")
    aligned = policy.align_spans([(emoji, emoji + 1, "😀"), {"start": 1, "end": 6}], token_ids=ids)
    assert len(aligned.spans) == 2
    covered = "".join(aligned.tokens[p].text for p in aligned.spans[0].token_positions)
    assert "😀" in covered
    utf16 = len(text[:text.index("漢")].encode("utf-16-le")) // 2  # one more than the code-point offset
    retried = policy.align_spans([(utf16, utf16 + 2, "漢字")], text=text)
    assert (retried.spans[0].start, retried.spans[0].end) == (text.index("漢"), text.index("漢") + 2)


def test_policy_errors_are_typed_and_name_the_field(policy):
    with pytest.raises(InvalidArgumentError) as info:
        policy.complete(PROMPT, top_p=1.5)
    assert "top_p" in (info.value.field or "") and "1.5" in info.value.message
    with pytest.raises(InvalidArgumentError):
        policy.score(PROMPT, [10**7])
    assert policy.model_info().vocab_size > 0  # the server keeps serving


def test_submit_duplicate_get_and_withdraw(policy, trainer):
    done = policy.complete(PROMPT, max_new_tokens=4, seed=5, stop_on_eos=False)
    vocab = policy.model_info().vocab_size
    replacement = (done.token_ids[1] + 1) % vocab
    sequence = done.annotate(
        f"it-{time.time_ns()}",
        token_labels=[{"position": 1, "weight": -1, "replacementTokenId": replacement},
                      trainer_pb2.TokenLabel(position=3, weight=0.5)],
        annotator_id="pytest", metadata={"k": "v"},
    )
    [first] = trainer.submit(sequence)
    assert first.status == trainer_pb2.SUBMIT_STATUS_ACCEPTED and first.rows == 3
    [again] = trainer.submit([sequence])
    assert again.status == trainer_pb2.SUBMIT_STATUS_DUPLICATE
    stored = trainer.get_annotation(sequence.annotation_id)
    assert stored.state == trainer_pb2.ANNOTATION_STATE_PENDING
    assert list(stored.completion_token_ids) == done.token_ids and list(stored.prompt_token_ids) == done.prompt_token_ids
    rows = sorted((r.position, r.token_id, r.weight, r.replacement) for r in stored.rows)
    assert rows == [(1, done.token_ids[1], -1.0, False), (1, replacement, 1.0, True), (3, done.token_ids[3], 0.5, False)]
    assert stored.annotator_id == "pytest" and dict(stored.metadata) == {"k": "v"}
    withdrawn = trainer.withdraw([sequence.annotation_id, "no-such-id"])
    assert withdrawn.withdrawn == 1 and list(withdrawn.unknown_ids) == ["no-such-id"]
    assert trainer.get_annotation(sequence.annotation_id).state == trainer_pb2.ANNOTATION_STATE_WITHDRAWN
    with pytest.raises(NotFoundError):
        trainer.get_annotation("no-such-id")


def test_invalid_submit_names_the_field_and_stores_nothing(trainer):
    good = {"annotationId": f"ok-{time.time_ns()}", "promptText": PROMPT, "completionText": " Canada.",
            "sequenceReward": 1.0}
    bad = {"annotationId": f"bad-{time.time_ns()}", "promptText": PROMPT, "completionText": " Canada.",
           "tokenLabels": [{"position": 99, "weight": -1}]}
    before = trainer.status().annotations_total
    with pytest.raises(InvalidArgumentError) as info:
        trainer.submit([good, bad])
    assert "sequences[1]" in info.value.field and info.value.field.endswith("token_labels[0].position")
    assert trainer.status().annotations_total == before
    with pytest.raises(NotFoundError):
        trainer.get_annotation(good["annotationId"])
    ok, rejected = trainer.submit([good, bad], partial_ok=True)
    assert ok.status == trainer_pb2.SUBMIT_STATUS_ACCEPTED
    assert rejected.status == trainer_pb2.SUBMIT_STATUS_REJECTED and "token_labels[0].position" in rejected.reason
    assert trainer.status().annotations_total == before + 1


def test_label_studio_export_round_trip(policy, trainer):
    """A Label Studio export, converted and submitted: the Bad region's first token gets the row and
    its replacement a row at the first differing token; a Good region weighs each of its tokens.
    Expected rows come from the policy's Tokenize/AlignSpans (the same tokenizer and span rule)."""
    completion = " Paris is the capital of 😀 France."
    ids = [t.token_id for t in policy.tokenize(completion).tokens]
    france, capital = completion.index("France"), completion.index("capital of 😀")
    export = [{
        "id": 901,
        "data": {"prompt": PROMPT, "completion": completion, "completion_token_ids": ids},
        "annotations": [{"id": time.time_ns() % 10**9, "updated_at": "2026-01-01T00:00:00Z", "result": [
            {"id": "r1", "type": "labels", "from_name": "label", "to_name": "text",
             "value": {"start": france, "end": france + 6, "text": "France", "labels": ["Bad"]}},
            {"id": "r1", "type": "textarea", "from_name": "fix", "to_name": "text", "value": {"text": ["Canada"]}},
            {"id": "r2", "type": "labels", "from_name": "label", "to_name": "text",
             "value": {"start": capital, "end": capital + 12, "text": "capital of 😀", "labels": ["Good"]}},
        ]}],
    }]
    [sequence] = from_labelstudio(export).sequences
    [result] = trainer.submit([sequence])
    assert result.status == trainer_pb2.SUBMIT_STATUS_ACCEPTED, result.reason
    bad, good = policy.align_spans([(france, france + 6), (capital, capital + 12)], token_ids=ids).spans
    first = bad.token_positions[0]
    corrected = [t.token_id for t in policy.tokenize(" Canada.").tokens]
    original = ids[first:]
    differ = next(j for j, (a, b) in enumerate(zip(corrected, original, strict=False)) if a != b)
    expected = {(first, ids[first], -1.0, False), (first + differ, corrected[differ], 1.0, True)}
    expected |= {(p, ids[p], 1.0, False) for p in good.token_positions}
    stored = trainer.get_annotation(sequence.annotation_id)
    assert {(r.position, r.token_id, r.weight, r.replacement) for r in stored.rows} == expected
    assert len(stored.rows) == len(expected) == result.rows


def test_train_streams_progress_and_publishes(policy, trainer):
    done = policy.complete(PROMPT, max_new_tokens=4, seed=21, stop_on_eos=False)
    trainer.submit([done.annotate(f"train-{time.time_ns()}", token_labels=[{"position": 0, "weight": -1}])])
    version_before = policy.model_info().model_version
    progress = list(trainer.train(steps=2, beta=0.05, learning_rate=1e-3))
    assert progress[-1].done and [p.step for p in progress if not p.done] == [1, 2]
    assert all(math.isfinite(p.loss) and math.isfinite(p.kl) for p in progress)
    assert progress[-1].published_version == version_before + 1
    assert policy.model_info().model_version == version_before + 1
    status = trainer.status()
    assert status.model_version == version_before + 1 and status.step >= 2
    assert status.policies[0].model_version == version_before + 1 and status.policies[0].reachable
    checkpoint = trainer.save_checkpoint()
    assert checkpoint.model_version == status.model_version and checkpoint.path


def test_stream_deadline_is_a_typed_error(policy):
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        policy.complete(PROMPT, max_new_tokens=512, stop_on_eos=False, timeout=0.05)
    assert time.monotonic() - started < 5
    assert policy.model_info().vocab_size > 0


def test_unary_deadline_is_a_typed_error(servers):
    slow = PolicyClient(servers.policy_address, timeout=0.0005, retries=0)
    with pytest.raises(DeadlineExceededError, match="deadline"):
        for _ in range(50):  # a sub-millisecond deadline: one of these calls runs out of time
            slow.score(PROMPT, " Canada. " * 40)


def test_bad_address_is_a_clear_error_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(UnavailableError, match=f"127.0.0.1:{port}"):
        TrainerClient(f"127.0.0.1:{port}").status()
    assert time.monotonic() - started < 10
