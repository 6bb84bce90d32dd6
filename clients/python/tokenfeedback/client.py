"""Typed clients for the policy and trainer services.

    policy = PolicyClient("127.0.0.1:50051")
    done = policy.complete("The capital of Canada is", max_new_tokens=8, temperature=0)
    bad = min(done.tokens, key=lambda t: t.logprob)
    trainer = TrainerClient("127.0.0.1:50052")
    trainer.submit([done.annotate(token_labels=[{"position": bad.position, "weight": -1}])])

Requests and replies are the generated protobuf messages (`tokenfeedback.v1.*_pb2`, typed by
their .pyi stubs); the clients add what a caller should not have to write each time: building
requests from plain Python values, deadlines, retries for idempotent calls, typed errors
(tokenfeedback.errors), and collecting a streamed generation into a `Completion`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tokenfeedback.v1.common_pb2 as common_pb2
import tokenfeedback.v1.policy_pb2 as policy_pb2
import tokenfeedback.v1.policy_pb2_grpc as policy_pb2_grpc
import tokenfeedback.v1.trainer_pb2 as trainer_pb2
import tokenfeedback.v1.trainer_pb2_grpc as trainer_pb2_grpc
from tokenfeedback.connection import Connection, RetryPolicy
from tokenfeedback.errors import DeadlineExceededError, TokenfeedbackError

FINISH_REASONS = {
    policy_pb2.FINISH_REASON_UNSPECIFIED: "unspecified",
    policy_pb2.FINISH_REASON_LENGTH: "length",
    policy_pb2.FINISH_REASON_EOS: "eos",
    policy_pb2.FINISH_REASON_STOP: "stop",
}

# SamplingParams fields generate() takes as keyword arguments.
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_on_eos", "num_alternatives")

# TrainRequest fields train() takes as keyword overrides.
TRAIN_OVERRIDES = ("variant", "beta", "learning_rate", "batch_size", "horizon", "gamma", "publish")


class _Client:
    """What both clients share: the connection, health, closing."""

    service = ""

    def __init__(
        self,
        address: str,
        *,
        root_certificates: str | Path | bytes | None = None,
        tls: bool | None = None,
        client_certificate: str | Path | bytes | None = None,
        client_key: str | Path | bytes | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
        connect_timeout: float = 5.0,
        retries: int | RetryPolicy = 4,
        max_message_bytes: int = 64 * 1024 * 1024,
    ):
        """address: HOST:PORT. root_certificates: PEM path or bytes (turns TLS on; tls=True alone
        uses the system roots). token: bearer token sent on every call. timeout: seconds for a
        unary call, retries included (None: no deadline); streams take their own `timeout`.
        connect_timeout: how long one connection attempt may take. retries: retries on
        UNAVAILABLE for idempotent calls (or a RetryPolicy)."""
        self.connection = Connection(
            address,
            root_certificates=root_certificates,
            tls=tls,
            client_certificate=client_certificate,
            client_key=client_key,
            tls_server_name=tls_server_name,
            token=token,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retries=retries,
            max_message_bytes=max_message_bytes,
        )
        self._health = health_pb2_grpc.HealthStub(self.connection.channel)
        self._stub = self._make_stub(self.connection.channel)

    def _make_stub(self, channel):
        raise NotImplementedError

    @property
    def address(self) -> str:
        return self.connection.address

    @property
    def channel(self):
        """The underlying grpc.Channel (with the bearer token), for RPCs not wrapped here."""
        return self.connection.channel

    def _unary(self, method: str, request, *, idempotent: bool, timeout: float | None):
        fn = getattr(self._stub, method)
        return self.connection.unary(f"{self.service}/{method}", fn, request, idempotent=idempotent, timeout=timeout)

    def _stream(self, method: str, request, *, idempotent: bool, timeout: float | None) -> Iterator:
        fn = getattr(self._stub, method)
        return self.connection.stream(f"{self.service}/{method}", fn, request, idempotent=idempotent, timeout=timeout)

    def serving(self, timeout: float | None = None) -> bool:
        """Whether the server's health service says SERVING (its model is loaded)."""
        request = health_pb2.HealthCheckRequest(service="")
        reply = self.connection.unary("grpc.health.v1.Health/Check", self._health.Check, request,
                                      idempotent=True, timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.2) -> None:
        """Block until the server is SERVING; DeadlineExceededError naming the last reason if it
        is not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "not SERVING yet"
        while True:
            try:
                if self.serving(timeout=max(0.05, min(2.0, deadline - time.monotonic()))):
                    return
            except TokenfeedbackError as exc:
                last = str(exc)
            if time.monotonic() + poll > deadline:
                raise DeadlineExceededError(f"{self.address} not SERVING after {timeout:g}s: {last}",
                                            method="wait_ready", address=self.address)
            time.sleep(poll)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- policy --------------------------------------------------------------------------------


@dataclass
class Completion:
    """A finished generation: everything the stream carried, in one place."""

    generation_id: str
    prompt_token_ids: list[int]
    prompt_text: str
    tokens: list[policy_pb2.TokenEvent]
    text: str
    model_version: int
    finish_reason: str  # "length", "eos" or "stop"
    stop_sequence: str = ""

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def logprobs(self) -> list[float]:
        return [t.logprob for t in self.tokens]

    @property
    def sampling_logprobs(self) -> list[float]:
        return [t.sampling_logprob for t in self.tokens]

    def annotate(
        self,
        annotation_id: str | None = None,
        *,
        token_labels: Iterable[trainer_pb2.TokenLabel | Mapping[str, Any]] = (),
        span_labels: Iterable[trainer_pb2.SpanLabel | Mapping[str, Any]] = (),
        sequence_reward: float | None = None,
        annotator_id: str = "",
        metadata: Mapping[str, str] | None = None,
        behavior_logprobs: bool = True,
    ) -> trainer_pb2.AnnotatedSequence:
        """This completion as an AnnotatedSequence with the sampled ids (the truth), its model
        version and (by default) its sampling logprobs. annotation_id defaults to the generation id."""
        sequence = trainer_pb2.AnnotatedSequence(
            annotation_id=annotation_id or self.generation_id,
            prompt_token_ids=self.prompt_token_ids,
            completion_token_ids=self.token_ids,
            model_version=self.model_version,
            behavior_logprobs=self.sampling_logprobs if behavior_logprobs else [],
            token_labels=[_message(trainer_pb2.TokenLabel, x, "token_labels") for x in token_labels],
            span_labels=[_message(trainer_pb2.SpanLabel, x, "span_labels") for x in span_labels],
            annotator_id=annotator_id,
            metadata=dict(metadata or {}),
        )
        if sequence_reward is not None:
            sequence.sequence_reward = sequence_reward
        return sequence


@dataclass
class Generation(Iterator[policy_pb2.TokenEvent]):
    """A running Generate stream. Iterating yields the TokenEvents as they arrive; `start` and
    `end` hold the stream's first and last events once seen. `cancel()` (or leaving a `with`
    block) stops the server generating."""

    _events: Iterator[policy_pb2.GenerateEvent]
    start: policy_pb2.GenerationStart | None = None
    end: policy_pb2.GenerationEnd | None = None
    tokens: list[policy_pb2.TokenEvent] = field(default_factory=list)

    def __next__(self) -> policy_pb2.TokenEvent:
        for event in self._events:
            kind = event.WhichOneof("event")
            if kind == "token":
                self.tokens.append(event.token)
                return event.token
            if kind == "start":
                self.start = event.start
            elif kind == "end":
                self.end = event.end
        raise StopIteration

    def cancel(self) -> None:
        self._events.close()  # the connection's generator cancels the call in its finally

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def result(self) -> Completion:
        """Drain the stream and return the whole completion."""
        for _ in self:
            pass
        if self.start is None or self.end is None:
            raise TokenfeedbackError("Generate stream ended without its start/end events", method="Generate")
        return Completion(
            generation_id=self.start.generation_id,
            prompt_token_ids=list(self.start.prompt_token_ids),
            prompt_text=self.start.prompt_text,
            tokens=self.tokens,
            text=self.end.completion_text,
            model_version=self.end.model_version,
            finish_reason=FINISH_REASONS.get(self.end.finish_reason, str(self.end.finish_reason)),
            stop_sequence=self.end.stop_sequence,
        )


class PolicyClient(_Client):
    """Client of PolicyService: generate, score, tokenize, align spans, model info."""

    service = "tokenfeedback.v1.PolicyService"

    def _make_stub(self, channel):
        return policy_pb2_grpc.PolicyServiceStub(channel)

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        params: policy_pb2.SamplingParams | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> Generation:
        """Start sampling a completion of `prompt` (text, or token ids); iterate the result for
        TokenEvents as they arrive. Sampling options as keywords: max_new_tokens, temperature,
        top_k, top_p, seed, stop (a string or a list), stop_on_eos, num_alternatives (or a whole
        SamplingParams as `params`). `timeout` bounds the whole stream (default: none)."""
        if params is not None and sampling:
            raise TypeError("generate: give sampling options as keywords or as params, not both")
        request = policy_pb2.GenerateRequest(params=params or sampling_params(**sampling))
        _set_prompt(request, prompt, "prompt")
        return Generation(self._stream("Generate", request, idempotent=True, timeout=timeout))

    def complete(self, prompt: str | Sequence[int], *, timeout: float | None = None, **sampling: Any) -> Completion:
        """Generate a whole completion and return it (prompt ids, token events, text, version,
        finish reason)."""
        return self.generate(prompt, timeout=timeout, **sampling).result()

    def score(
        self,
        prompt: str | Sequence[int],
        completion: str | Sequence[int],
        *,
        num_alternatives: int = 0,
        candidate_token_ids: Sequence[int] = (),
        timeout: float | None = None,
    ) -> policy_pb2.ScoreResponse:
        """Teacher-forced logprobs of `completion` after `prompt` (each text or token ids)."""
        request = policy_pb2.ScoreRequest(num_alternatives=num_alternatives, candidate_token_ids=candidate_token_ids)
        _set_prompt(request, prompt, "prompt")
        if isinstance(completion, str):
            request.completion_text = completion
        else:
            request.completion_token_ids.extend(_ids(completion, "completion"))
        return self._unary("Score", request, idempotent=True, timeout=timeout)

    def tokenize(
        self, text_or_ids: str | Sequence[int], *, add_special_tokens: bool = False, timeout: float | None = None
    ) -> policy_pb2.TokenizeResponse:
        """Text to tokens with code-point offsets, or token ids to text pieces."""
        request = policy_pb2.TokenizeRequest(add_special_tokens=add_special_tokens)
        if isinstance(text_or_ids, str):
            request.text = text_or_ids
        else:
            request.token_ids.extend(_ids(text_or_ids, "token_ids"))
        return self._unary("Tokenize", request, idempotent=True, timeout=timeout)

    def align_spans(
        self,
        spans: Iterable[common_pb2.CharSpan | Mapping[str, Any] | tuple],
        *,
        text: str = "",
        token_ids: Sequence[int] = (),
        timeout: float | None = None,
    ) -> policy_pb2.AlignSpansResponse:
        """Which tokens each character span covers. Spans are CharSpans, dicts, or tuples
        (start, end) / (start, end, text); give the token ids (the truth) and/or the text."""
        request = policy_pb2.AlignSpansRequest(text=text, token_ids=_ids(token_ids, "token_ids"))
        for i, span in enumerate(spans):
            if isinstance(span, tuple):
                if len(span) not in (2, 3):
                    raise ValueError(f"spans[{i}]: expected (start, end) or (start, end, text), got {span!r}")
                span = dict(zip(("start", "end", "text"), span, strict=False))
            request.spans.append(_message(common_pb2.CharSpan, span, f"spans[{i}]"))
        return self._unary("AlignSpans", request, idempotent=True, timeout=timeout)

    def model_info(self, *, timeout: float | None = None) -> policy_pb2.ModelInfo:
        return self._unary("GetModelInfo", policy_pb2.GetModelInfoRequest(), idempotent=True, timeout=timeout)


def sampling_params(**sampling: Any) -> policy_pb2.SamplingParams:
    """SamplingParams from keywords; unknown keywords are a TypeError naming them."""
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling option(s) {unknown}; known: {list(SAMPLING_FIELDS)}")
    sampling = {k: v for k, v in sampling.items() if v is not None}
    stop = sampling.pop("stop", ())
    params = policy_pb2.SamplingParams(**sampling)
    params.stop.extend([stop] if isinstance(stop, str) else list(stop))
    return params


# ---- trainer -------------------------------------------------------------------------------


class TrainerClient(_Client):
    """Client of TrainerService: submit and read back annotations, train, status, checkpoints."""

    service = "tokenfeedback.v1.TrainerService"

    def _make_stub(self, channel):
        return trainer_pb2_grpc.TrainerServiceStub(channel)

    def submit(
        self,
        sequences: Iterable[trainer_pb2.AnnotatedSequence | Mapping[str, Any]] | trainer_pb2.AnnotatedSequence,
        partial_ok: bool = False,
        *,
        timeout: float | None = None,
    ) -> list[trainer_pb2.SubmitResult]:
        """Store annotated sequences (messages, or dicts in the proto's JSON shape); one result
        per sequence, in order. Retried on UNAVAILABLE: a resend is harmless (annotation ids make
        it idempotent), though a sequence the lost attempt stored then reports DUPLICATE.
        Without partial_ok, one invalid sequence fails the call (InvalidArgumentError naming it)
        and nothing is stored."""
        if isinstance(sequences, trainer_pb2.AnnotatedSequence | Mapping):
            sequences = [sequences]
        request = trainer_pb2.SubmitAnnotationsRequest(partial_ok=partial_ok)
        for i, sequence in enumerate(sequences):
            request.sequences.append(_message(trainer_pb2.AnnotatedSequence, sequence, f"sequences[{i}]"))
        reply = self._unary("SubmitAnnotations", request, idempotent=True, timeout=timeout)
        return list(reply.results)

    def withdraw(self, annotation_ids: Iterable[str] | str, *, timeout: float | None = None
                 ) -> trainer_pb2.WithdrawAnnotationsResponse:
        """Mark stored annotations withdrawn (never trained on again); unknown ids are reported."""
        ids = [annotation_ids] if isinstance(annotation_ids, str) else list(annotation_ids)
        request = trainer_pb2.WithdrawAnnotationsRequest(annotation_ids=ids)
        return self._unary("WithdrawAnnotations", request, idempotent=True, timeout=timeout)

    def get_annotation(self, annotation_id: str, *, timeout: float | None = None) -> trainer_pb2.StoredAnnotation:
        """One stored annotation with its training rows; NotFoundError when unknown."""
        request = trainer_pb2.GetAnnotationRequest(annotation_id=annotation_id)
        return self._unary("GetAnnotation", request, idempotent=True, timeout=timeout)

    def train(self, steps: int = 0, *, timeout: float | None = None, **overrides: Any) -> Iterator[trainer_pb2.TrainProgress]:
        """Run `steps` optimizer steps (0: one pass over the pending annotations), yielding one
        TrainProgress per step and a last one with done set. Overrides: variant, beta,
        learning_rate, batch_size, horizon (int or "full"), gamma, publish. Never retried (a
        repeated Train would train twice)."""
        unknown = sorted(set(overrides) - set(TRAIN_OVERRIDES))
        if unknown:
            raise TypeError(f"unknown train override(s) {unknown}; known: {list(TRAIN_OVERRIDES)}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if "horizon" in values:
            values["horizon"] = str(values["horizon"])
        request = trainer_pb2.TrainRequest(steps=steps, **values)
        return self._stream("Train", request, idempotent=False, timeout=timeout)

    def save_checkpoint(self, *, timeout: float | None = None) -> trainer_pb2.SaveCheckpointResponse:
        """Write a checkpoint now (writing the same state twice is harmless, so it is retried)."""
        return self._unary("SaveCheckpoint", trainer_pb2.SaveCheckpointRequest(), idempotent=True, timeout=timeout)

    def status(self, *, timeout: float | None = None) -> trainer_pb2.TrainerStatus:
        return self._unary("GetStatus", trainer_pb2.GetStatusRequest(), idempotent=True, timeout=timeout)


# ---- helpers -------------------------------------------------------------------------------


def _message(cls, value, where: str):
    """A protobuf message from a message of that type or a dict in the proto's JSON shape."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        try:
            return json_format.ParseDict(value, cls())
        except json_format.ParseError as exc:
            raise ValueError(f"{where}: not a valid {cls.DESCRIPTOR.name}: {exc}") from None
    raise TypeError(f"{where}: expected {cls.DESCRIPTOR.name} or dict, got {type(value).__name__}")


def _ids(values: Iterable[int], where: str) -> list[int]:
    ids = list(values)
    for i, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}[{i}]: token ids are ints, got {value!r}")
    return ids


def _set_prompt(request, prompt: str | Sequence[int], where: str) -> None:
    if isinstance(prompt, str):
        request.prompt_text = prompt
    else:
        request.prompt_token_ids.extend(_ids(prompt, where))
