"""Fixtures of the trainer suite: real trainer (and policy) servers as subprocesses on 127.0.0.1.

`start_trainer(model_dir, data_dir, *args)` runs `python -m trainer_server` on port 0 and waits for
SERVING; every server started is stopped at the end of the test (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.process import ServerProcess, start_server

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--threads", "1", "--publish-retry", "0.3"]  # two cores shared with the policy server


@pytest.fixture
def start_trainer():
    started: list[ServerProcess] = []

    def start(model_dir: Path, data_dir: Path, *args: str, module: str = "trainer_server",
              prefix: tuple[str, ...] = (), wait_healthy: bool = True) -> ServerProcess:
        server = start_server(
            module,
            [*prefix, "--model", str(model_dir), "--data", str(data_dir), "--port", "0", "--host", "127.0.0.1",
             *FAST, *args],
            name="trainer", cwd=ROOT, wait_healthy=wait_healthy, timeout=180,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_policy():
    """A policy server per test (the session-wide one in tests/conftest.py keeps its weights
    across tests; trainer tests change them)."""
    started: list[ServerProcess] = []

    def start(model_dir: Path, *args: str, port: int = 0) -> ServerProcess:
        server = start_server(
            "policy_server", ["--model", str(model_dir), "--port", str(port), "--host", "127.0.0.1", *args],
            name="policy", cwd=ROOT, timeout=180,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def trained_tiny_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny GPT-2 fitted for a few seconds to the capital facts of tests/conftest.py, so that its
    next-token distributions differ by position ("Ottawa is the capital of" -> " Canada", then ".")
    like a real model's, and a token-level annotation has something local to change."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import TINY_CORPUS

    folder = tmp_path_factory.mktemp("trained-tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token_id
    texts = [[eos, *tokenizer(s)["input_ids"], eos] for s in TINY_CORPUS[:5]]
    length = max(map(len, texts))
    ids = torch.tensor([t + [eos] * (length - len(t)) for t in texts])  # (5, L)
    mask = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in texts])  # (5, L)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            model.lm_head.weight.div_(8.0)  # undo the fixture's sharpening: start from a smooth model
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(120):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
