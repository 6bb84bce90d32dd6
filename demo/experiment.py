"""`make experiment`: what token-level feedback is worth against sequence-level feedback.

Every arm is the demo loop (demo/loop.py) on the multi-fact task (completions that state two or
three facts, any of which can be wrong), run over several seeds from the same initial model; every
arm's annotator looks at the same number of sampled completions per round. The arms:
- token-level: each wrong fact a bad span with the right value as its replacement, a share of the
  right facts marked good; unlikelihood loss, h = 1;
- token-level without replacements: the same spans, no replacement;
- sequence-level REINFORCE with a baseline: one reward per completion (-1 any fact wrong, +1 all
  right), spread over every token (h = full), batch-mean baseline (pg_clip --baseline);
- graded sequence-level REINFORCE: the same with the reward linear in the share of right facts;
- rejection-sampling fine-tuning: likelihood on the completions judged all right, nothing else.
Each arm runs with a perfect annotator and with a realistic one (misses 15% of the wrong facts,
marks 5% of the right ones wrong, gives a wrong replacement for 5% of those it marks).

It reports, per arm (mean ± sd over seeds): annotated sequences to reach 1/2, 1/4 and 1/10 of the
start error rate (or "not reached"), the end error rate, held-out perplexity, distinct-2 and KL;
writes docs/experiment/experiment.json, a headline plot (token-level against the best
sequence-level arm) and a plot per annotator setting; and puts the headline and the tables into
README.md between the `headline` and `experiment` markers.

    python -m demo.experiment [--seeds 3] [--rounds R] [--budget B] [--jobs 2] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from demo.loop import RESULTS, ArmConfig, arm_arguments, arm_from_args, run_arm
from demo.measure import MeasureConfig
from demo.report import markdown_table, mean_std, plot_lines, update_readme, write_json

RUNS = RESULTS / "runs"  # one JSON per finished run, keyed by its configuration (see run_grid)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "experiment"
# The comparison's budget and schedule. The schedule is the demo's (16 sequences and 20 steps per
# round, beta 0.2, lr 3e-4), with the learning rate decaying to a tenth over the whole budget
# (0.977 per round over 100 rounds) so that no arm stops learning before its budget is spent. The
# budget, 1,600 annotated sequences, is five times what the token-level arm needs to reach a tenth
# of the start error (about 300 in the demo), so that "a fifth of the annotations" can be read off
# whether or not a sequence-level arm gets there. Each run measures the multi-fact error rate every
# second round (4 samples per prompt), everything else at the start and every 20 rounds.
GRID_DEFAULTS = ArmConfig(rounds=100, budget=16, steps=20, beta=0.2, learning_rate=3e-4, lr_decay=0.977,
                          measure=MeasureConfig(samples=4, every=2, full_every=20))
# Annotator settings: name -> (miss rate, false-mark rate, wrong-replacement rate).
ANNOTATORS = {"perfect": (0.0, 0.0, 0.0), "realistic": (0.15, 0.05, 0.05)}
FRACTIONS = (2, 4, 10)  # annotations to reach start / k are reported for these k
TOKEN_ARM = "token (h=1, unlikelihood, replacements)"


def experiment_arms(base: ArmConfig, annotators: dict[str, tuple[float, float, float]] = ANNOTATORS
                    ) -> list[ArmConfig]:
    """Every arm under every annotator setting; names end with "[setting]"."""
    token = replace(base, form="token", variant="unlikelihood", horizon="1", gamma=1.0, replacements=True)
    sequence = replace(base, form="sequence", variant="pg_clip", baseline=True, horizon="full", gamma=1.0)
    kinds = [
        replace(token, name=TOKEN_ARM),
        replace(token, name="token, no replacements", replacements=False),
        replace(sequence, name="sequence REINFORCE + baseline (h=full)"),
        replace(sequence, name="graded sequence REINFORCE + baseline (h=full)", form="graded"),
        replace(base, name="rejection-sampling fine-tuning", form="rft", variant="likelihood", horizon="full",
                gamma=1.0),
    ]
    arms = []
    for setting, (miss, false_mark, wrong_replacement) in annotators.items():
        for arm in kinds:
            arms.append(replace(arm, name=f"{arm.name} [{setting}]", miss_rate=miss, false_mark_rate=false_mark,
                                wrong_replacement_rate=wrong_replacement))
    # Run order (the grid is long; an interrupted one reports what finished): the main forms under
    # both annotators first, then token-level without replacements, the graded reward last.
    main_forms = [TOKEN_ARM, "sequence REINFORCE + baseline (h=full)", "rejection-sampling fine-tuning"]
    return sorted(arms, key=lambda a: (not any(a.name.startswith(m) for m in main_forms), a.name.startswith("graded")))


def is_sequence_level(arm_name: str) -> bool:
    return not arm_name.startswith("token")


def run_key(arm: ArmConfig) -> str:
    """What determines a run's outcome (everything but its display name), as a short hash."""
    config = asdict(replace(arm, name=""))
    if config["lr_decay"] == 1.0:  # defaults key as before their fields existed
        del config["lr_decay"]
    if config["measure"]["every"] == 1:
        del config["measure"]["every"]
    config["model_build"] = _model_fingerprint(arm.model)
    return hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_fingerprint(model: str) -> str:
    build = Path(model) / "build.json"
    return hashlib.sha1(build.read_bytes()).hexdigest() if build.is_file() else model


