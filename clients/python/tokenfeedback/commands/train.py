"""`tokenfeedback train`: run optimizer steps on the stored annotations, with a progress bar."""

from __future__ import annotations

import argparse

from tokenfeedback.commands.registry import Context, command, to_dict, with_numeric_horizon


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: one pass over the pending annotations)")
    p.add_argument("--variant", choices=("likelihood", "unlikelihood", "pg_clip"), default=None)
    p.add_argument("--beta", type=float, default=None, help="KL weight")
    p.add_argument("--learning-rate", "--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--horizon", default=None, help="credit-assignment horizon: a positive integer or 'full'")
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--no-publish", action="store_true", help="do not publish the new weights to the policy servers")


@command("train", "run optimizer steps on the stored annotations, with a progress bar", _configure_train)
def run_train(args: argparse.Namespace, ctx: Context) -> int:
    from tqdm import tqdm

    overrides = dict(variant=args.variant, beta=args.beta, learning_rate=args.learning_rate,
                     batch_size=args.batch_size, horizon=args.horizon, gamma=args.gamma,
                     publish=False if args.no_publish else None)
    last = None
    bar = None
    rows = 0  # rows of the steps applied so far (the final message carries no row count of its own)
    with ctx.trainer() as trainer:
        try:
            for progress in trainer.train(args.steps, timeout=ctx.stream_timeout, **overrides):
                last = progress
                if not progress.done and not progress.skipped:
                    rows += progress.rows
                if ctx.json:
                    ctx.emit({"event": "progress", **with_numeric_horizon(to_dict(progress))})
                    continue
                if bar is None:
                    bar = tqdm(total=progress.total_steps or None, unit="step", file=ctx.err, dynamic_ncols=True)
                if not progress.done or progress.step > bar.n:
                    bar.update(max(0, progress.step - bar.n))
                bar.set_postfix(loss=f"{progress.loss:.4f}", kl=f"{progress.kl:.4g}", rows=rows,
                                version=progress.model_version, refresh=True)
        finally:
            if bar is not None:
                bar.close()
    if last is None:
        ctx.note("the trainer sent no progress")
        return 1
    if not ctx.json:
        text = (f"trained {last.step} step(s): loss {last.loss:.4f}, token loss {last.token_loss:.4f}, "
                f"kl {last.kl:.4g}, {rows} rows")
        if last.published_version:
            text += f"; published version {last.published_version}"
        if last.message:
            text += f" ({last.message})"
        ctx.say(text)
    return 0
