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


def build_tiny_model(folder: Path, seed: int = 0, n_head: int = 4) -> Path:
    """A 2-layer GPT-2 (random weights, fixed seed) and a ~400-token byte-level BPE tokenizer.
    n_head=2 gives heads of 32 dimensions, the smallest vLLM's CPU attention takes (4 gives 16)."""
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
        vocab_size=len(tokenizer), n_positions=1024, n_embd=64, n_layer=2, n_head=n_head,
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


VLLM_START_S = 900.0  # vLLM's engine core and worker start in ~1-4 min on a loaded 2-core machine


def vllm_python() -> Path:
    """The vLLM venv's python, built first when missing (common/process.py)."""
    from common.process import vllm_python as built

    return built(ROOT)


@pytest.fixture(scope="session")
def tiny_vllm_model_dir(tmp_path_factory) -> Path:
    """The tiny model with 2 heads of 32 dimensions (the same tensors' shapes): what vLLM loads."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model-vllm"), n_head=2)


@pytest.fixture(scope="session")
def start_policy_server():
    """Factory: start_policy_server(model_dir, *args, engine="hf") -> ServerProcess (stopped at
    session end). engine="vllm" runs `--engine vllm` from the vLLM venv's python."""
    from common.process import start_server

    started = []

    def start(model_dir: Path, *args: str, engine: str = "hf"):
        extra = {}
        if engine != "hf":
            args = ("--engine", engine, *args)
            extra = dict(python=vllm_python(), timeout=VLLM_START_S)
        server = start_server(
            "policy_server", ["--model", str(model_dir), "--port", "0", "--host", "127.0.0.1", *args],
            name="policy", cwd=ROOT, **extra,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
