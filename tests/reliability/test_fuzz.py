"""Property-based fuzzing of every RPC of both servers (hypothesis), over real gRPC.

Each example sends one request (a request stream for UpdateWeights) built in one of four ways:
a random message of the method's input type (every field by its type, nested messages, maps,
out-of-range numbers, NaN, odd Unicode), a valid request with random fields merged into it, a
valid request's bytes mutated (bits flipped, cut, spliced), or bytes that are not protobuf at all.
The calls go through a generic channel with identity serializers, so the server sees exactly
those bytes, with the admin token so that every request reaches its handler.

Properties: every answer is OK or a deliberate status (INVALID_ARGUMENT and friends, never
INTERNAL, UNKNOWN or UNAVAILABLE); both servers report SERVING afterwards; the trainer's store
grew by exactly the sequences it acknowledged ACCEPTED; the policy's weights never changed.
Examples are derandomized (the same every run) and bounded per method, so this stays short.
"""

from __future__ import annotations

import math

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenfeedback.v1.common_pb2 as cpb
import tokenfeedback.v1.policy_pb2 as ppb
import tokenfeedback.v1.trainer_pb2 as tpb
from tests.reliability.conftest import ADMIN_TOKEN, metadata

POLICY_SERVICE = ppb.DESCRIPTOR.services_by_name["PolicyService"]
TRAINER_SERVICE = tpb.DESCRIPTOR.services_by_name["TrainerService"]
METHODS = [*POLICY_SERVICE.methods, *TRAINER_SERVICE.methods]

# What a fuzzed call may answer besides OK: the deliberate statuses of (docs/design.md, "Errors and
# limits"). DEADLINE_EXCEEDED only where a valid request may legitimately run long.
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE}
SLOW_OK = {"Train"}  # a random `steps` up to 1e6 is valid: it runs until the call's deadline stops it
TIMEOUT = {"Train": 3.0}
EXAMPLES = {"Train": 30, "SaveCheckpoint": 20}
DEFAULT_EXAMPLES = 100
VOCAB = 376  # the tiny model's vocabulary (tests/conftest.py); seeds stay inside it

# ---- random messages from descriptors ------------------------------------------------------------

FD = pb_descriptor.FieldDescriptor
INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1), FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1), FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # lone surrogates are not str for protobuf


def scalar(field: pb_descriptor.FieldDescriptor) -> st.SearchStrategy:
    if field.type in INT_RANGES:
        low, high = INT_RANGES[field.type]
        interesting = [v for v in (-1, 0, 1, 2, 7, 8, 9, 63, 64, 65, 375, 376, 1023, 1024, 1025, 10**6) if low <= v <= high]
        return st.one_of(st.integers(max(low, -3), min(high, 80)), st.sampled_from(interesting + [low, high]),
                         st.integers(low, high))
    if field.type == FD.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == FD.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from([0.0, -1.0, 1.0, 0.5, math.inf, -math.inf, math.nan, 1e308]))
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_STRING:
        return st.one_of(TEXT, st.sampled_from(["full", "likelihood", "pg_clip", "float32", "bfloat16",
                                                "transformer.wte.weight", "a" * 300, ""]))
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FD.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 50))
    raise AssertionError(f"no strategy for {field.full_name}")


