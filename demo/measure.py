"""Measuring a policy through the policy server, as any client would.

- factual error rate: sample the fixed evaluation prompts (demo_model/prompts.py) at temperature 1,
  judge every fact each completion states against the ground truth, and count the share of facts
  that are wrong (demo_model/evaluate.py `fact_rates`). `error_rate` is that share on the
  multi-fact slice, the task the feedback is given on; it is also reported on the single-fact
  slice, over all eval prompts, over the wrong-fact subset (where the corpus itself lied), and over
  held-out phrasings (generalization); `sequence_error_rate` is the share of multi-fact
  completions with at least one wrong fact;
- held-out perplexity: exp of the mean negative log-likelihood per token of correct sentences that
  never occur in the training corpus, from teacher-forced `Score` calls (each sentence scored
  after an EOS token, as the demo model saw sentences in training);
- distinct-2: distinct bigrams over all bigrams of longer free-running completions (one per
  multi-fact eval prompt, no stop string; degeneration shows as a collapse of this number).

Generations run concurrently (the policy server batches them into one forward per step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from demo_model.evaluate import fact_rates
from demo_model.judge import Truth
from demo_model.prompts import EvalPrompt, Heldout
from tokenfeedback import Completion, PolicyClient


@dataclass(frozen=True)
class MeasureConfig:
    samples: int = 6  # completions per multi-fact eval prompt (the error rate the comparisons read)
    single_samples: int = 1  # completions per single-fact eval prompt and per generalization prompt
    every: int = 1  # rounds between measurements (long runs save time); the first and last rounds always
    full_every: int = 1  # rounds between full measurements (single-fact slice, perplexity, distinct-2);
    # the first and last rounds are always full, the others measure the multi-fact error rate only
    max_new_tokens: int = 32  # enough for the longest three-fact completion and its full stop
    temperature: float = 1.0  # the model's own distribution, where the corpus's errors show
    concurrency: int = 16  # streams in flight at once
    seed: int = 1_000_003  # base seed; sample k of prompt i uses seed + 7919 * i + k
    free_tokens: int = 40  # length of the free-running samples distinct-2 is computed on
    max_prompts: int = 0  # 0: every eval/generalization prompt; else an evenly spaced subset (quick runs)


def sample_many(
    policy: PolicyClient, prompts: Sequence[str], *, samples: int, seed: int, max_new_tokens: int,
    temperature: float = 1.0, concurrency: int = 16, stop: Sequence[str] = (".",),
) -> list[list[Completion]]:
    """`samples` completions of each prompt, seeded so that a rerun samples the same tokens."""
    jobs = [(i, k) for i in range(len(prompts)) for k in range(samples)]

    def one(job: tuple[int, int]) -> Completion:
        i, k = job
        return policy.complete(prompts[i], max_new_tokens=max_new_tokens, temperature=temperature,
                               seed=seed + 7919 * i + k, stop=list(stop), timeout=120)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        done = list(pool.map(one, jobs))
    out: list[list[Completion]] = [[] for _ in prompts]
    for (i, _), completion in zip(jobs, done, strict=True):
        out[i].append(completion)
    return out


def error_rate(truth: Truth, prompts: Sequence[EvalPrompt], completions: Sequence[Sequence[Completion]]) -> dict:
    """`fact_rates` of sampled completions (demo_model/evaluate.py)."""
    return fact_rates(truth, [(p, [c.text for c in cs]) for p, cs in zip(prompts, completions, strict=True)])


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams of whitespace words over all n-grams (1.0: no repetition at all)."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def heldout_perplexity(policy: PolicyClient, sentences: Sequence[str], eos_id: int, concurrency: int = 8) -> float:
    def nll(sentence: str) -> tuple[float, int]:
        scored = policy.score([eos_id], sentence, timeout=60)
        return -scored.total_logprob, len(scored.tokens)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        parts = list(pool.map(nll, sentences))
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return math.exp(total / count)


def measure(policy: PolicyClient, held: Heldout, truth: Truth, eos_id: int, cfg: MeasureConfig,
            full: bool = True) -> dict:
    """Everything the demo reports about one policy version. `full=False` measures only the
    multi-fact error rates (the curve the comparisons read), for the rounds between full ones."""
    if cfg.max_prompts:
        held = replace(held, eval_prompts=_subset(held.eval_prompts, cfg.max_prompts),
                       generalization_prompts=_subset(held.generalization_prompts, cfg.max_prompts))
    multi_prompts = held.of_slice("multi")
    if not multi_prompts:
        raise ValueError("the model's heldout.json has no multi-fact eval prompts: rebuild it (make model)")

    def run(prompts: list[EvalPrompt], samples: int, seed: int, **kw) -> list[list[Completion]]:
        return sample_many(policy, [p.prompt for p in prompts], samples=samples, seed=seed,
                           max_new_tokens=kw.pop("max_new_tokens", cfg.max_new_tokens),
                           temperature=cfg.temperature, concurrency=cfg.concurrency, **kw)

    multi = run(multi_prompts, cfg.samples, cfg.seed)
    rates = error_rate(truth, multi_prompts, multi)
    wrong = [(p, c) for p, c in zip(multi_prompts, multi, strict=True) if p.wrong_fact]
    shown = _example_indices(multi_prompts)
    row = {
        "model_version": max(c.model_version for cs in multi for c in cs),
        "error_rate": rates["error_rate"],
        "sequence_error_rate": rates["sequence_error_rate"],
        "facts_per_completion": rates["facts_per_completion"],
        "none_rate": rates["none_rate"],
        "wrong_fact_error_rate": error_rate(truth, [p for p, _ in wrong], [c for _, c in wrong])["error_rate"],
        "examples": [multi_prompts[i].prompt + multi[i][0].text for i in shown],
    }
    if not full:
        return row
    single_prompts = held.of_slice("single")
    single = run(single_prompts, cfg.single_samples, cfg.seed + 2)
    general = run(held.generalization_prompts, cfg.single_samples, cfg.seed + 3)
    free = run(multi_prompts, 1, cfg.seed + 1, max_new_tokens=cfg.free_tokens, stop=())
    row.update({
        "single_error_rate": error_rate(truth, single_prompts, single)["error_rate"],
        "generalization_error_rate": error_rate(truth, held.generalization_prompts, general)["error_rate"],
        "heldout_perplexity": heldout_perplexity(policy, held.heldout_sentences, eos_id),
        "distinct2": distinct_n([c.text for cs in free for c in cs]),
        "free_examples": [multi_prompts[i].prompt + free[i][0].text for i in shown],
    })
    return row


def _subset(items: list, count: int) -> list:
    """`count` evenly spaced items (all of them when there are fewer)."""
    if len(items) <= count:
        return items
    return [items[i * len(items) // count] for i in range(count)]


def _example_indices(prompts: list[EvalPrompt], count: int = 3) -> list[int]:
    """Three fixed prompts to show completions of: wrong-fact ones first."""
    return sorted(range(len(prompts)), key=lambda i: (not prompts[i].wrong_fact, i))[:count]
