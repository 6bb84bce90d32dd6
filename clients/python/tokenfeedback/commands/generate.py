"""`tokenfeedback generate`: sample a completion and stream it token by token, coloured by
probability; --save keeps it for annotating."""

from __future__ import annotations

import argparse
import json
import math
import sys

from tokenfeedback.commands.registry import Context, command, to_dict, to_dict_compact


def _configure_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=None, help="tokens to sample (server default 32)")
    p.add_argument("--temperature", "-t", type=float, default=None, help="0 is greedy; default 1")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="same seed and options give the same tokens")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--no-eos-stop", action="store_true", help="keep sampling after the end-of-sequence token")
    p.add_argument("--alternatives", type=int, default=None, help="top-k alternatives per token (0..20)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour tokens by probability: plain >= 0.5, yellow >= 0.1, red >= 0.01, "
                        "bold red below (auto: when stdout is a terminal)")
    p.add_argument("--no-prompt", action="store_true", help="do not echo the prompt before the completion")
    p.add_argument("--save", metavar="FILE", help="append the completion to FILE as an AnnotatedSequence JSON "
                                                  "line (no labels yet: add them, then `annotate FILE`)")


def _colour(logprob: float) -> str:
    p = math.exp(logprob)
    if p >= 0.5:
        return ""
    if p >= 0.1:
        return "\033[33m"
    if p >= 0.01:
        return "\033[31m"
    return "\033[1;4;31m"


@command("generate", "sample a completion and stream it token by token", _configure_generate)
def run_generate(args: argparse.Namespace, ctx: Context) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=args.stop or (), num_alternatives=args.alternatives,
        stop_on_eos=False if args.no_eos_stop else None,
    )
    colour = args.color == "always" or (args.color == "auto" and ctx.out.isatty() and "NO_COLOR" not in ctx.environ)
    with ctx.policy() as policy, policy.generate(prompt, timeout=ctx.stream_timeout, **sampling) as generation:
        shown_start = False
        for token in generation:
            if not shown_start:  # the start event has arrived with (or before) the first token
                shown_start = True
                _show_start(ctx, generation.start, prompt, args.no_prompt)
            if ctx.json:
                ctx.emit({"event": "token", **to_dict(token)})
            elif colour and _colour(token.logprob):
                ctx.say(f"{_colour(token.logprob)}{token.text}\033[0m", end="")
            else:
                ctx.say(token.text, end="")
        completion = generation.result()
    if not shown_start:
        _show_start(ctx, generation.start, prompt, args.no_prompt)
    if ctx.json:
        ctx.emit({"event": "end", **to_dict(generation.end)})
    else:
        ctx.say()
        mean = sum(completion.logprobs) / max(1, len(completion.tokens))
        ctx.note(f"[model version {completion.model_version}, {len(completion.tokens)} tokens, "
                 f"finish {completion.finish_reason}, mean logprob {mean:.3f}]")
    if args.save:
        sequence = completion.annotate(metadata={"source": "tokenfeedback generate"})
        with open(args.save, "a", encoding="utf-8") as f:
            f.write(json.dumps(to_dict_compact(sequence), ensure_ascii=False) + "\n")
        ctx.note(f"saved to {args.save} as annotation {sequence.annotation_id}")
    return 0


def _show_start(ctx: Context, start, prompt: str, no_prompt: bool) -> None:
    if start is None:
        return
    if ctx.json:
        ctx.emit({"event": "start", **to_dict(start)})
    elif not no_prompt:
        ctx.say(f"\033[2m{start.prompt_text}\033[0m" if ctx.out.isatty() else start.prompt_text, end="")
