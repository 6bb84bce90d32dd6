"""`tokenfeedback status`: the trainer's counts, versions, last losses and policy servers."""

from __future__ import annotations

import argparse

from tokenfeedback.commands.registry import Context, command, to_dict, with_numeric_horizon


@command("status", "the trainer's counts, versions, last losses and policy servers")
def run_status(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.trainer() as trainer:
        status = trainer.status()
    if ctx.json:
        ctx.emit(with_numeric_horizon(to_dict(status)))
        return 0
    ctx.say(f"trainer {args.trainer}: model {status.model_name or '?'} version {status.model_version}, "
            f"step {status.step}{' (training)' if status.training else ''}")
    ctx.say(f"annotations: {status.annotations_total} total, {status.annotations_pending} pending, "
            f"{status.annotations_consumed} consumed, {status.annotations_withdrawn} withdrawn; "
            f"{status.rows_total} rows")
    ctx.say(f"last loss {status.last_loss:.4f} (token {status.last_token_loss:.4f}, kl {status.last_kl:.4g}); "
            f"variant {status.variant}, beta {status.beta:g}, horizon {status.horizon or '1'}, gamma {status.gamma:g}")
    for policy in status.policies:
        state = f"version {policy.model_version}" if policy.reachable else f"unreachable: {policy.last_error}"
        ctx.say(f"policy {policy.address}: {state}")
    return 0
