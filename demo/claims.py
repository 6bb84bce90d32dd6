"""`make claims`: the idea's claims measured on the same model, annotator and annotation budget.

Four comparisons, each a set of arms of the demo loop (demo/loop.py) over several seeds:
1. credit assignment: token rewards with h = 1; a sequence reward with h = 1 (only the last token
   moves); a sequence reward with h = full (sequence-level REINFORCE); token rewards with h = full,
   gamma = 0.9;
2. the KL penalty: beta 0, a fixed beta, and the adaptive controller (Ziegler et al. 2019), with
   token feedback, watching degeneration (distinct-2, held-out perplexity) against training steps;
3. online against offline feedback: the whole budget sampled from the initial model and trained on
   at once, against rounds of sampling from the current policy;
4. the loss variants (likelihood, unlikelihood, pg_clip) at h = 1, with and without replacements.
Arms shared by several comparisons run once. It writes a JSON record, PNG plots (error rate against
annotations used; degeneration against steps) under docs/claims/, and a markdown table per
comparison into README.md between the `claims` markers.

    python -m demo.claims            # make claims: 3 seeds
    python -m demo.claims --quick    # make claims QUICK=1: one seed, small budget, a pipeline check
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from demo.experiment import GRID_DEFAULTS, RUNS, by_arm, curve, plot_error, run_grid, summary_table
from demo.loop import ArmConfig, arm_arguments, arm_from_args
from demo.report import mean_std, plot_lines, update_readme, write_json

DOCS = Path(__file__).resolve().parent.parent / "docs" / "claims"


def claim_arms(base: ArmConfig, beta: float, kl_target: float) -> dict[str, list[ArmConfig]]:
    """Comparison -> its arms. Arms with the same name are the same run."""
    token = replace(base, name="token h=1", form="token", horizon="1", gamma=1.0, variant="unlikelihood", beta=beta)
    return {
        "1. credit assignment": [
            token,
            replace(token, name="sequence reward h=1", form="sequence", variant="likelihood"),
            replace(token, name="sequence reward h=full", form="sequence", variant="likelihood", horizon="full"),
            replace(token, name="token h=full gamma=0.9", horizon="full", gamma=0.9),
        ],
        "2. KL penalty": [
            replace(token, name="token beta=0", beta=0.0),
            token,
            replace(token, name=f"token adaptive beta (KL target {kl_target:g})", kl_target=kl_target),
        ],
        "3. online vs offline": [
            token,
            replace(token, name="token offline (one batch from the initial model)", online=False),
        ],
        "4. loss variants": [
            *[replace(token, name="token h=1" if v == "unlikelihood" else f"token {v}", variant=v)
              for v in ("likelihood", "unlikelihood", "pg_clip")],
            *[replace(token, name=f"token {v}, no replacements", variant=v, replacements=False)
              for v in ("likelihood", "unlikelihood", "pg_clip")],
        ],
    }


def annotations_to_reach(runs: list[dict], target: float) -> str:
    """Mean annotated sequences at which the mean error curve first reaches `target` (linear
    interpolation between rounds), or 'not reached'."""
    x, y, _ = curve(runs, "error_rate")
    for i in range(1, len(x)):
        if y[i] <= target:
            x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
            at = x1 if y0 == y1 else x0 + (y0 - target) * (x1 - x0) / (y0 - y1)
            return f"{at:.0f}"
    return "not reached"


def degeneration_plot(records: list[dict], names: list[str], path: Path) -> Path:
    """distinct-2 and relative perplexity against training steps, one line each per arm."""
    series = {}
    for name, runs in by_arm(records).items():
        if name not in names:
            continue
        steps_per_round = runs[0]["config"]["steps"]
        x, d2, d2_sd = curve(runs, "distinct2")
        _, ppl, _ = curve(runs, "heldout_perplexity")
        steps = [i * steps_per_round for i in range(len(x))]
        series[f"{name}: distinct-2"] = (steps, d2, d2_sd)
        series[f"{name}: perplexity / start"] = (steps, [p / ppl[0] for p in ppl], None)
    return plot_lines(path, "Degeneration against training steps (KL penalty)", "optimizer steps",
                      "distinct-2 / relative held-out perplexity", series)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.claims", description=__doc__.split("\n\n")[0])
    arm_arguments(parser, GRID_DEFAULTS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default %(default)s)")
    parser.add_argument("--kl-target-adaptive", type=float, default=0.02, help="KL target of the adaptive arm")
    parser.add_argument("--quick", action="store_true", help="one seed, one round, small budget (CI check)")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for claims.json and the plots")
    parser.add_argument("--no-readme", action="store_true", help="do not write the tables into README.md")
    args = parser.parse_args(argv)
    base = arm_from_args(args)
    seeds = list(range(args.seeds))
    if args.quick:
        base = replace(base, rounds=1, budget=12, steps=2, measure=replace(base.measure, samples=1, free_tokens=8,
                                                                         max_prompts=48))
        seeds = [0]
    comparisons = claim_arms(base, beta=args.beta if args.beta > 0 else 0.1, kl_target=args.kl_target_adaptive)
    unique = list({arm.name: arm for arms in comparisons.values() for arm in arms}.values())
    print(f"claims: {len(unique)} distinct arms x {len(seeds)} seeds, {base.rounds} rounds x {base.budget} "
          f"annotated sequences", flush=True)
    t0 = time.perf_counter()
    records = run_grid(unique, seeds, log=lambda m: print(m, flush=True), jobs=args.jobs,
                       cache=None if args.quick else RUNS)
    grouped = by_arm(records)
    start = mean_std([r["rounds"][0]["error_rate"] for r in records])[0]
    target = start / 2

    sections = []
    for title, arms in comparisons.items():
        chosen = [rec for arm in arms for rec in grouped[arm.name]]
        table = summary_table(chosen, extra=lambda runs: [annotations_to_reach(runs, target)],
                              extra_header=[f"annotations to reach {target:.1%}"])
        sections.append(f"#### {title}\n\n{table}\n\nSamples (seed 0, last round):\n\n" + "\n".join(
            f"- {arm.name}: " + "; ".join(f"`{e}`" for e in grouped[arm.name][0]["rounds"][-1]["examples"])
            for arm in arms))
        slug = title.split(". ", 1)[1].replace(" ", "-")
        plot_error(chosen, args.out / f"{slug}.png", title)
    degeneration_plot(records, [a.name for a in comparisons["2. KL penalty"]], args.out / "degeneration.png")
    json_path = write_json({"comparisons": {t: [a.name for a in arms] for t, arms in comparisons.items()},
                            "seeds": seeds, "target_error_rate": target, "records": records},
                           args.out / "claims.json")
    body = (f"Produced by `make claims{' QUICK=1' if args.quick else ''}` on {time.strftime('%Y-%m-%d')}: "
            f"{len(seeds)} seed(s), {base.rounds} rounds x {base.budget} annotated sequences per arm, "
            f"{base.steps} steps per round, mean ± sd over seeds; the start error rate is {start:.1%}, and "
            f"'annotations to reach' uses half of it. Plots in `docs/claims/`.\n\n" + "\n\n".join(sections))
    print("\n" + body)
    if not args.no_readme:
        update_readme("claims", body)
    print(f"\nwrote {json_path} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
