"""The main loop against real servers: generate, annotate a token bad with a replacement, train,
publish, and Score on the policy server shows the change at that position and little elsewhere."""

from __future__ import annotations

import math

import pytest

import tokenfeedback.v1.policy_pb2 as ppb
import tokenfeedback.v1.trainer_pb2 as pb
from common.process import wait_serving

from .helpers import free_port, policy_stub, status, train, trainer_stub

DEMO_MODEL = __import__("pathlib").Path(__file__).resolve().parents[2] / "data" / "demo-model"


def generate(policy, prompt: str, tokens: int):
    events = list(policy.Generate(ppb.GenerateRequest(
        prompt_text=prompt, params=ppb.SamplingParams(max_new_tokens=tokens, temperature=0.0, num_alternatives=5)),
        timeout=60))
    start = events[0].start
    return start, [e.token for e in events if e.HasField("token")]


def score(policy, prompt_ids, completion_ids, candidate: int):
    """(version, sampled-token logprobs, the candidate's logprobs, top-20 {token: logprob} per position)."""
    reply = policy.Score(ppb.ScoreRequest(prompt_token_ids=prompt_ids, completion_token_ids=completion_ids,
                                          candidate_token_ids=[candidate], num_alternatives=20), timeout=60)
    return (reply.model_version, [t.logprob for t in reply.tokens], [t.candidate_logprobs[0] for t in reply.tokens],
            [{a.token_id: a.logprob for a in t.alternatives} for t in reply.tokens])


def top_kl(after: dict[int, float], before: dict[int, float]) -> float:
    """KL(after || before) over the tokens both top-20 lists hold, renormalized: an estimate of the
    per-position KL from what Score returns (the small models here put nearly all mass there)."""
    common = [t for t in after if t in before]
    za = math.log(sum(math.exp(after[t]) for t in common))
    zb = math.log(sum(math.exp(before[t]) for t in common))
    return sum(math.exp(after[t] - za) * ((after[t] - za) - (before[t] - zb)) for t in common)


def run_loop(start_policy, start_trainer, model_dir, data_dir, prompt, *trainer_args):
    """Generate greedily from `prompt`, mark its first token bad with the runner-up as the
    replacement, train 5 steps; returns everything a test checks."""
    # both start at once (the trainer retries a policy server that is not up yet)
    port = free_port()
    trainer = start_trainer(model_dir, data_dir, "--policy", f"127.0.0.1:{port}", *trainer_args, wait_healthy=False)
    policy_server = start_policy(model_dir, port=port)
    wait_serving(trainer.address, 180, trainer.proc)
    policy, stub = policy_stub(policy_server.address), trainer_stub(trainer.address)

    start, tokens = generate(policy, prompt, 6)
    ids = [t.token_id for t in tokens]
    bad = 0
    right_id = next(a.token_id for a in tokens[bad].alternatives if a.token_id != ids[bad])
    version0, before, right_before, top_before = score(policy, list(start.prompt_token_ids), ids, right_id)
    assert version0 == 0

    seq = pb.AnnotatedSequence(
        annotation_id="loop-1", prompt_token_ids=start.prompt_token_ids, completion_token_ids=ids,
        model_version=start.model_version, behavior_logprobs=[t.sampling_logprob for t in tokens],
        token_labels=[pb.TokenLabel(position=bad, weight=-1.0, replacement_token_id=right_id)])
    reply = stub.SubmitAnnotations(pb.SubmitAnnotationsRequest(sequences=[seq]), timeout=30)
    assert reply.results[0].status == pb.SUBMIT_STATUS_ACCEPTED and reply.results[0].rows == 2

    progress = train(stub, steps=5)
    version1, after, right_after, top_after = score(policy, list(start.prompt_token_ids), ids, right_id)
    kl = [top_kl(a, b) for a, b in zip(top_after, top_before, strict=True)]
    return dict(progress=progress, bad=bad, before=before, after=after, right_before=right_before,
                right_after=right_after, version=version1, status=status(stub), n=len(ids), kl=kl)


def check_loop(r, min_shift: float):
    progress, bad = r["progress"], r["bad"]
    steps, done = progress[:-1], progress[-1]
    assert [p.step for p in steps] == [1, 2, 3, 4, 5] and all(p.total_steps == 5 for p in progress)
    assert done.done and not any(p.done for p in steps)
    for p in steps:
        assert math.isfinite(p.loss) and not p.skipped
        assert p.loss == pytest.approx(p.token_loss + p.beta * p.kl, rel=1e-4, abs=1e-6)
        assert p.rows == 2 and p.sequences == 1 and p.mean_abs_weight == 1.0 and p.tokens_per_second > 0
    assert steps[0].kl == pytest.approx(0.0, abs=1e-5)  # policy == reference before the first update
    assert steps[-1].kl > 0
    # the new version is on the stream and the policy serves it
    assert done.published_version == 1 and done.model_version == 1 and r["version"] == 1
    assert [(p.model_version, p.reachable) for p in r["status"].policies] == [(1, True)]
    # the bad token went down, its replacement up, at the annotated position
    assert r["after"][bad] < r["before"][bad] - min_shift
    assert r["right_after"][bad] > r["right_before"][bad] + min_shift
    # elsewhere the distribution moved much less: the KL term holds the unannotated positions
    others = [r["kl"][t] for t in range(r["n"]) if t != bad]
    assert max(others) < 0.5 * r["kl"][bad] and max(others) < 0.15, (r["kl"], bad)
    return steps[-1].kl


def test_annotated_token_moves_and_the_rest_stays(start_policy, start_trainer, trained_tiny_model_dir, tmp_path):
    r = run_loop(start_policy, start_trainer, trained_tiny_model_dir, tmp_path / "data",
                 "Ottawa is the capital of", "--lr", "1e-3", "--beta", "1.0")
    kl = check_loop(r, min_shift=0.5)
    assert kl < 0.5  # mean KL per completion position, reported by the trainer


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_MODEL / "config.json").exists(), reason="no demo model: run `make model`")
def test_on_the_demo_model(start_policy, start_trainer, tmp_path):
    r = run_loop(start_policy, start_trainer, DEMO_MODEL, tmp_path / "data", "Ottawa is the capital of",
                 "--lr", "1e-3")
    check_loop(r, min_shift=0.5)
