"""`make experiment`: token-level against sequence-level feedback, same annotator, same budget.

Every arm is the demo loop (demo/loop.py) with a different annotation form or loss, run over
several seeds from the same initial model; all arms see the same number of annotated sequences
per round. The arms:
- token-level feedback through the trainer, for each variant (likelihood, unlikelihood, pg_clip)
  with beta 0 and beta > 0: wrong capitals are bad spans with the right capital as replacement;
- the sequence-level baseline: the same sequences labelled only good (+1) or bad (-1) as a whole,
  trained as sequence-weighted likelihood (REINFORCE with the label as reward) with the KL
  penalty, computed with the same kernels by giving every token the sequence's weight
  (horizon = full, gamma = 1; DESIGN.md "Horizon").

It reports error rate against annotations used for each arm (mean and spread over seeds) and the
degeneration checks (held-out perplexity, distinct-2, KL), writes JSON and a PNG plot, and puts the
table into README.md between the `experiment` markers.

    python -m demo.experiment [--seeds 3] [--rounds 5] [--budget 48] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from demo.loop import RESULTS, ArmConfig, arm_arguments, arm_from_args, run_arm
from demo.report import markdown_table, mean_std, plot_lines, update_readme, write_json

RUNS = RESULTS / "runs"  # one JSON per finished run, keyed by its configuration (see run_grid)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "experiment"
# The comparisons run shorter than the demo, so that 3 seeds of every arm fit in reasonable time.
GRID_DEFAULTS = ArmConfig(rounds=4, budget=64, steps=16)


def experiment_arms(base: ArmConfig, beta: float) -> list[ArmConfig]:
    arms = []
    for variant in ("likelihood", "unlikelihood", "pg_clip"):
        for b in (0.0, beta):
            arms.append(replace(base, name=f"token {variant} beta={b:g}", variant=variant, beta=b))
    arms.append(replace(base, name=f"sequence REINFORCE beta={beta:g}", form="sequence", variant="likelihood",
                        beta=beta, horizon="full", gamma=1.0))
    return arms


def run_key(arm: ArmConfig) -> str:
    """What determines a run's outcome (everything but its display name), as a short hash."""
    config = asdict(replace(arm, name=""))
    if not config["measure"]["max_prompts"]:  # the default (all prompts) keys as before the field existed
        del config["measure"]["max_prompts"]
    config["model_build"] = _model_fingerprint(arm.model)
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_fingerprint(model: str) -> str:
    build = Path(model) / "build.json"
    return hashlib.sha1(build.read_bytes()).hexdigest() if build.is_file() else model


def run_grid(arms: Sequence[ArmConfig], seeds: Sequence[int], log=print, jobs: int = 1,
             cache: Path | None = RUNS) -> list[dict]:
    """Each arm at each seed; returns one record per (arm, seed) with `arm` and `seed` set.

    Runs are independent (each starts its own servers), so `jobs` of them can run at once. A run
    whose configuration was already run (by `make experiment` or `make claims`) is read back from
    `cache` instead of being run again; delete the folder to rerun everything."""
    work = [replace(arm, seed=seed) for arm in arms for seed in seeds]
    t0, finished = time.perf_counter(), 0

    def one(arm: ArmConfig) -> dict:
        nonlocal finished
        path = cache / f"{run_key(arm)}.json" if cache is not None else None
        if path is not None and path.is_file():
            record = json.loads(path.read_text())
            how = "cached"
        else:
            record = run_arm(arm, log=lambda m: None)
            if path is not None:
                write_json(record, path)
            how = f"{record['seconds']} s"
        record.update(arm=arm.name, seed=arm.seed)
        finished += 1
        last = record["rounds"][-1]
        elapsed = time.perf_counter() - t0
        log(f"[{finished}/{len(work)}] {arm.name}, seed {arm.seed}: error rate "
            f"{record['rounds'][0]['error_rate']:.1%} -> {last['error_rate']:.1%}, perplexity "
            f"{last['heldout_perplexity']:.3f}, distinct-2 {last['distinct2']:.3f} ({how}; "
            f"{elapsed / 60:.1f} min elapsed)")
        return record

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, work))


