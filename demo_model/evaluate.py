"""Measure a demo model in-process: factual error rate by sampling, and held-out perplexity.

The error rate counts facts: of all the facts the sampled completions state (one per answered
single-fact question, up to three per multi-fact one, demo_model/judge.py `judge_facts`), the
share that are wrong. It is reported per slice of the eval prompts: "single" (one fact asked) and
"multi" (several facts, where errors sit anywhere in a completion), and over both.

This is the builder's self-check (its figures go into build.json) and a reference for the demo,
which measures the same quantities through the policy server. Sampling here is plain: softmax of
the logits divided by the temperature, no top-k/top-p; temperature 0 is greedy.

    python -m demo_model.evaluate --model data/demo-model [--samples 8] [--temperature 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from demo_model.judge import Truth, load_truth
from demo_model.prompts import EvalPrompt, Heldout, heldout


@dataclass(frozen=True)
class EvalConfig:
    samples: int = 8  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    max_new_tokens: int = 32  # enough for the longest three-fact completion and its full stop
    seed: int = 0  # torch generator seed for sampling
    threads: int = 2  # torch intra-op threads


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], cfg: EvalConfig) -> list[list[str]]:
    """`cfg.samples` completions per prompt (text up to EOS), batched by prompt length so that no
    padding is needed, with the KV cache."""
    gen = torch.Generator().manual_seed(cfg.seed)
    eos = tokenizer.eos_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    out: list[list[str]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    for _, idx in sorted(by_len.items()):
        x = torch.tensor([encoded[i] for i in idx for _ in range(cfg.samples)])  # (B, L)
        new = torch.empty((x.size(0), 0), dtype=torch.long)  # (B, 0)
        done = torch.zeros(x.size(0), dtype=torch.bool)  # (B,)
        cache, inp = None, x
        for _ in range(cfg.max_new_tokens):
            mask = torch.ones(x.size(0), x.size(1) + new.size(1), dtype=torch.long)  # (B, L + t): no padding
            res = model(input_ids=inp, attention_mask=mask, cache=cache, use_cache=True)
            cache, logits = res.cache, res.logits[:, -1, :].float()  # (B, V)
            if cfg.temperature == 0:
                nxt = logits.argmax(-1)  # (B,)
            else:
                probs = torch.softmax(logits / cfg.temperature, dim=-1)  # (B, V)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            new = torch.cat([new, nxt[:, None]], dim=1)  # (B, t)
            done |= nxt == eos
            if bool(done.all()):
                break
            inp = nxt[:, None]  # (B, 1)
        for row, ids in enumerate(new.tolist()):
            ids = ids[: ids.index(eos)] if eos in ids else ids
            out[idx[row // cfg.samples]].append(tokenizer.decode(ids))
    return out


@torch.no_grad()
def perplexity(model, tokenizer, sentences: list[str]) -> float:
    """exp(mean NLL per token) of the sentences, each scored after an EOS (as a sentence inside a
    training window is), every token of the sentence counted, the closing EOS not."""
    eos = tokenizer.eos_token_id
    nll, count = 0.0, 0
    for s in sentences:
        ids = torch.tensor([[eos] + tokenizer(s)["input_ids"]])  # (1, 1+n)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (1, 1+n, V)
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # (n, V)
        nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.size(1) - 1
    return math.exp(nll / count)


def fact_rates(truth: Truth, pairs: list[tuple[EvalPrompt, list[str]]]) -> dict:
    """Over (prompt, completions) pairs: the share of stated facts that are wrong (error_rate), the
    share of completions with at least one wrong fact (sequence_error_rate), the share stating no
    fact (none_rate), facts per completion, and the corpus's own error rate on these prompts."""
    facts = [truth.judge_facts(p.prompt, c) for p, cs in pairs for c in cs]
    stated = sum(len(f) for f in facts)
    n = max(1, len(facts))
    return {
        "prompts": len(pairs),
        "samples": len(facts),
        "facts": stated,
        "error_rate": sum(x.is_wrong for f in facts for x in f) / max(1, stated),
        "sequence_error_rate": sum(any(x.is_wrong for x in f) for f in facts) / n,
        "none_rate": sum(not f for f in facts) / n,
        "facts_per_completion": stated / n,
        "corpus_error_rate": sum(p.corpus_error_rate for p, _ in pairs) / max(1, len(pairs)),
    }


def error_rates(prompts: list[EvalPrompt], completions: list[list[str]], truth: Truth) -> dict:
    """`fact_rates` overall, on the wrong-fact subset, the other prompts, and each slice."""
    pairs = list(zip(prompts, completions, strict=True))
    return {
        "all": fact_rates(truth, pairs),
        "wrong_fact": fact_rates(truth, [(p, c) for p, c in pairs if p.wrong_fact]),
        "other": fact_rates(truth, [(p, c) for p, c in pairs if not p.wrong_fact]),
        "single": fact_rates(truth, [(p, c) for p, c in pairs if p.slice == "single"]),
        "multi": fact_rates(truth, [(p, c) for p, c in pairs if p.slice == "multi"]),
    }


def evaluate(model, tokenizer, held: Heldout, truth: Truth, cfg: EvalConfig) -> dict:
    """Error rates on the eval and generalization prompts, and held-out perplexity."""
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    ev = sample(model, tokenizer, [p.prompt for p in held.eval_prompts], cfg)
    gen = sample(model, tokenizer, [p.prompt for p in held.generalization_prompts], cfg)
    return {
        "config": {"samples": cfg.samples, "temperature": cfg.temperature, "seed": cfg.seed},
        "eval": error_rates(held.eval_prompts, ev, truth),
        "generalization": error_rates(held.generalization_prompts, gen, truth)["all"],
        "generalization_multi": error_rates(held.generalization_prompts, gen, truth)["multi"],
        "heldout_perplexity": perplexity(model, tokenizer, held.heldout_sentences),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def load(model_dir: str | Path):
    """Model (eval mode, float32) and tokenizer from a demo model folder."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, tokenizer


def summary_line(result: dict) -> str:
    e = result["eval"]
    return (f"error rate at T={result['config']['temperature']}: {e['all']['error_rate']:.1%} over "
            f"{e['all']['prompts']} eval prompts (corpus {e['all']['corpus_error_rate']:.1%}); "
            f"wrong-fact subset {e['wrong_fact']['error_rate']:.1%} over {e['wrong_fact']['prompts']} "
            f"(corpus {e['wrong_fact']['corpus_error_rate']:.1%}); others {e['other']['error_rate']:.1%}; "
            f"none {e['all']['none_rate']:.1%}; multi-fact slice {e['multi']['error_rate']:.1%} of facts wrong "
            f"({e['multi']['facts_per_completion']:.2f} facts per completion, {e['multi']['sequence_error_rate']:.1%} "
            f"of completions with an error), single-fact slice {e['single']['error_rate']:.1%}; "
            f"held-out phrasings {result['generalization']['error_rate']:.1%}; "
            f"held-out perplexity {result['heldout_perplexity']:.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo_model.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="data/demo-model", help="demo model folder")
    ap.add_argument("--samples", type=int, default=EvalConfig.samples, help="completions per prompt")
    ap.add_argument("--temperature", type=float, default=EvalConfig.temperature, help="0 = greedy")
    ap.add_argument("--seed", type=int, default=EvalConfig.seed, help="sampling seed")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    cfg = EvalConfig(samples=args.samples, temperature=args.temperature, seed=args.seed)
    model, tokenizer = load(args.model)
    result = evaluate(model, tokenizer, heldout(args.model), load_truth(args.model), cfg)
    print(summary_line(result))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
