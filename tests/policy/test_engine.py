"""The engine in-process (no gRPC): sampling against a float64 reference, batched decoding against
decoding alone, and the in-process API a Connect adapter or a benchmark uses."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from common.errors import InvalidArgument
from policy_server.api import (
    FinishReason,
    GenerateRequest,
    GenerationEnd,
    GenerationStart,
    ScoreRequest,
    TokenEvent,
)
from policy_server.batch import Batch, cache_kwarg, output_cache
from policy_server.engine import Engine
from policy_server.sampling import SamplerState, SamplingParams, sample_rows, sampling_logprobs


def reference_sampling_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution in float64, written the slow obvious way."""
    z = logits.double() / temperature
    order = sorted(range(len(z)), key=lambda i: -z[i].item())
    keep = set(order[:top_k]) if top_k else set(order)
    if top_p < 1:
        probs = torch.softmax(torch.tensor([z[i] if i in keep else -math.inf for i in range(len(z))]), 0)
        nucleus, mass = set(), 0.0
        for i in order:
            if i not in keep or mass >= top_p:
                break
            nucleus.add(i)
            mass += probs[i].item()
        keep = nucleus
    masked = torch.tensor([z[i].item() if i in keep else -math.inf for i in range(len(z))], dtype=torch.float64)
    return torch.log_softmax(masked, 0)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("top_k", [0, 1, 7])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.2])
def test_sampling_distribution_matches_reference(temperature, top_k, top_p):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    got = sampling_logprobs(logits, torch.log_softmax(logits, -1), params)
    want = reference_sampling_logprobs(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    assert torch.allclose(got[finite].double(), want[finite], atol=1e-5)


def test_sample_rows_per_row_generators():
    """A row's draws depend on its own seed only, not on the other rows of the batch."""
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(seed=s, temperature=t, top_k=k, num_alternatives=a)
              for s, t, k, a in [(1, 1.0, 0, 3), (2, 0.0, 0, 0), (3, 0.7, 5, 20), (1, 1.0, 0, 3)]]
    states = [SamplerState(p, torch.device("cpu")) for p in params]
    rows = [[s.token_id for s in sample_rows(logits[[0, 1, 2, 0]], states)] for _ in range(10)]
    assert all(r[0] == r[3] for r in rows)  # same seed, same logits
    alone = SamplerState(params[0], torch.device("cpu"))
    assert [sample_rows(logits[:1], [alone])[0].token_id for _ in range(10)] == [r[0] for r in rows]
    greedy = sample_rows(logits[1:2], [SamplerState(params[1], torch.device("cpu"))])[0]
    assert greedy.token_id == int(logits[1].argmax()) and greedy.sampling_logprob == 0 and greedy.rank == 1
    sample = sample_rows(logits[2:3], [SamplerState(params[2], torch.device("cpu"))])[0]
    assert len(sample.alternatives) == 20 and sample.rank <= 5


@pytest.mark.parametrize("bad,field", [
    (dict(max_new_tokens=0), "params.max_new_tokens"), (dict(temperature=-1.0), "params.temperature"),
    (dict(top_p=0.0), "params.top_p"), (dict(top_k=-1), "params.top_k"), (dict(seed=2**64), "params.seed"),
    (dict(num_alternatives=21), "params.num_alternatives"), (dict(stop=("",)), "params.stop[0]"),
])
def test_params_validation(bad, field):
    with pytest.raises(InvalidArgument) as err:
        SamplingParams(**bad).validate(512, 100)
    assert err.value.field == field


