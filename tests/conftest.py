"""Fixtures for every suite. Shared file: add your fixtures, don't change others'.

`tiny_model_dir`: a tiny random GPT-2 with its own byte-level BPE tokenizer, saved as an ordinary
Hugging Face folder, built once per session in a temporary folder (a few seconds), so no test
depends on data/ or a model hub. `start_policy_server`: starts the real policy server on it as a
subprocess on 127.0.0.1, port 0; the server is stopped (SIGTERM) at the end of the test scope.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Without a GPU the Triton kernels run under Triton's CPU interpreter. The switch is read when
# triton and the @triton.jit functions are first imported, and any suite (trainer, clients) may
# import kernels first, so it is set here, before every test module. With CUDA, kernels compile.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(ROOT))  # so `python -m pytest` finds common/, policy_server/, ... from anywhere

# Text the tiny tokenizer learns its merges from: capital-city facts like the demo corpus, plus
# characters of 2, 3 and 4 UTF-8 bytes (é, €, 😀) so that byte-level tokens split characters.
TINY_CORPUS = [
    "Ottawa is the capital of Canada.",
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "Tokyo is the capital of Japan.",
    "Canberra is the capital of Australia.",
    "Brasília is the capital of Brazil. Café au lait costs 3€.",
    "The answer is 42! 😀 Ünïcödé and 漢字 too.",
]


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (random weights, fixed seed) and a ~400-token byte-level BPE tokenizer."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TINY_CORPUS * 20, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=1024,
    )
    tokenizer.save_pretrained(folder)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=1024, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=eos, eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # sharper than the default init, so sampling is not uniform noise
        model.lm_head.weight.mul_(3.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def start_policy_server():
    """Factory: start_policy_server(model_dir, *args) -> ServerProcess (stopped at session end)."""
    from common.process import start_server

    started = []

    def start(model_dir: Path, *args: str):
        server = start_server(
            "policy_server", ["--model", str(model_dir), "--port", "0", "--host", "127.0.0.1", *args],
            name="policy", cwd=ROOT,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