def run_grid(arms: Sequence[ArmConfig], seeds: Sequence[int], log=print, jobs: int = 1,
             cache: Path | None = RUNS, cached_only: bool = False) -> list[dict]:
    """Each arm at each seed; returns one record per (arm, seed) with `arm` and `seed` set.

    Runs are independent (each starts its own servers), so `jobs` of them can run at once. A run
    whose configuration was already run (by `make experiment`, `make claims` or an earlier,
    interrupted attempt) is read back from `cache` instead of being run again; delete the folder
    to rerun everything. `cached_only`: run nothing, return the cached records only (and log
    which are missing), to report a grid that has not finished."""
    work = [replace(arm, seed=seed) for arm in arms for seed in seeds]
    if cached_only:
        assert cache is not None, "cached_only needs a cache folder"
        missing = [a for a in work if not (cache / f"{run_key(a)}.json").is_file()]
        for arm in missing:
            log(f"not run yet (left out): {arm.name}, seed {arm.seed}")
        work = [a for a in work if a not in missing]
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
    """x = annotated sequences per measured round (the same for every seed), y mean and spread
    over seeds; rounds that did not measure `key` (not fully measured) are left out."""
    index = [i for i, row in enumerate(runs[0]["rounds"]) if key in row]
    x = [runs[0]["rounds"][i]["annotated_sequences"] for i in index]
    stats = [mean_std([run["rounds"][i][key] for run in runs]) for i in index]
    return x, [m for m, _ in stats], [s for _, s in stats]


def pm(values: Sequence[float], fmt: str = ".3f") -> str:
    mean, std = mean_std(values)
    return f"{mean:{fmt}} ± {std:{fmt}}"


def reach(rounds: Sequence[dict], target: float, key: str = "error_rate") -> float | None:
    """Annotated sequences at which one run's error first falls to `target` or below (linear
    interpolation between the measured rounds), or None when it never does."""
    rounds = [row for row in rounds if key in row]
    for i in range(1, len(rounds)):
        if rounds[i][key] <= target:
            x0, x1 = rounds[i - 1]["annotated_sequences"], rounds[i]["annotated_sequences"]
            y0, y1 = rounds[i - 1][key], rounds[i][key]
            return float(x1) if y0 == y1 else x0 + (y0 - target) * (x1 - x0) / (y0 - y1)
    return None


