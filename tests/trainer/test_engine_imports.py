"""The trainer engine needs neither grpc nor the generated stubs, directly or through what it imports
(docs/design.md, "Servers"): a child process in which importing them raises loads the engine on the
tiny model, stores an annotation and trains a step."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys

    class Blocked:
        # a meta-path finder that refuses grpc and the generated stubs, whoever imports them
        def find_spec(self, name, path=None, target=None):
            if name == "grpc" or name.startswith(("grpc.", "grpc_")) or name.startswith("tokenfeedback.v1"):
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Blocked())
    from pathlib import Path

    from trainer_server.api import SequenceInput, TokenLabelInput, TrainSettings
    from trainer_server.config import TrainerConfig
    from trainer_server.engine import TrainerEngine

    engine = TrainerEngine(TrainerConfig(model=sys.argv[1], data=Path(sys.argv[2]), threads=1, batch_size=1))
    engine.load()
    outcome, = engine.submit([SequenceInput("a", prompt_token_ids=[1, 2], completion_token_ids=[3, 4],
                                            token_labels=[TokenLabelInput(1, -1.0)])])
    assert outcome.status == "accepted", outcome
    progress = []
    engine.train(TrainSettings(steps=1), progress.append)
    assert progress[-1].done and progress[-1].step == 1, progress[-1]
    engine.close()
    leaked = sorted(m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "tokenfeedback.v1")))
    assert not leaked, leaked
    print("engine ran without grpc")
""")


def test_engine_imports_neither_grpc_nor_stubs(tiny_model_dir, tmp_path):
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model_dir), str(tmp_path / "data")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine ran without grpc" in done.stdout


def test_blocking_finder_bites(tmp_path):
    """The same finder makes the gRPC side fail to import (so the test above can fail)."""
    child = CHILD.split("from pathlib import Path")[0] + "import trainer_server.publish\n"
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "blocked import of grpc" in done.stderr, done.stderr[-2000:]