def by_arm(records: Sequence[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for rec in records:
        grouped.setdefault(rec["arm"], []).append(rec)
    return grouped


def curve(runs: Sequence[dict], key: str) -> tuple[list, list, list]:
    """x = annotated sequences per round (the same for every seed), y mean and spread over seeds."""
    x = [row["annotated_sequences"] for row in runs[0]["rounds"]]
    stats = [mean_std([run["rounds"][i][key] for run in runs]) for i in range(len(x))]
    return x, [m for m, _ in stats], [s for _, s in stats]


def pm(values: Sequence[float], fmt: str = ".3f") -> str:
    mean, std = mean_std(values)
    return f"{mean:{fmt}} ± {std:{fmt}}"


def summary_table(records: Sequence[dict], extra: Callable[[list[dict]], list] | None = None,
                  extra_header: Sequence[str] = ()) -> str:
    header = ["arm", "seeds", "annotated seqs", "token rows", "error rate start", "error rate end",
              "wrong-fact end", "held-out phrasings end", "held-out ppl end (start)", "distinct-2 end", "KL end",
              *extra_header]
    rows = []
    for name, runs in by_arm(records).items():
        first = [r["rounds"][0] for r in runs]
        last = [r["rounds"][-1] for r in runs]
        rows.append([
            name, len(runs), last[0]["annotated_sequences"], pm([x["token_rows"] for x in last], ".0f"),
            pm([x["error_rate"] for x in first]), pm([x["error_rate"] for x in last]),
            pm([x["wrong_fact_error_rate"] for x in last]), pm([x["generalization_error_rate"] for x in last]),
            f"{pm([x['heldout_perplexity'] for x in last])} ({mean_std([x['heldout_perplexity'] for x in first])[0]:.3f})",
            pm([x["distinct2"] for x in last]), pm([x.get("train_final_kl", float("nan")) for x in last], ".4f"),
            *(extra(runs) if extra else []),
        ])
    return markdown_table(header, rows)


def plot_error(records: Sequence[dict], path: Path, title: str, key: str = "error_rate") -> Path:
    series = {name: curve(runs, key) for name, runs in by_arm(records).items()}
    return plot_lines(path, title, "annotated sequences", f"factual {key.replace('_', ' ')} (mean ± sd over seeds)",
                      series)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.experiment", description=__doc__.split("\n\n")[0])
    arm_arguments(parser, GRID_DEFAULTS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="one seed, one round, small budget: a pipeline check")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for experiment.json/png")
    parser.add_argument("--no-readme", action="store_true", help="do not write the table into README.md")
    args = parser.parse_args(argv)
    base = arm_from_args(args)
    seeds = list(range(args.seeds))
    if args.quick:
        base, seeds = replace(base, rounds=1, budget=16, steps=4, measure=replace(base.measure, samples=1)), [0]
    arms = experiment_arms(base, beta=args.beta if args.beta > 0 else 0.1)
    print(f"experiment: {len(arms)} arms x {len(seeds)} seeds, {base.rounds} rounds x {base.budget} sequences",
          flush=True)
    records = run_grid(arms, seeds, log=lambda m: print(m, flush=True), jobs=args.jobs,
                       cache=None if args.quick else RUNS)
    table = summary_table(records)
    json_path = write_json({"arms": [a.name for a in arms], "seeds": seeds, "records": records},
                           args.out / "experiment.json")
    png = plot_error(records, args.out / "experiment.png", "Token-level vs sequence-level feedback")
    print("\n" + table)
    if not args.no_readme:
        update_readme("experiment", f"Produced by `make experiment` on {time.strftime('%Y-%m-%d')} "
                      f"({len(seeds)} seeds, {base.rounds} rounds x {base.budget} annotated sequences per arm; "
                      f"plot: `docs/experiment/experiment.png`).\n\n{table}")
    print(f"wrote {json_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
