"""LoRA adapter updates on the UpdateWeights wire, both ends, free of grpc and protobuf.

A trainer that trains LoRA adapters on a frozen base publishes only the adapters
(docs/design.md, "Weights wire format"). They travel in the same stream as full weights (header,
chunks, commit with SHA-256; common/weights.py), as two factors per adapted weight:

    <weight name>.lora_up    shape (S0, r)   the model's dtype
    <weight name>.lora_down  shape (r, S1)   the model's dtype

where <weight name> is a 2-D tensor of the model's state dict of shape (S0, S1), e.g.
"transformer.h.0.attn.c_attn.weight", and r >= 1 is the adapter rank. The adapted weight is

    W = B + lora_up @ lora_down

with B the weight before any adapter was applied to it (the --model weights unless a full update
replaced them). The sender folds LoRA's scaling alpha / r and the layer's layout (GPT-2's Conv1D
stores weights as (in, out)) into the factors, so the receiver needs neither. An update carries
either full tensors or adapter factors, never both; an adapter update is the whole adapter:
weights adapted by an earlier update that it does not name go back to B.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from common.errors import InvalidArgument
from common.weights import WeightAccumulator

UP = ".lora_up"
DOWN = ".lora_down"


def factor_names(weight: str) -> tuple[str, str]:
    """"x.weight" -> ("x.weight.lora_up", "x.weight.lora_down")."""
    return weight + UP, weight + DOWN


def split_name(name: str) -> tuple[str, str] | None:
    """"x.weight.lora_up" -> ("x.weight", UP); None for a name that is not an adapter factor."""
    for suffix in (UP, DOWN):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def is_adapter_update(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(split_name(name) is not None for name in tensors)


def pair_factors(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{weight name: (up, down)} of an adapter update; InvalidArgument unless every weight has both
    factors of one rank and nothing else is in the update."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        split = split_name(name)
        if split is None:
            raise InvalidArgument(f"tensor {name!r} is not an adapter factor; an update carries full tensors "
                                  "or adapter factors, not both", "chunk.name")
        pairs.setdefault(split[0], {})[split[1]] = tensor
    out = {}
    for weight, factors in pairs.items():
        if set(factors) != {UP, DOWN}:
            missing = (UP if UP not in factors else DOWN)
            raise InvalidArgument(f"adapter of {weight!r} lacks its {missing} factor", "chunk.name")
        up, down = factors[UP], factors[DOWN]
        if up.shape[1] != down.shape[0]:
            raise InvalidArgument(f"adapter of {weight!r}: rank {up.shape[1]} in {UP}, {down.shape[0]} in {DOWN}",
                                  "chunk.shape")
        out[weight] = (up, down)
    return out


class UpdateAccumulator(WeightAccumulator):
    """A WeightAccumulator that also takes adapter factors of the model's 2-D weights.

    A factor's shape is free in the rank r (1 <= r <= min(S0, S1)) and fixed in the other
    dimension; its dtype is the weight's. commit() returns {name: tensor} as the base class does,
    factors under their wire names; `pair_factors` checks that they pair up.
    """

    def __init__(self, reference: Mapping[str, torch.Tensor], current_version: int,
                 canonical: Mapping[str, str] | None = None, max_total_bytes: int | None = None):
        super().__init__(reference, current_version, canonical, max_total_bytes)
        adaptable = {self._canonical[name] for name, t in reference.items() if t.dim() == 2}
        self._max_tensor_count += 2 * len(adaptable)  # every 2-D weight may come as two factors instead

    def _expected(self, name: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
        split = split_name(name)
        if split is None:
            return super()._expected(name, shape)
        weight, suffix = split
        if weight not in self._reference or self._reference[weight].dim() != 2:
            raise InvalidArgument(f"adapter factor {name!r}: {weight!r} is not a 2-D weight of the model",
                                  "chunk.name")
        spec = self._reference[weight]  # (S0, S1)
        rows, cols = spec.shape
        if len(shape) != 2:
            raise InvalidArgument(f"adapter factor {name!r} must be 2-D, got shape {list(shape)}", "chunk.shape")
        rank = shape[1] if suffix == UP else shape[0]
        fixed = shape[0] if suffix == UP else shape[1]
        if fixed != (rows if suffix == UP else cols) or not 1 <= rank <= min(rows, cols):
            want = f"[{rows}, r]" if suffix == UP else f"[r, {cols}]"
            raise InvalidArgument(f"adapter factor {name!r} must have shape {want} with 1 <= r <= "
                                  f"{min(rows, cols)}, got {list(shape)}", "chunk.shape")
        # the canonical name of the weight keeps tied names from being adapted twice
        return torch.empty(shape, dtype=spec.dtype, device="meta"), self._canonical[weight] + suffix
