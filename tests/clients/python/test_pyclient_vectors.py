"""The cross-language annotation vectors (tests/vectors/annotations.json), submitted by the Python
client to a real trainer on the demo model: every acceptance, rejection and stored row must be as
the vectors say. The TypeScript and Go clients run the same file the same way (README.md there).
"""

from __future__ import annotations

import copy
import json
import sys
import time
import uuid
from pathlib import Path

import pytest
from google.protobuf import json_format

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from tokenfeedback import InvalidArgumentError, NotFoundError, PolicyClient, TokenfeedbackError, TrainerClient

VECTORS_FILE = Path(__file__).resolve().parents[2] / "vectors" / "annotations.json"
VECTORS = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
WEIGHT_TOLERANCE = 1e-9


def check_probe(vectors: dict, policy: PolicyClient) -> None:
    """The vectors hold token ids of one tokenizer: fail clearly when the model has another."""
    probe = vectors["model"]["probe"]
    ids = [t.token_id for t in policy.tokenize(probe["text"]).tokens]
    vocab = policy.model_info().vocab_size
    assert ids == probe["tokenIds"] and vocab == vectors["model"]["vocabSize"], (
        f"the vectors were generated for another tokenizer (probe ids {ids} vs {probe['tokenIds']}, vocab "
        f"{vocab} vs {vectors['model']['vocabSize']}): rebuild them with tests/vectors/generate.py"
    )


def prefixed(request: dict, prefix: str) -> dict:
    """The run's prefix on every non-empty annotation id, so runs never collide in one store."""
    request = copy.deepcopy(request)
    for sequence in request["sequences"]:
        if sequence.get("annotationId"):
            sequence["annotationId"] = prefix + sequence["annotationId"]
    return request


def run_case(case: dict, trainer: TrainerClient, prefix: str) -> None:
    """Submit each step's request and compare with its expectation, then read back what is stored."""
    for number, step in enumerate(case["steps"]):
        where = f"{case['name']} step {number}"
        request = json_format.ParseDict(prefixed(step["request"], prefix), trainer_pb2.SubmitAnnotationsRequest())
        expect = step["expect"]
        if "error" in expect:
            with pytest.raises(TokenfeedbackError) as info:
                trainer.submit(request.sequences, partial_ok=request.partial_ok)
            assert info.value.code_name == expect["error"]["code"], f"{where}: {info.value}"
            for text in expect["error"]["messageContains"]:
                assert text in info.value.message, f"{where}: {text!r} not in {info.value.message!r}"
            continue
        results = trainer.submit(request.sequences, partial_ok=request.partial_ok)
        assert len(results) == len(expect["results"]), where
        for result, wanted in zip(results, expect["results"], strict=True):
            got = trainer_pb2.SubmitStatus.Name(result.status)
            assert result.annotation_id == prefix + wanted["annotationId"], where
            assert got == wanted["status"], f"{where}: {result.annotation_id} {got} ({result.reason})"
            if "rows" in wanted:
                assert result.rows == wanted["rows"], f"{where}: {result.annotation_id} rows"
            for text in wanted.get("reasonContains", []):
                assert text in result.reason, f"{where}: {text!r} not in {result.reason!r}"
    for wanted in case["stored"]:
        stored = trainer.get_annotation(prefix + wanted["annotationId"])
        where = f"{case['name']}: stored {wanted['annotationId']}"
        assert trainer_pb2.AnnotationState.Name(stored.state) == wanted["state"], where
        assert list(stored.prompt_token_ids) == wanted["promptTokenIds"], where
        assert list(stored.completion_token_ids) == wanted["completionTokenIds"], where
        assert stored.model_version == wanted["modelVersion"], where
        key = lambda r: (r[0], r[3], r[1])  # noqa: E731 - (position, replacement, token id)
        got = sorted(((r.position, r.token_id, r.weight, r.replacement) for r in stored.rows), key=key)
        want = sorted(((r["position"], r["tokenId"], r["weight"], r["replacement"]) for r in wanted["rows"]), key=key)
        assert [(p, t, rep) for p, t, _, rep in got] == [(p, t, rep) for p, t, _, rep in want], f"{where}: rows"
        for (*_, w1, _r1), (*_, w2, _r2) in zip(got, want, strict=True):
            assert abs(w1 - w2) <= WEIGHT_TOLERANCE, f"{where}: row weights {got} vs {want}"
        reward = stored.sequence_reward if stored.HasField("sequence_reward") else None
        assert reward == wanted["sequenceReward"], where
        assert stored.annotator_id == wanted["annotatorId"] and dict(stored.metadata) == wanted["metadata"], where
    for annotation_id in case["absent"]:
        # not stored: NOT_FOUND, or INVALID_ARGUMENT for an id no annotation can have (too long)
        with pytest.raises((NotFoundError, InvalidArgumentError)) as raised:
            trainer.get_annotation(prefix + annotation_id)
        if isinstance(raised.value, InvalidArgumentError):
            assert raised.value.field == "annotation_id" and len(prefix + annotation_id) > 200, raised.value


@pytest.fixture(scope="module")
def vector_clients(demo_servers):
    with PolicyClient(demo_servers.policy_address) as policy, TrainerClient(demo_servers.trainer_address) as trainer:
        check_probe(VECTORS, policy)
        yield trainer, f"py-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}-"


def test_vectors_file_is_well_formed():
    assert VECTORS["format"] == "tokenfeedback-annotation-vectors/1"
    names = [c["name"] for c in VECTORS["cases"]]
    assert len(names) == len(set(names)) and len(names) >= 30
    assert any(c["name"].startswith("invalid-") for c in VECTORS["cases"])
    for case in VECTORS["cases"]:
        for step in case["steps"]:
            json_format.ParseDict(step["request"], trainer_pb2.SubmitAnnotationsRequest())
            assert ("error" in step["expect"]) != ("results" in step["expect"]), case["name"]


@pytest.mark.parametrize("case", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_vector(case, vector_clients):
    trainer, prefix = vector_clients
    run_case(case, trainer, prefix)


def test_vectors_file_is_what_the_generator_builds():
    """annotations.json is generate.py's output for the current demo tokenizer (not hand-edited,
    not stale): rebuild with `.venv/bin/python tests/vectors/generate.py` when this fails."""
    import importlib.util

    model = VECTORS_FILE.parents[2] / "data" / "demo-model"
    if not (model / "tokenizer.json").exists():
        pytest.skip(f"no demo model at {model}: run `make model`")
    spec = importlib.util.spec_from_file_location("vectors_generate", VECTORS_FILE.parent / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generate  # its dataclasses look their module up while being created
    try:
        spec.loader.exec_module(generate)
    finally:
        sys.modules.pop(spec.name, None)
    assert generate.build(model) == VECTORS, "tests/vectors/annotations.json is out of date: run generate.py"


def test_vectors_left_the_trainer_serving(vector_clients):
    trainer, _ = vector_clients
    status = trainer.status()
    stored = sum(len(c["stored"]) for c in VECTORS["cases"])
    assert status.annotations_total >= stored and not status.training
