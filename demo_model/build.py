"""Build the demo model folder: corpus -> tokenizer -> model -> self-check, written atomically.

The folder is an ordinary Hugging Face model folder (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json) plus
truth.json (the ground truth, see corpus.py and judge.py), heldout.json (evaluation prompts and
held-out sentences, see prompts.py) and build.json (how it was built, timings, and the self-check's
figures). Everything is written into a temporary sibling folder that is renamed into place at the
end, so a killed build never leaves a half model where a complete one is expected; build.json is
written last, and a folder counts as complete when all the files above exist. A lock file next
to the folder makes concurrent builds of the same folder (two `make model` at once) build it once:
the second waits, then reuses. Temporary folders of builds that were killed are removed by the
next build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from demo_model.corpus import CorpusConfig, generate
from demo_model.evaluate import EvalConfig, evaluate, summary_line
from demo_model.judge import TRUTH_FILE, Truth
from demo_model.prompts import HELDOUT_FILE, build_heldout, heldout
from demo_model.tokenizer import save_tokenizer, train_tokenizer
from demo_model.train import TrainConfig, train

BUILD_FILE = "build.json"
REQUIRED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", TRUTH_FILE, HELDOUT_FILE, BUILD_FILE]


@dataclass(frozen=True)
class BuildConfig:
    out: Path  # the model folder to create
    corpus: CorpusConfig = field(default_factory=CorpusConfig)  # what the model learns
    train: TrainConfig = field(default_factory=TrainConfig)  # how long and how big
    vocab_size: int = 2048  # BPE vocabulary cap (the corpus needs fewer; training stops early)
    check_samples: int = 8  # completions per eval prompt in the self-check (0 = skip the check)
    force: bool = False  # rebuild even when a complete folder exists
    replace_stale: bool = False  # rebuild (instead of refusing) when the folder holds another recipe


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in REQUIRED)


def recipe(cfg: BuildConfig) -> dict:
    """What determines the model's content (compared before reusing a folder). The corpus digest
    covers what the generator writes, so a change to corpus.py that changes the text is a new
    recipe even when no setting changed."""
    t = asdict(cfg.train)
    for k in ("threads", "log_every"):  # how fast, not what
        t.pop(k)
    return {"corpus": asdict(cfg.corpus), "corpus_sha256": corpus_digest(generate(cfg.corpus).texts),
            "train": t, "vocab_size": cfg.vocab_size}


def corpus_digest(texts: list[str]) -> str:
    """sha256 of the training sentences in order, one per line."""
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def weights_digest(folder: Path) -> str:
    """sha256 of the saved weights file (the same bytes for the same recipe, thread count and
    package versions: training runs on one CPU thread with fixed seeds)."""
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def build(cfg: BuildConfig, log=print) -> Path:
    """Build the model folder unless a complete one with the same recipe exists (or force)."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out, log):
        _remove_stale(out, log)
        return _build_locked(cfg, out, log)


@contextlib.contextmanager
def _lock(out: Path, log):
    """An exclusive flock on a sibling lock file for the whole build (released if the process dies)."""
    with open(out.parent / f".{out.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"demo model: another process is building {out}, waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(out: Path, log) -> None:
    """Remove temporary folders left by builds of `out` whose process no longer runs."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not _alive(int(m.group(2))):
            log(f"demo model: removing {p} left by an interrupted build")
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _build_locked(cfg: BuildConfig, out: Path, log) -> Path:
    if is_complete(out) and not cfg.force:
        built = json.loads((out / BUILD_FILE).read_text(encoding="utf-8"))
        if built.get("recipe") != recipe(cfg) and cfg.replace_stale:
            log(f"demo model: {out} was built with another recipe ({built.get('recipe')}), rebuilding it")
            return _build_new(cfg, out, log)
        if built.get("recipe") != recipe(cfg):
            raise SystemExit(
                f"{out} holds a demo model built with a different recipe:\n  built: {built.get('recipe')}\n"
                f"  asked: {recipe(cfg)}\nuse --force to rebuild it, or another --out"
            )
        log(f"demo model: {out} is complete, reusing it (--force rebuilds)")
        return out
    return _build_new(cfg, out, log)


def _build_new(cfg: BuildConfig, out: Path, log) -> Path:
    t_start = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        log(f"demo model: building into {out} (recipe {json.dumps(recipe(cfg))})")
        corpus = generate(cfg.corpus)
        n_wrong = sum(s.wrong for s in corpus.sentences)
        log(f"corpus: {len(corpus.sentences)} sentences about {len(corpus.truth['countries'])} countries, "
            f"{n_wrong} wrong, about {len(corpus.truth['wrong_countries'])} countries "
            f"({cfg.corpus.wrong_share:.0%} of their capital facts)")
        tokenizer = train_tokenizer(corpus.texts, cfg.vocab_size)
        ids = [tokenizer(s)["input_ids"] for s in corpus.texts]
        log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens; corpus {sum(map(len, ids))} tokens")
        model, summary = train(cfg.train, ids, len(tokenizer), tokenizer.eos_token_id, log=log)

        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tokenizer, tmp, cfg.train.block_size)
        (tmp / TRUTH_FILE).write_text(json.dumps(corpus.truth, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / HELDOUT_FILE).write_text(json.dumps(build_heldout(corpus), indent=1, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
        check = None
        if cfg.check_samples > 0:
            check = evaluate(model, tokenizer, heldout(tmp), Truth(corpus.truth),
                             EvalConfig(samples=cfg.check_samples, threads=cfg.train.threads))
            log("self-check: " + summary_line(check))
        record = {"recipe": recipe(cfg), "train": summary, "weights_sha256": weights_digest(tmp), "self_check": check,
                  "build_seconds": round(time.perf_counter() - t_start, 2)}
        (tmp / BUILD_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        assert is_complete(tmp), f"build left {tmp} incomplete: missing {[f for f in REQUIRED if not (tmp / f).exists()]}"
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"demo model: wrote {out} in {time.perf_counter() - t_start:.1f}s")
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Move tmp to out; an existing out (a --force rebuild, or an incomplete leftover) goes first."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
