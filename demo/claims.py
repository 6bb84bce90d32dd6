"""`make claims`: the idea's other claims, measured on the multi-fact task.

Three comparisons, each a set of arms of the demo loop (demo/loop.py) over several seeds, with
the perfect annotator and the same number of annotated sequences per arm:
1. the KL penalty: two settings that degenerate without it, each trained on one batch sampled
   from the initial model so that every arm gets the same data, at beta = 0 and beta > 0:
   unlikelihood with replacements at a high learning rate (3e-3), where beta = 0 collapses into
   repetition and beta >= 1 prevents it; and likelihood on bad spans without replacements (the
   unbounded -w log p push-down, lr 1e-3), which no beta holds, since pushing one token's logit to
   -inf costs the KL almost nothing at that position (docs/design.md, "The loss"); held-out
   perplexity, distinct-2 and free-running samples show what happens;
2. online against offline: rounds of sampling from the current policy against one batch of the
   whole budget sampled from the initial model, token-level feedback, equal budget and steps;
3. horizon: h = 1, 2, 4 and full with gamma 1 and 0.9, on token rewards (the token arm of
   `make experiment`: unlikelihood, replacements) and on sequence rewards (REINFORCE with a
   baseline); at h = 1 gamma has no effect, so it runs once.
Its schedule is shorter than `make experiment`'s (8 rounds x 64 sequences, constant lr, beta 0.1):
each comparison shows at that budget, and the grid is four times as many arms. It writes
docs/claims/claims.json, a plot per comparison, and each comparison's table (with samples) into
README.md between its own markers (`claims-kl-penalty`, `claims-online-vs-offline`,
`claims-horizon`), so that `--only` reruns one comparison and rewrites only its block.

    python -m demo.claims            # make claims
    python -m demo.claims --only 1   # make claims DEMO_ARGS="--only 1": the KL comparison only
    python -m demo.claims --quick    # make claims QUICK=1: one seed, small budget, a pipeline check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from demo.experiment import RUNS, by_arm, curve, plot_error, run_grid, summary_table
from demo.loop import ArmConfig, arm_arguments, arm_from_args
from demo.measure import MeasureConfig
from demo.report import mean_std, plot_lines, update_readme, write_json

DOCS = Path(__file__).resolve().parent.parent / "docs" / "claims"
# 8 rounds x 64 sequences, 20 steps per round, constant lr 3e-4, beta 0.1; multi-fact error every
# round (4 samples per prompt), everything else at the first and last rounds.
CLAIMS_DEFAULTS = ArmConfig(rounds=8, budget=64, steps=20, measure=MeasureConfig(samples=4, full_every=8))
HORIZONS = ("1", "2", "4", "full")
GAMMAS = (1.0, 0.9)


KL_BETAS = (0.0, 1.0, 4.0)  # the KL comparison's collapse setting (unlikelihood, replacements)
UNBOUNDED_BETAS = (0.0, 0.4)  # ... and its unbounded setting (likelihood, no replacements)


def claim_arms(base: ArmConfig, beta: float, kl_lr: float, unbounded_lr: float = 1e-3) -> dict[str, list[ArmConfig]]:
    """Comparison -> its arms. Arms with the same name are the same run."""
    token = replace(base, name="token h=1", form="token", variant="unlikelihood", horizon="1", gamma=1.0,
                    replacements=True, beta=beta)
    sequence = replace(base, form="sequence", variant="pg_clip", baseline=True, beta=beta)
    # the KL arms: one batch from the initial model (the same data for every beta); distinct-2 and
    # perplexity every round
    offline = replace(token, online=False, measure=replace(base.measure, full_every=1))
    collapse = replace(offline, learning_rate=kl_lr)
    unbounded = replace(offline, variant="likelihood", replacements=False, learning_rate=unbounded_lr)
    horizon = []
    for reward, arm in (("token", token), ("sequence", sequence)):
        for h in HORIZONS:
            for g in GAMMAS if h != "1" else (1.0,):
                name = "token h=1" if (reward, h) == ("token", "1") else f"{reward} reward h={h} gamma={g:g}"
                horizon.append(replace(arm, name=name, horizon=h, gamma=g))
    return {
        "1. KL penalty": [
            *[replace(collapse, name=f"unlikelihood + replacements, lr {kl_lr:g}, beta={b:g}", beta=b)
              for b in KL_BETAS],
            *[replace(unbounded, name=f"likelihood, no replacements, lr {unbounded_lr:g}, beta={b:g}", beta=b)
              for b in UNBOUNDED_BETAS],
        ],
        "2. online vs offline": [
            token,
            replace(token, name="token offline (one batch from the initial model)", online=False),
        ],
        "3. horizon": horizon,
    }


def degeneration_plot(records: list[dict], names: list[str], path: Path) -> Path:
    """distinct-2 and relative held-out perplexity against training steps, per arm."""
    series = {}
    for name, runs in by_arm(records).items():
        if name not in names:
            continue
        steps_per_round = runs[0]["config"]["steps"]
        _, d2, d2_sd = curve(runs, "distinct2")
        _, ppl, _ = curve(runs, "heldout_perplexity")
        steps = [row["round"] * steps_per_round for row in runs[0]["rounds"] if "distinct2" in row]
        series[f"{name}: distinct-2"] = (steps, d2, d2_sd)
        series[f"{name}: perplexity / start"] = (steps, [p / ppl[0] for p in ppl], None)
    return plot_lines(path, "Degeneration against training steps (KL penalty)", "optimizer steps",
                      "distinct-2 / relative held-out perplexity", series)


def samples(arms: list[ArmConfig], grouped: dict[str, list[dict]], free: bool = False) -> str:
    key = "free_examples" if free else "examples"
    return "\n".join(f"- {arm.name}: " + "; ".join(f"`{e}`" for e in grouped[arm.name][0]["rounds"][-1][key])
                     for arm in arms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.claims", description=__doc__.split("\n\n")[0])
    arm_arguments(parser, CLAIMS_DEFAULTS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default %(default)s)")
    parser.add_argument("--kl-lr", type=float, default=3e-3,
                        help="learning rate of the KL comparison's unlikelihood arms (default %(default)s)")
    parser.add_argument("--only", default="", help="comma-separated comparison numbers to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="one seed, one round, small budget (CI check)")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for claims.json and the plots")
    parser.add_argument("--no-readme", action="store_true", help="do not write the tables into README.md")
    parser.add_argument("--cached-only", action="store_true",
                        help="run nothing: report the runs already cached (a grid that has not finished)")
    args = parser.parse_args(argv)
    base = arm_from_args(args, CLAIMS_DEFAULTS)
    seeds = list(range(args.seeds))
    if args.quick:
        base = replace(base, rounds=1, budget=12, steps=2, measure=replace(base.measure, samples=1, free_tokens=8,
                                                                         max_prompts=24))
        seeds = [0]
    comparisons = claim_arms(base, beta=args.beta if args.beta > 0 else 0.1, kl_lr=args.kl_lr)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        comparisons = {t: a for t, a in comparisons.items() if t.split(".")[0] in wanted}
    unique = list({arm.name: arm for arms in comparisons.values() for arm in arms}.values())
    print(f"claims: {len(unique)} distinct arms x {len(seeds)} seeds, {base.rounds} rounds x {base.budget} "
          f"annotated sequences", flush=True)
    t0 = time.perf_counter()
    records = run_grid(unique, seeds, log=lambda m: print(m, flush=True), jobs=args.jobs,
                       cache=None if args.quick else RUNS, cached_only=args.cached_only)
    grouped = by_arm(records)

    start = mean_std([r["rounds"][0]["error_rate"] for r in records])[0] if records else float("nan")
    command = "make claims" + (" QUICK=1" if args.quick else "") + (
        f" DEMO_ARGS=\"--seeds {args.seeds}" + (f" --only {args.only}" if args.only else "")
        + (" --cached-only" if args.cached_only else "") + "\"")
    about = (f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}: "
             f"{len(seeds)} seed(s), {base.rounds} rounds x {base.budget} annotated sequences per arm, "
             f"{base.steps} steps per round, perfect annotator, mean ± sd over seeds; the start error is "
             f"{start:.1%} of the facts in multi-fact completions. Plots in `docs/claims/`.")
    blocks = {}
    for title, arms in comparisons.items():
        left_out = [arm.name for arm in arms if arm.name not in grouped]
        arms = [arm for arm in arms if arm.name in grouped]
        if not arms:
            continue
        chosen = [rec for arm in arms for rec in grouped[arm.name]]
        text = (f"#### {title}\n\n{about}"
                + (f" **Incomplete**: not run yet, left out: {'; '.join(left_out)}." if left_out else "")
                + f"\n\n{summary_table(chosen)}\n\nSamples (seed 0, last round):\n\n{samples(arms, grouped)}")
        if title.startswith("1."):
            text += ("\n\nFree-running samples (seed 0, last round, no stop at the full stop):\n\n"
                     + samples(arms, grouped, free=True))
            degeneration_plot(records, [a.name for a in arms], args.out / "degeneration.png")
        slug = title.split(". ", 1)[1].replace(" ", "-")
        plot_error(chosen, args.out / f"{slug}.png", title)
        blocks[f"claims-{slug.lower()}"] = text
    json_path = args.out / "claims.json"
    merged = {"comparisons": {}, "seeds": {}, "records": []}
    if args.only and json_path.is_file():  # keep the comparisons this run did not touch
        previous = json.loads(json_path.read_text())
        kept = {t: a for t, a in previous["comparisons"].items() if t not in comparisons}
        kept_arms = {name for names in kept.values() for name in names}
        seeds_of = previous["seeds"]  # per comparison; one list for all in files written before --only
        merged = {"comparisons": kept,
                  "seeds": {t: seeds_of if isinstance(seeds_of, list) else seeds_of[t] for t in kept},
                  # an arm shared with a comparison rerun now (token h=1) takes its new records
                  "records": [r for r in previous["records"] if r["arm"] in kept_arms and r["arm"] not in grouped]}
    merged["comparisons"].update({t: [a.name for a in arms] for t, arms in comparisons.items()})
    merged["seeds"].update({t: seeds for t in comparisons})
    merged["records"] += records
    merged["comparisons"] = dict(sorted(merged["comparisons"].items()))  # by number
    write_json(merged, json_path)
    print("\n" + "\n\n".join(blocks.values()))
    if not args.no_readme:
        for name, text in blocks.items():
            update_readme(name, text)
    print(f"\nwrote {json_path} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