def test_batched_decoding_matches_alone(tiny_model_dir):
    """Rows of different lengths joining and leaving a batch compute what they compute alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    kwarg = cache_kwarg(model)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20], [30, 31, 32]]
    steps = [[40, 41, 42, 43], [50, 51, 52, 53], [60, 61, 62, 63]]
    with torch.inference_mode():
        full = [model(torch.tensor([p + s])).logits[0, len(p) - 1 :].float() for p, s in zip(prompts, steps, strict=True)]
        batch = Batch(0, torch.device("cpu"))
        seen = {i: [] for i in range(3)}
        for i in (0, 1):  # two rows join, a third joins later, the first leaves early
            out = model(torch.tensor([prompts[i]]), **{kwarg: DynamicCache(config=model.config)})
            seen[i].append(out.logits[0, -1])
            batch.add(i, output_cache(out), len(prompts[i]))
        position = {0: 0, 1: 0}
        for step in range(4):
            if step == 1:
                out = model(torch.tensor([prompts[2]]), **{kwarg: DynamicCache(config=model.config)})
                seen[2].append(out.logits[0, -1])
                batch.add(2, output_cache(out), len(prompts[2]))
                position[2] = 0
            if step == 3:
                batch.keep([1, 2])
            inputs = batch.step_inputs([steps[r][position[r]] for r in batch.rows])
            out = model(inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                        **{kwarg: batch.cache})
            batch.advance(inputs, output_cache(out))
            for row, r in enumerate(batch.rows):
                seen[r].append(out.logits[row, -1])
                position[r] += 1
    for r in range(3):
        got = torch.stack(seen[r]).float()
        assert torch.allclose(got, full[r][: len(got)], atol=1e-4), (r, (got - full[r][: len(got)]).abs().max())


async def collect(engine: Engine, request: GenerateRequest) -> list:
    return [event async for event in engine.generate(request)]


def test_engine_in_process(engine):
    """Many concurrent streams through max_batch 4: all complete, seeded ones reproduce, logprobs
    agree with Score, and the scheduler ran fewer forwards than tokens (batching happened)."""

    async def main():
        requests = [GenerateRequest(prompt_text=f"Paris {i}", params=SamplingParams(max_new_tokens=20, seed=i))
                    for i in range(10)]
        steps = engine.steps
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        forwards = engine.steps - steps
        again = await collect(engine, requests[3])
        tokens = [e for e in results[3] if isinstance(e, TokenEvent)]
        score = await engine.score(ScoreRequest(prompt_token_ids=results[3][0].prompt_token_ids,
                                                completion_token_ids=tuple(t.token_id for t in tokens)))
        return results, forwards, again, tokens, score

    results, forwards, again, tokens, score = asyncio.run(main())
    for events in results:
        assert isinstance(events[0], GenerationStart) and isinstance(events[-1], GenerationEnd)
        assert events[-1].finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert [e.token_id for e in again if isinstance(e, TokenEvent)] == [t.token_id for t in tokens]
    assert forwards < sum(len(r) - 2 for r in results) / 2  # ~4 streams share each forward
    for streamed, scored in zip(tokens, score.tokens, strict=True):
        assert abs(streamed.logprob - scored.logprob) < 1e-4


def test_engine_rejects_before_queueing(engine):
    async def main():
        with pytest.raises(InvalidArgument) as err:
            engine.generate(GenerateRequest(prompt_text="x", params=SamplingParams(top_p=2.0)))
        return err.value.field

    assert asyncio.run(main()) == "params.top_p"


def test_prompts_arriving_together_share_their_prefill(engine):
    """Four prompts of different lengths queued while the scheduler is busy start in the same step:
    they are prefilled in fewer forwards than prompts (left-padded together), and each stream's
    greedy tokens and logprobs are the ones it gets alone."""
    prompts = ["Paris", "Paris is the capital of", "The capital of Japan is a city", "Berlin is"]

    def request(text: str) -> GenerateRequest:
        return GenerateRequest(prompt_text=text, params=SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                       stop_on_eos=False, num_alternatives=2))

    def tokens(events) -> list[tuple[int, float]]:
        return [(e.token_id, e.logprob) for e in events if isinstance(e, TokenEvent)]

    async def main():
        alone = [tokens(await collect(engine, request(p))) for p in prompts]
        started, gate = threading.Event(), threading.Event()

        def hold():  # a job that keeps the scheduler thread busy until the requests are queued
            started.set()
            gate.wait(60)

        held = asyncio.ensure_future(engine.scheduler.run_job(hold))
        assert await asyncio.to_thread(started.wait, 60)
        prefills = engine.scheduler.prefills
        streams = [engine.generate(request(p)) for p in prompts]
        gate.set()
        await held
        together = [tokens([e async for e in s]) for s in streams]
        return alone, together, engine.scheduler.prefills - prefills

    alone, together, prefills = asyncio.run(main())
    assert 1 <= prefills < len(prompts)
    for a, t in zip(alone, together, strict=True):
        assert [i for i, _ in a] == [i for i, _ in t]
        assert all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, t, strict=True))
