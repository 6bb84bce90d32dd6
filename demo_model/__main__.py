"""python -m demo_model --out data/demo-model: build the embedded demo model once (see build.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from demo_model.build import BuildConfig, build
from demo_model.corpus import CorpusConfig
from demo_model.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m demo_model",
        description="Train the demo model (a small GPT-2 on synthetic capital-city facts, some wrong) "
                    "into a Hugging Face folder, once: a complete folder is reused unless --force.",
    )
    ap.add_argument("--out", type=Path, default=Path("data/demo-model"), help="model folder to write")
    ap.add_argument("--seed", type=int, default=CorpusConfig.seed, help="seed of the corpus and of training")
    ap.add_argument("--wrong-share", type=float, default=CorpusConfig.wrong_share,
                    help="share of capital facts about a wrong-fact country that name a wrong capital")
    ap.add_argument("--wrong-countries", type=int, default=CorpusConfig.wrong_countries,
                    help="how many countries get wrong facts")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps")
    ap.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch threads")
    ap.add_argument("--check-samples", type=int, default=BuildConfig.check_samples,
                    help="completions per eval prompt in the self-check after training (0 skips it)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    ap.add_argument("--replace-stale", action="store_true",
                    help="rebuild a folder built with another recipe (corpus, settings) instead of refusing")
    args = ap.parse_args(argv)
    cfg = BuildConfig(
        out=args.out,
        corpus=CorpusConfig(seed=args.seed, wrong_share=args.wrong_share, wrong_countries=args.wrong_countries),
        train=TrainConfig(seed=args.seed, steps=args.steps, threads=args.threads),
        check_samples=args.check_samples,
        force=args.force,
        replace_stale=args.replace_stale,
    )
    print(f"config: {cfg}")
    build(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
