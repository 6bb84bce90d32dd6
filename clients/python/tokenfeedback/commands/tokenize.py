"""`tokenfeedback tokenize`: the policy's tokens of a text, with ids and code-point offsets."""

from __future__ import annotations

import argparse
import sys

from tokenfeedback.commands.registry import Context, command, to_dict


def _configure_tokenize(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="text to tokenize ('-' reads stdin)")


@command("tokenize", "show the policy's tokens of a text, with ids and code-point offsets", _configure_tokenize)
def run_tokenize(args: argparse.Namespace, ctx: Context) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    with ctx.policy() as policy:
        reply = policy.tokenize(text)
    for position, token in enumerate(reply.tokens):
        if ctx.json:
            ctx.emit({"position": position, **to_dict(token)})
        else:
            ctx.say(f"{position:4} {token.token_id:7} [{token.char_start}, {token.char_end}) {token.text!r}")
    return 0
