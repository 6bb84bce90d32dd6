"""The policy engine needs neither grpc nor the generated stubs, directly or through what it
imports (docs/design.md, "Servers"): a child process in which importing them raises loads the
engine on the tiny model, generates, scores and swaps weights."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

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

CHILD = BLOCK + textwrap.dedent("""
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
    leaked = sorted(m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "tokenfeedback.v1")))
    assert not leaked, leaked
    print("engine ran without grpc")
""")


def test_engine_imports_neither_grpc_nor_stubs(tiny_model_dir):
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine ran without grpc" in done.stdout


def test_blocking_finder_bites():
    """The same finder makes the gRPC side fail to import (so the test above can fail)."""
    done = subprocess.run([sys.executable, "-c", BLOCK + "import policy_server.service\n"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "blocked import of" in done.stderr, done.stderr[-2000:]
