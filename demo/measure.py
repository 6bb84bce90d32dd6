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
- distinct-2: distinct bigrams over all bigrams of longer free-running completions (one per eval
  prompt, no stop string; degeneration shows as a collapse of this number).

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
    samples: int = 4  # completions per eval prompt
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


def measure(policy: PolicyClient, held: Heldout, truth: Truth, eos_id: int, cfg: MeasureConfig) -> dict:
    """Everything the demo reports about one policy version."""
    if cfg.max_prompts:
        held = replace(held, eval_prompts=_subset(held.eval_prompts, cfg.max_prompts),
                       generalization_prompts=_subset(held.generalization_prompts, cfg.max_prompts))
    prompts = held.eval_prompts + held.generalization_prompts
    done = sample_many(policy, [p.prompt for p in prompts], samples=cfg.samples, seed=cfg.seed,
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       concurrency=cfg.concurrency)
    n_eval = len(held.eval_prompts)
    ev, gen = done[:n_eval], done[n_eval:]

    def rates(pairs: list) -> dict:
        return error_rate(truth, [p for p, _ in pairs], [c for _, c in pairs])

    pairs = list(zip(held.eval_prompts, ev, strict=True))
    multi = rates([(p, c) for p, c in pairs if p.slice == "multi"])
    single = rates([(p, c) for p, c in pairs if p.slice == "single"])
    everything = rates(pairs)
    free = sample_many(policy, [p.prompt for p in held.eval_prompts], samples=1, seed=cfg.seed + 1,
                       max_new_tokens=cfg.free_tokens, temperature=cfg.temperature,
                       concurrency=cfg.concurrency, stop=())
    versions = {c.model_version for cs in done for c in cs}
    return {
        "model_version": max(versions),
        "error_rate": multi["error_rate"],
        "sequence_error_rate": multi["sequence_error_rate"],
        "facts_per_completion": multi["facts_per_completion"],
        "single_error_rate": single["error_rate"],
        "all_error_rate": everything["error_rate"],
        "wrong_fact_error_rate": rates([(p, c) for p, c in pairs if p.wrong_fact])["error_rate"],
        "generalization_error_rate": error_rate(truth, held.generalization_prompts, gen)["error_rate"],
        "none_rate": everything["none_rate"],
        "heldout_perplexity": heldout_perplexity(policy, held.heldout_sentences, eos_id),
        "distinct2": distinct_n([c.text for cs in free for c in cs]),
        "examples": [held.eval_prompts[i].prompt + ev[i][0].text for i in _example_indices(held)],
        "free_examples": [held.eval_prompts[i].prompt + free[i][0].text for i in _example_indices(held)],
    }


def _subset(items: list, count: int) -> list:
    """`count` evenly spaced items (all of them when there are fewer)."""
    if len(items) <= count:
        return items
    return [items[i * len(items) // count] for i in range(count)]


def _example_indices(held: Heldout, count: int = 3) -> list[int]:
    """Three fixed eval prompts to show completions of: multi-fact wrong-fact ones first."""
    order = sorted(range(len(held.eval_prompts)),
                   key=lambda i: (held.eval_prompts[i].slice != "multi", not held.eval_prompts[i].wrong_fact, i))
    return order[:count]