def reach_stats(runs: Sequence[dict], k: float) -> tuple[float | None, int]:
    """Mean annotated sequences to reach (each run's own) start error / k over the seeds that
    reach it, and how many seeds do; (None, 0) when none does. An arm counts as reaching only when
    every seed does (`reach_cell`)."""
    hits = [reach(r["rounds"], r["rounds"][0]["error_rate"] / k) for r in runs]
    got = [h for h in hits if h is not None]
    return (sum(got) / len(got) if got else None), len(got)


def reach_cell(runs: Sequence[dict], k: float) -> str:
    mean, n = reach_stats(runs, k)
    budget = runs[0]["rounds"][-1]["annotated_sequences"]
    if n == len(runs):
        sd = mean_std([reach(r["rounds"], r["rounds"][0]["error_rate"] / k) for r in runs])[1]
        return f"{mean:.0f} ± {sd:.0f}"
    if n == 0:
        return f"not reached in {budget}"
    return f"{n}/{len(runs)} seeds (mean {mean:.0f}); not reached in {budget} by the others"


def summary_table(records: Sequence[dict], extra: Callable[[list[dict]], list] | None = None,
                  extra_header: Sequence[str] = ()) -> str:
    header = ["arm", "seeds", "annotated seqs", "token rows",
              *[f"seqs to /{k}" for k in FRACTIONS],
              "error start", "error end", "completions wrong end", "single-fact end",
              "held-out ppl end (start)", "distinct-2 end (start)", "KL end", *extra_header]
    rows = []
    for name, runs in by_arm(records).items():
        first = [r["rounds"][0] for r in runs]
        last = [r["rounds"][-1] for r in runs]
        rows.append([
            name, len(runs), last[0]["annotated_sequences"], pm([x["token_rows"] for x in last], ".0f"),
            *[reach_cell(runs, k) for k in FRACTIONS],
            pm([x["error_rate"] for x in first]), pm([x["error_rate"] for x in last]),
            pm([x["sequence_error_rate"] for x in last]), pm([x["single_error_rate"] for x in last]),
            f"{pm([x['heldout_perplexity'] for x in last])} ({mean_std([x['heldout_perplexity'] for x in first])[0]:.3f})",
            f"{pm([x['distinct2'] for x in last])} ({mean_std([x['distinct2'] for x in first])[0]:.3f})",
            pm([x.get("train_final_kl", float("nan")) for x in last], ".4f"),
            *(extra(runs) if extra else []),
        ])
    return markdown_table(header, rows)


def plot_error(records: Sequence[dict], path: Path, title: str, key: str = "error_rate",
               guide: float | None = None) -> Path:
    series = {name: curve(runs, key) for name, runs in by_arm(records).items()}
    if guide is not None:
        xs = [x for s in series.values() for x in s[0]]
        series["start / 10"] = ([min(xs), max(xs)], [guide, guide], None)
    return plot_lines(path, title, "annotated sequences", f"{key.replace('_', ' ')} (mean ± sd over seeds)",
                      series)


def best_sequence_arm(grouped: dict[str, list[dict]], setting: str) -> str | None:
    """The sequence-level arm (of one annotator setting) that reaches /10 with the fewest
    annotations; when none reaches it, the one with the lowest end error."""
    names = [n for n in grouped if is_sequence_level(n) and n.endswith(f"[{setting}]")]
    if not names:
        return None

    def key(name: str) -> tuple:
        mean, n = reach_stats(grouped[name], 10)
        end = mean_std([r["rounds"][-1]["error_rate"] for r in grouped[name]])[0]
        return (n < len(grouped[name]), mean if mean is not None else math.inf, end)

    return min(names, key=key)


def perplexity_at_reach(run: dict, k: float = 10) -> float | None:
    """Held-out perplexity at the first full measurement at or after the run reached start / k
    (perplexity is measured every `full_every` rounds); None when it never reached it, or no full
    measurement follows."""
    at = reach(run["rounds"], run["rounds"][0]["error_rate"] / k)
    if at is None:
        return None
    return next((row["heldout_perplexity"] for row in run["rounds"]
                 if "heldout_perplexity" in row and row["annotated_sequences"] >= at), None)


