"""Merging published LoRA adapters into the policy's weights (common/adapters.py has the format).

The engine swaps whole tensors; this module turns an adapter update into such tensors:
W = B + up @ down for every weight the update names, and W = B for every weight an earlier
adapter update changed that this one does not name. B, the weight before any adapter, is kept
(a reference to the tensor the model held, no copy) for the adapted weights only; a full update
that replaces an adapted weight makes the new tensor the one later adapters apply to.

The product is computed in fp32 on the model's device and rounded once to the model's dtype, so
a bf16 server gets B + delta rounded once, not the rounding errors of every earlier version.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from common.adapters import is_adapter_update, pair_factors


class AdapterMerger:
    """What the engine needs to turn updates into tensors; its state changes only in `applied`."""

    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor] = {}  # adapted weight -> B (the tensor before any adapter)

    def resolve(self, tensors: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the tensors to swap in, the base map to keep once the swap succeeded). `current`: the
        model's tensors now, by canonical name. Pure: nothing changes until `applied` is called."""
        if not is_adapter_update(tensors):
            base = {name: b for name, b in self.base.items() if name not in tensors}
            return dict(tensors), base
        factors = pair_factors(tensors)
        base = {name: self.base.get(name, current[name]) for name in factors}
        out = {}
        for name, (up, down) in factors.items():
            b = base[name]  # (S0, S1)
            delta = up.to(b.device, torch.float32) @ down.to(b.device, torch.float32)  # (S0, r) @ (r, S1)
            out[name] = (b.float() + delta).to(b.dtype)
        for name, b in self.base.items():
            if name not in factors:
                out[name] = b  # no longer adapted: back to the weight before the adapter
        return out, base

    def applied(self, base: dict[str, torch.Tensor]) -> None:
        self.base = base