@st.composite
def random_message(draw, descriptor: pb_descriptor.Descriptor, depth: int = 0):
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for k, v in draw(st.dictionaries(scalar(key), scalar(value), max_size=3)).items():
                getattr(message, field.name)[k] = v
        elif field.message_type is not None:
            if depth >= 3:
                continue
            count = draw(st.integers(0, 4)) if field.is_repeated else 1
            for _ in range(count):
                child = draw(random_message(field.message_type, depth + 1))
                if field.is_repeated:
                    getattr(message, field.name).add().CopyFrom(child)
                else:
                    getattr(message, field.name).CopyFrom(child)
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(scalar(field), max_size=8)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    return message


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """Byte-level damage to a serialized message."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "splice"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(at, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "splice" and data:
            data[at:at] = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


# ---- valid requests (the seeds that merging and mutation start from) -----------------------------


@st.composite
def valid_sequence(draw) -> tpb.AnnotatedSequence:
    annotation_id = f"fuzz-{draw(st.uuids()).hex[:12]}"
    if draw(st.booleans()):
        return tpb.AnnotatedSequence(
            annotation_id=annotation_id, prompt_token_ids=[1, 2, 3], completion_token_ids=[4, 5, 6, 7],
            token_labels=[tpb.TokenLabel(position=1, weight=-1.0, replacement_token_id=9)],
            behavior_logprobs=[-0.5, -1.0, -0.1, -2.0], sequence_reward=0.5, annotator_id="fuzz", metadata={"k": "v"})
    return tpb.AnnotatedSequence(
        annotation_id=annotation_id, prompt_text="Paris is", completion_text=" the capital of France.",
        span_labels=[tpb.SpanLabel(start=1, end=4, weight=-1.0, replacement_text="a", text="the")])


SEEDS: dict[str, st.SearchStrategy] = {
    "Generate": st.sampled_from([
        ppb.GenerateRequest(prompt_text="Paris is", params=ppb.SamplingParams(
            max_new_tokens=4, temperature=0.7, top_k=5, top_p=0.9, seed=1, stop=["."], num_alternatives=3)),
        ppb.GenerateRequest(prompt_token_ids=[1, 2, 3], params=ppb.SamplingParams(max_new_tokens=2, temperature=0))]),
    "Score": st.just(ppb.ScoreRequest(prompt_token_ids=[1, 2], completion_token_ids=[3, 4], num_alternatives=2,
                                      candidate_token_ids=[5])),
    "Tokenize": st.sampled_from([ppb.TokenizeRequest(text="Paris é 😀 漢字"), ppb.TokenizeRequest(token_ids=[1, 2, 3])]),
    "AlignSpans": st.just(ppb.AlignSpansRequest(text="Paris is the capital", spans=[
        cpb.CharSpan(start=0, end=5), cpb.CharSpan(start=6, end=8, text="is")])),
    "GetModelInfo": st.just(ppb.GetModelInfoRequest()),
    "UpdateWeights": st.sampled_from([
        ppb.WeightUpdateMessage(header=ppb.WeightUpdateHeader(target_version=1, tensor_count=1, total_bytes=16)),
        ppb.WeightUpdateMessage(chunk=ppb.TensorChunk(name="transformer.wte.weight", dtype="float32",
                                                      shape=[VOCAB, 64], offset=0, data=bytes(16))),
        ppb.WeightUpdateMessage(commit=ppb.WeightUpdateCommit(sha256="00" * 32))]),
    "SubmitAnnotations": st.builds(lambda seqs, partial: tpb.SubmitAnnotationsRequest(sequences=seqs, partial_ok=partial),
                                   st.lists(valid_sequence(), min_size=1, max_size=3), st.booleans()),
    "WithdrawAnnotations": st.just(tpb.WithdrawAnnotationsRequest(annotation_ids=["fuzz-none", "x"])),
    "GetAnnotation": st.just(tpb.GetAnnotationRequest(annotation_id="fuzz-none")),
    "GetStatus": st.just(tpb.GetStatusRequest()),
    "Train": st.just(tpb.TrainRequest(steps=1, variant="likelihood", beta=0.1, learning_rate=1e-3, batch_size=2,
                                      horizon="2", gamma=0.9, publish=False)),
    "SaveCheckpoint": st.just(tpb.SaveCheckpointRequest()),
}


def merged(seed, extra):
    out = type(seed)()
    out.CopyFrom(seed)
    out.MergeFrom(extra)
    return out


def payloads(method: pb_descriptor.MethodDescriptor) -> st.SearchStrategy[bytes]:
    """The bytes of one request message for `method`, by one of the four constructions."""
    descriptor = method.input_type
    seed = SEEDS[method.name]
    return st.one_of(
        random_message(descriptor).map(lambda m: m.SerializeToString()),
        st.tuples(seed, random_message(descriptor)).map(lambda p: merged(*p).SerializeToString()),
        seed.flatmap(lambda s: mutated(s.SerializeToString())),
        st.binary(max_size=300),
        seed.map(lambda s: s.SerializeToString()),
    )


# ---- calling ---------------------------------------------------------------------------------------


def invoke(channel: grpc.Channel, method: pb_descriptor.MethodDescriptor, payload) -> list[bytes]:
    """One call with raw bytes in and out; returns the response messages' bytes."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kwargs = dict(metadata=metadata(ADMIN_TOKEN), timeout=TIMEOUT.get(method.name, 20.0))
    if method.client_streaming:
        return [channel.stream_unary(path)(iter(payload), **kwargs)]
    if method.server_streaming:
        return list(channel.unary_stream(path)(payload, **kwargs))
    return [channel.unary_unary(path)(payload, **kwargs)]


def serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def trainer_total(channel: grpc.Channel) -> int:
    reply = channel.unary_unary("/tokenfeedback.v1.TrainerService/GetStatus")(
        tpb.GetStatusRequest().SerializeToString(), metadata=metadata(ADMIN_TOKEN), timeout=30)
    return tpb.TrainerStatus.FromString(reply).annotations_total


def policy_fingerprint(channel: grpc.Channel) -> tuple:
    info = ppb.ModelInfo.FromString(channel.unary_unary("/tokenfeedback.v1.PolicyService/GetModelInfo")(
        b"", metadata=metadata(ADMIN_TOKEN), timeout=30))
    score = ppb.ScoreResponse.FromString(channel.unary_unary("/tokenfeedback.v1.PolicyService/Score")(
        ppb.ScoreRequest(prompt_token_ids=[1, 2], completion_token_ids=[3, 4, 5]).SerializeToString(),
        metadata=metadata(ADMIN_TOKEN), timeout=30))
    return info.model_version, tuple(t.logprob for t in score.tokens)


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_fuzzed_requests_get_a_proper_status_and_change_only_what_was_acknowledged(fuzz_servers, method):
    policy, trainer = fuzz_servers.policy_channel, fuzz_servers.trainer_channel
    channel = policy if method.containing_service is POLICY_SERVICE else trainer
    allowed = ALLOWED | ({grpc.StatusCode.DEADLINE_EXCEEDED} if method.name in SLOW_OK else set())
    total_before, weights_before = trainer_total(trainer), policy_fingerprint(policy)
    accepted: set[str] = set()
    seen: list[str] = []

    one = payloads(method)
    requests = st.lists(one, max_size=5) if method.client_streaming else one

    @settings(max_examples=EXAMPLES.get(method.name, DEFAULT_EXAMPLES), deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(requests)
    def check(payload):
        try:
            replies = invoke(channel, method, payload)
        except grpc.RpcError as err:
            assert err.code() in allowed, f"{method.name}: {err.code()} {err.details()!r} for {payload!r:.300}"
            seen.append(err.code().name)
            return
        seen.append("OK")
        if method.name == "SubmitAnnotations":
            for result in tpb.SubmitAnnotationsResponse.FromString(replies[0]).results:
                if result.status == tpb.SUBMIT_STATUS_ACCEPTED:
                    assert result.annotation_id not in accepted, f"{result.annotation_id} accepted twice"
                    accepted.add(result.annotation_id)

    check()
    assert serving(policy) and serving(trainer), "a server stopped serving"
    assert trainer_total(trainer) - total_before == len(accepted), "the store holds what was not acknowledged"
    assert policy_fingerprint(policy) == weights_before, "fuzzing changed the policy's weights"
    assert "INVALID_ARGUMENT" in seen, f"{method.name}: no request was refused; the fuzzing reached nothing"
    if method.name == "SubmitAnnotations":
        assert accepted, "no fuzzed sequence was valid: the accounting above checked nothing"
        for annotation_id in sorted(accepted)[:10]:  # acknowledged means stored and readable
            stored = tpb.StoredAnnotation.FromString(trainer.unary_unary("/tokenfeedback.v1.TrainerService/GetAnnotation")(
                tpb.GetAnnotationRequest(annotation_id=annotation_id).SerializeToString(),
                metadata=metadata(ADMIN_TOKEN), timeout=30))
            assert stored.annotation_id == annotation_id
