"""Loading any Hugging Face causal LM with its tokenizer, the way every part of the project does.

A name is a local folder (config.json, safetensors, tokenizer files: what `make model` writes) or a
hub id. Local folders never touch the network. The policy server and the trainer load through
here so they agree on dtype, device and what "the model's tensors" are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" -> float32 on the CPU (exact logprobs), bfloat16 on a GPU that supports it."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    return getattr(torch, dtype)


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with what servers report about it."""

    name: str  # the name or path it was loaded from
    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer (fast when the model has one)
    device: torch.device
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer: token ids are in [0, vocab_size)."""
        head = self.model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)

    @property
    def max_length(self) -> int:
        """Longest prompt + completion in tokens (the model's position limit)."""
        config = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        value = getattr(self.tokenizer, "model_max_length", 0)
        return int(value) if 0 < value < 1_000_000 else 2048

    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends a sequence (config and tokenizer may each name some)."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    def special_tokens(self) -> list[tuple[str, str, int]]:
        """(role, text, id) for the tokenizer's named special tokens, e.g. ("eos", "<|endoftext|>", 0)."""
        out = []
        for role in ("bos", "eos", "pad", "unk", "sep", "cls", "mask"):
            text = getattr(self.tokenizer, f"{role}_token", None)
            token_id = getattr(self.tokenizer, f"{role}_token_id", None)
            if text is not None and token_id is not None:
                out.append((role, str(text), int(token_id)))
        return out

    def parameter_summary(self) -> tuple[int, int]:
        """(tensor count, bytes) of the state dict without aliases: what a full update sends."""
        from common.weights import tensor_nbytes, unique_tensors

        tensors = unique_tensors(self.model.state_dict())
        return len(tensors), sum(tensor_nbytes(t) for t in tensors.values())


def from_pretrained(name: str, dtype):
    """(tokenizer, model) of a local folder or hub id, the model in eval mode without gradients, on
    the CPU in `dtype`; a path that does not exist is reported as such, not looked up on a hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).exists()
    if not local and (name.startswith((".", "/")) or name.count("/") > 1):
        raise FileNotFoundError(f"model folder {name!r} does not exist (build the demo model with `make model`)")
    kwargs = {"local_files_only": True} if local else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs).eval()
    model.requires_grad_(False)
    return tokenizer, model


def load_causal_lm(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load model + tokenizer, eval mode, on `device` in `dtype`."""
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    tokenizer, model = from_pretrained(name, resolved_dtype)
    model.to(resolved_device)
    log.info("loaded %s: %s, %s on %s", name, type(model).__name__, resolved_dtype, resolved_device)
    return LoadedModel(name, model, tokenizer, resolved_device, resolved_dtype)
