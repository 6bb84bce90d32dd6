"""Checkpoints: policy weights (safetensors), optimizer state, and where training stands.

A checkpoint is a folder `checkpoints/ckpt-<step>` holding model.safetensors, optimizer.pt and
meta.json (step, model version, beta, the replay cursor, the training mode, and the file sizes
and SHA-256s). The weights are what `Prepared.checkpoint_state` gives (trainer_server/model.py):
the whole policy, or under LoRA only the adapters, the base coming again from --model; under
FSDP both files hold the gathered, unsharded state, written by rank 0.
It is written atomically: everything goes into a temporary folder, each file is fsync'd, the
folder is fsync'd, renamed to its final name, and the parent folder is fsync'd. A crash at any
moment leaves either no new folder (only a `.tmp-*` one, removed at the next start) or a
complete one, so the previous checkpoint always stays loadable. Saving a step that exists already
(SaveCheckpoint twice) never deletes the complete folder before its replacement is in place: the
old one is renamed aside (`.replaced-*`), the new one renamed in, and only then the old one
removed; a crash between the two renames finds the old one aside at the next start and puts it
back (docs/design.md, "State").

The store's consumed marks belong to a checkpoint: meta.json records the step, and on resume
`AnnotationStore.restore_consumed(step)` puts back to pending every annotation first consumed
after that step (the saved weights never trained on them). The reference model is never saved:
it is the weights training started from, loaded again from --model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.weights import unique_tensors

log = logging.getLogger(__name__)

CKPT = re.compile(r"^ckpt-(\d{10})$")
FORMAT = 1


@dataclass(frozen=True)
class CheckpointMeta:
    step: int  # optimizer steps taken
    model_version: int  # the version last published
    beta: float  # the KL coefficient in force (adaptive beta moves)
    replay_cursor: int  # store seq the replay over consumed annotations continues after
    model: str  # --model the policy was fine-tuned from
    created_at: float
    format: int = FORMAT
    mode: str = "fp32"  # ModelMode.name, e.g. "bf16+lora8" (what the weights file holds depends on it)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Checkpoints:
    """Writes and finds checkpoints under `root`."""

    def __init__(self, root: Path, keep: int = 3, pause: float = 0.0):
        self.root = root
        self.keep = keep
        self.pause = pause  # tests only: a window in which the folder is complete but not renamed
        root.mkdir(parents=True, exist_ok=True)

    def clean_partial(self) -> list[Path]:
        """Remove folders a crash left half-written; put back a complete checkpoint that a crash
        left renamed aside while its replacement was being renamed in."""
        removed = []
        for path in self.root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        for path in sorted(self.root.glob(".replaced-*")):
            final = self.root / path.name.split("-", 1)[1].split(".", 1)[0]
            if CKPT.match(final.name) and not final.exists():
                os.rename(path, final)
                _fsync_dir(self.root)
                log.warning("put back checkpoint %s (a crash interrupted its replacement)", final)
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, newest first."""
        found = [p for p in self.root.iterdir() if p.is_dir() and CKPT.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, state: Mapping[str, torch.Tensor], optimizer_state: dict, meta: CheckpointMeta) -> Path:
        """Write `state` (name -> tensor, aliases dropped) and `optimizer_state` as a complete checkpoint."""
        final = self.root / f"ckpt-{meta.step:010d}"
        tmp = self.root / f".tmp-ckpt-{meta.step:010d}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            state = {k: v.detach().to("cpu").contiguous() for k, v in unique_tensors(state).items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"step": str(meta.step)})
            torch.save(optimizer_state, tmp / "optimizer.pt")
            files = {}
            for name in ("model.safetensors", "optimizer.pt"):
                _fsync_file(tmp / name)
                files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            with open(tmp / "meta.json", "w") as f:
                json.dump({**asdict(meta), "files": files}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if self.pause:
                time.sleep(self.pause)
            aside = None
            if final.exists():  # the same step saved again (e.g. SaveCheckpoint twice): replace it
                aside = self.root / f".replaced-{final.name}.{os.getpid()}-{time.monotonic_ns()}"
                os.rename(final, aside)
            try:
                os.rename(tmp, final)
            except BaseException:
                if aside is not None:
                    os.rename(aside, final)  # the complete one goes back
                raise
            _fsync_dir(self.root)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.complete()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def read_meta(self, path: Path, verify: bool = True) -> CheckpointMeta:
        """meta.json of a checkpoint; with verify, the files' sizes and checksums are checked."""
        raw = json.loads((path / "meta.json").read_text())
        files = raw.pop("files")
        if verify:
            for name, expected in files.items():
                actual = path / name
                if actual.stat().st_size != expected["bytes"] or _sha256(actual) != expected["sha256"]:
                    raise ValueError(f"{actual}: size or checksum differs from meta.json")
        return CheckpointMeta(**raw)

    def newest(self) -> tuple[Path, CheckpointMeta] | None:
        """The newest checkpoint that verifies; broken ones are skipped with a warning."""
        for path in self.complete():
            try:
                return path, self.read_meta(path)
            except Exception as exc:  # noqa: BLE001 - a damaged checkpoint must not stop the start
                log.warning("skipping checkpoint %s: %s", path, exc)
        return None


def read(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint's weights (CPU) and optimizer state (on `device`), to load into live objects
    (`Prepared.load_checkpoint_state`, `Prepared.load_optimizer_state`)."""
    state = load_file(str(path / "model.safetensors"), device="cpu")
    return state, torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
