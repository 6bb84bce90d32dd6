"""A batch of sequences decoding together: one KV cache, left-padded, one forward per step.

Sequences join after their prefill and leave when they finish or are cancelled. Prompts that
arrive together are prefilled together, left-padded in one forward (`Batch.prefilled`; padded
positions get position ids and keys/values of their own, which the mask hides and which are zeroed
afterwards), and that group then joins the running batch (`merge`). The cache holds every row's
keys and values right-aligned: row i's real tokens are the last len_i columns, the columns before
are padding that the attention mask hides. Each decoding step feeds one token per row at its own position
(position_ids = the row's real length), so a row computes exactly what it would alone, up to
floating-point summation order (masked columns contribute exp(-inf) = 0).

Joining pads the shorter side on the left; leaving drops rows and then the columns that became
padding for every row. Both copy the cache once; a decoding step appends one column (the model's
own cache update).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x names the cache argument `cache` (older models: `past_key_values`)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward can compute the last position's logits only."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def output_cache(output) -> DynamicCache:
    return output["cache"] if "cache" in output else output["past_key_values"]


def _layers(cache: DynamicCache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") or getattr(layer, "is_sliding", False) for layer in layers):
        raise NotImplementedError(
            f"{type(cache).__name__} with sliding or non-attention layers: the batching scheduler needs full "
            "key/value caches (DynamicLayer)"
        )
    return layers


def _left_pad(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """Pad dim -2 (the sequence) on the left with zeros. tensor: (B, H, T, D) -> (B, H, T+columns, D)."""
    if columns == 0:
        return tensor
    pad = tensor.new_zeros(*tensor.shape[:-2], columns, tensor.shape[-1])
    return torch.cat([pad, tensor], dim=-2)


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (B, 1) the last sampled token of each row
    attention_mask: torch.Tensor  # (B, T + 1) 1 for real tokens, 0 for padding
    position_ids: torch.Tensor  # (B, 1) each row's position of the new token


class Batch:
    """Rows of one model version; `rows` holds the engine's per-sequence objects, in cache order."""

    def __init__(self, version: int, device: torch.device):
        self.version = version
        self.device = device
        self.rows: list = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # (B, T)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def prefilled(cls, version: int, device: torch.device, rows: list, cache: DynamicCache,
                  mask: torch.Tensor) -> Batch:
        """Sequences prefilled together: `cache` (n, H, W, D per layer) left-padded, `mask` (n, W)
        1 for real tokens. Padding keys and values are zeroed (a padded position's own forward
        may leave anything there, NaN included, and 0 * NaN would leak through the mask)."""
        batch = cls(version, device)
        batch.rows, batch.cache, batch.mask = list(rows), cache, mask
        if not bool(mask.all()):
            real = mask.bool()[:, None, :, None]  # (n, 1, W, 1)
            for layer in _layers(cache):
                layer.keys = torch.where(real, layer.keys, torch.zeros((), dtype=layer.keys.dtype,
                                                                       device=layer.keys.device))  # (n, H, W, D)
                layer.values = torch.where(real, layer.values, torch.zeros((), dtype=layer.values.dtype,
                                                                           device=layer.values.device))
        return batch

    def add(self, row, cache: DynamicCache, length: int) -> None:
        """Join a sequence whose prefill cache (1, H, length, D per layer) is `cache`."""
        ones = torch.ones(1, length, dtype=torch.long, device=self.device)  # (1, L)
        self.merge(Batch.prefilled(self.version, self.device, [row], cache, ones))

    def merge(self, other: Batch) -> None:
        """Take in the rows of `other` (same version), left-padding whichever side is shorter."""
        if not other.rows:
            return
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask = list(other.rows), other.cache, other.mask
            return
        width = max(self.columns, other.columns)
        own, new = width - self.columns, width - other.columns
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, own), _left_pad(theirs.keys, new)], dim=0)  # (B+n, H, W, D)
            mine.values = torch.cat([_left_pad(mine.values, own), _left_pad(theirs.values, new)], dim=0)
        pad = torch.nn.functional.pad
        self.mask = torch.cat([pad(self.mask, (own, 0)), pad(other.mask, (new, 0))], dim=0)  # (B+n, W)
        self.rows.extend(other.rows)

    def keep(self, keep: list[int]) -> None:
        """Keep only these row indices (ascending); drop the columns that are padding for all rows."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = None
            self.mask = self.mask[:0, :0]
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)  # (B', T)
        first = self.columns - int(mask.sum(dim=1).max())  # leading columns that are padding everywhere
        self.mask = mask[:, first:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]  # (B', H, T', D)
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    def step_inputs(self, last_tokens: list[int]) -> StepInputs:
        ids = torch.tensor(last_tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
        positions = self.mask.sum(dim=1, keepdim=True)  # (B, 1) real tokens so far
        ones = torch.ones(len(self.rows), 1, dtype=torch.long, device=self.device)
        return StepInputs(ids, torch.cat([self.mask, ones], dim=1), positions)

    def advance(self, inputs: StepInputs, cache: DynamicCache) -> None:
        """After the forward: the cache has one more column for every row."""
        self.mask = inputs.attention_mask
        self.cache = cache
