"""The engines need neither grpc nor the generated stubs, directly or through what they import
(docs/design.md, "Servers"): in a child process in which importing them raises, the policy engine
loads the tiny model, generates, scores and swaps weights, and the trainer engine stores an
annotation and trains a step. The same finder makes each gRPC side fail to import, so these tests
can fail."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK = textwrap.dedent("""
    import sys

    class Blocked:
        # a meta-path finder that refuses grpc and the generated stubs, whoever imports them
        def find_spec(self, name, path=None, target=None):
            if name == "grpc" or name.startswith(("grpc.", "grpc_")) or name.startswith("tokenfeedback.v1"):
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Blocked())
""")

LEAKS = textwrap.dedent("""
    leaked = sorted(m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "tokenfeedback.v1")))
    assert not leaked, leaked
    print("engine ran without grpc")
""")

POLICY = BLOCK + textwrap.dedent("""
    import asyncio

    from common.weights import iter_chunks, summarize, unique_tensors
    from policy_server.api import GenerateRequest, ScoreRequest, TokenEvent
    from policy_server.config import EngineConfig
    from policy_server.engine import Engine
    from policy_server.sampling import SamplingParams

    async def main():
        engine = Engine.load(EngineConfig(model=sys.argv[1], device="cpu"))
        engine.start()
        events = [e async for e in engine.generate(GenerateRequest("Paris is", params=SamplingParams(max_new_tokens=3)))]
        tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
        assert len(tokens) == 3, events
        score = await engine.score(ScoreRequest(prompt_text="Paris is", completion_token_ids=tuple(tokens)))
        assert len(score.tokens) == 3
        state = {k: v.clone() for k, v in unique_tensors(engine.model.state_dict()).items()}
        chunks = list(iter_chunks(state))
        summary = summarize(chunks)
        update = engine.begin_update()
        update.header(1, summary.tensor_count, summary.total_bytes)
        for c in chunks:
            update.chunk(c.name, c.dtype, c.shape, c.offset, bytes(c.data))
        assert (await engine.commit_update(update, summary.sha256)).model_version == 1
        await engine.close()

    asyncio.run(main())
""") + LEAKS

TRAINER = BLOCK + textwrap.dedent("""
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
""") + LEAKS


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_policy_engine_imports_neither_grpc_nor_stubs(tiny_model_dir):
    done = _run(POLICY, str(tiny_model_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine ran without grpc" in done.stdout


def test_trainer_engine_imports_neither_grpc_nor_stubs(tiny_model_dir, tmp_path):
    done = _run(TRAINER, str(tiny_model_dir), str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine ran without grpc" in done.stdout


@pytest.mark.parametrize("module", ["policy_server.service", "trainer_server.publish"])
def test_blocking_finder_bites(module):
    done = _run(BLOCK + f"import {module}\n")
    assert done.returncode != 0 and "blocked import of" in done.stderr, done.stderr[-2000:]
