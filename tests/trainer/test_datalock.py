"""A data folder is held by one trainer at a time: a second trainer on it exits with an error naming
the folder and the holder's pid; the kernel releases the lock when the holder dies, SIGKILL too."""

from __future__ import annotations

import subprocess
import sys

from .conftest import FAST, ROOT
from .helpers import status, trainer_stub


def test_a_second_trainer_is_refused_and_a_killed_one_leaves_the_folder_free(start_trainer, tiny_model_dir,
                                                                            tmp_path):
    data = tmp_path / "data"
    first = start_trainer(tiny_model_dir, data)
    second = subprocess.run(
        [sys.executable, "-m", "trainer_server", "--model", str(tiny_model_dir), "--data", str(data), "--port", "0",
         *FAST], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-2000:]
    assert (f"data folder {data.resolve()} is in use by another trainer (pid {first.proc.pid})"
            in second.stderr), second.stderr[-2000:]
    assert "listening" not in second.stdout, "the refused trainer bound a port"
    assert status(trainer_stub(first.address)).model_version == 0  # the first one is untouched

    first.kill()  # SIGKILL: no clean-up ran, the kernel dropped the lock
    third = start_trainer(tiny_model_dir, data)
    assert status(trainer_stub(third.address)).annotations_total == 0