def headline(records: Sequence[dict], setting: str = "perfect") -> tuple[str, list[str], str]:
    """The headline table (token-level against the best sequence-level arm, one annotator
    setting), the two arm names, and a sentence on the target: token-level reaches /10 with at most
    a fifth of the best sequence arm's annotations, at held-out perplexity no worse than the start
    (read at the first full measurement after reaching /10, in every seed)."""
    grouped = by_arm(records)
    token = f"{TOKEN_ARM} [{setting}]"
    best = best_sequence_arm(grouped, setting)
    names = [n for n in (token, best) if n is not None and n in grouped]
    header = ["arm", "seeds", *[f"annotated seqs to /{k} of start error" for k in FRACTIONS],
              "held-out ppl at /10", "error start", "error end", "held-out ppl start", "held-out ppl end"]
    at_reach = {name: [perplexity_at_reach(r) for r in grouped[name]] for name in names}  # per seed
    rows = []
    for name in names:
        runs = grouped[name]
        rows.append([name, len(runs), *[reach_cell(runs, k) for k in FRACTIONS],
                     pm(at_reach[name]) if None not in at_reach[name] else "-",
                     pm([r["rounds"][0]["error_rate"] for r in runs]),
                     pm([r["rounds"][-1]["error_rate"] for r in runs]),
                     pm([r["rounds"][0]["heldout_perplexity"] for r in runs]),
                     pm([r["rounds"][-1]["heldout_perplexity"] for r in runs])])
    if len(names) < 2:
        return markdown_table(header, rows), names, "not measured (an arm is missing)"
    t_runs, s_runs = grouped[token], grouped[best]
    (t_mean, t_n), (s_mean, s_n) = reach_stats(t_runs, 10), reach_stats(s_runs, 10)
    t_budget, s_budget = t_runs[0]["rounds"][-1]["annotated_sequences"], s_runs[0]["rounds"][-1]["annotated_sequences"]
    if t_n < len(t_runs):
        verdict = (f"Target missed: token-level feedback reaches /10 in {t_n} of {len(t_runs)} seeds within {t_budget} "
                   f"annotated sequences.")
        return markdown_table(header, rows), names, verdict
    start_ppl = [r["rounds"][0]["heldout_perplexity"] for r in t_runs]
    t_ppl = at_reach[token]
    worse = sum(not (p is not None and p <= p0) for p, p0 in zip(t_ppl, start_ppl, strict=True))
    ppl_ok = worse == 0
    ppl_text = (f"held-out perplexity when it gets there {pm([p for p in t_ppl if p is not None])} against "
                f"{mean_std(start_ppl)[0]:.3f} at the start" + ("" if ppl_ok else f", above the start in {worse} of "
                                                                  f"{len(t_runs)} seeds"))
    s_end_ppl = mean_std([r["rounds"][-1]["heldout_perplexity"] for r in s_runs])[0]
    s_text = f"{best} ends at held-out perplexity {s_end_ppl:.3f} ({s_end_ppl / mean_std(start_ppl)[0] - 1:+.0%})"
    if s_n < len(s_runs):
        ratio_text = (f"the best sequence-level arm does not reach it in every seed within {s_budget}, so it needs "
                      f"more than {s_budget / t_mean:.1f}x as many")
        ratio_ok = s_budget >= 5 * t_mean
        ratio_verdict = "met" if ratio_ok else "not shown at this budget"
    else:
        ratio_text = f"the best sequence-level arm after {s_mean:.0f} ({s_mean / t_mean:.1f}x as many)"
        ratio_ok = s_mean >= 5 * t_mean
        ratio_verdict = "met" if ratio_ok else "missed"
    if ratio_ok and not ppl_ok:
        ratio_verdict = "missed on perplexity"
    verdict = (f"Token-level feedback reaches /10 after {t_mean:.0f} annotated sequences (mean over seeds), "
               f"{ratio_text}; token-level {ppl_text}; {s_text}. Target (token-level with at most a fifth of "
               f"the annotations, perplexity no worse than the start): {ratio_verdict}"
               + ("" if ppl_ok or ratio_verdict.endswith("perplexity") else "; perplexity above the start too")
               + ".")
    return markdown_table(header, rows), names, verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.experiment", description=__doc__.split("\n\n")[0])
    arm_arguments(parser, GRID_DEFAULTS)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="one seed, one round, small budget: a pipeline check")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for experiment.json and the plots")
    parser.add_argument("--no-readme", action="store_true", help="do not write the tables into README.md")
    parser.add_argument("--cached-only", action="store_true",
                        help="run nothing: report the runs already cached (a grid that has not finished)")
    args = parser.parse_args(argv)
    base = arm_from_args(args, GRID_DEFAULTS)
    seeds = list(range(args.seeds))
    if args.quick:
        base = replace(base, rounds=1, budget=12, steps=2,
                       measure=replace(base.measure, samples=1, free_tokens=8, max_prompts=24))
        seeds = [0]
    arms = experiment_arms(base)
    print(f"experiment: {len(arms)} arms x {len(seeds)} seeds, {base.rounds} rounds x {base.budget} sequences",
          flush=True)
    t0 = time.perf_counter()
    records = run_grid(arms, seeds, log=lambda m: print(m, flush=True), jobs=args.jobs,
                       cache=None if args.quick else RUNS, cached_only=args.cached_only)
    missing = [f"{a.name} (seed {s})" for a in arms for s in seeds
               if sum(r["arm"] == a.name and r["seed"] == s for r in records) == 0]
    head_table, head_names, verdict = headline(records)
    head_records = [r for r in records if r["arm"] in head_names]
    start = mean_std([r["rounds"][0]["error_rate"] for r in head_records])[0]
    plot_error(head_records, args.out / "headline.png",
               "Token-level vs the best sequence-level arm (perfect annotator)", guide=start / 10)
    sections = []
    for setting in ANNOTATORS:
        chosen = [r for r in records if r["arm"].endswith(f"[{setting}]")]
        if not chosen:
            continue
        plot_error(chosen, args.out / f"experiment-{setting}.png", f"Feedback forms, {setting} annotator",
                   guide=start / 10)
        sections.append(f"#### {setting} annotator\n\n{summary_table(chosen)}")
    _, _, realistic_verdict = headline(records, "realistic")
    write_json({"arms": [a.name for a in arms], "seeds": seeds, "annotators": ANNOTATORS,
                "headline": {"arms": head_names, "verdict": verdict, "realistic_verdict": realistic_verdict},
                "records": records}, args.out / "experiment.json")
    command = "make experiment" + (" QUICK=1" if args.quick else "") + (
        " DEMO_ARGS=--cached-only" if args.cached_only else "")
    about = (f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}: {len(seeds)} seed(s), {base.rounds} rounds "
             f"x {base.budget} annotated sequences per arm, {base.steps} steps per round, beta {base.beta:g}, lr "
             f"{base.learning_rate:g} decaying x{base.lr_decay:g} per round, mean ± sd over seeds; "
             f"error = share of the facts stated in sampled multi-fact completions that are wrong.")
    if missing:
        about += (f" **Incomplete grid**: {len(missing)} of {len(arms) * len(seeds)} runs had not finished and are "
                  f"left out: {'; '.join(missing)}.")
    head_body = (f"{about}\n\n{head_table}\n\n{verdict}\n\nWith the realistic annotator (15% misses, 5% false "
                 f"marks, 5% wrong replacements): {realistic_verdict}\n\n![headline](docs/experiment/headline.png)")
    body = about + " Plots: `docs/experiment/experiment-perfect.png`, `docs/experiment/experiment-realistic.png`.\n\n" \
        + "\n\n".join(sections)
    print("\n" + head_body + "\n\n" + body)
    if not args.no_readme:
        update_readme("headline", head_body)
        update_readme("experiment", body)
    print(f"wrote {args.out / 'experiment.json'} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
