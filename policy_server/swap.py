"""Weight swaps: the model's current tensors, and the tensors older versions still need.

An update (policy.proto UpdateWeights) is checked completely before anything changes
(common/weights.py's WeightAccumulator: names, dtypes, shapes, sizes, checksum), then swapped in
at a step boundary of the scheduler by pointing the model's parameters at the new tensors.
Streams already running keep their version: the old tensors of every changed name stay alive in
`retired[version]` and their batch runs through torch.func.functional_call with them, until the
last of those streams ends. New streams start on the new version. Memory: one extra copy of the
changed tensors while old streams run (docs/design.md, "Versions and staleness").

An update may also carry LoRA adapter factors instead of full tensors (common/adapters.py); they
become merged weights (policy_server/adapters.py) before the same swap (docs/design.md, "Weights
wire format").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

import torch
from torch.func import functional_call

from common.adapters import UpdateAccumulator
from common.errors import Aborted
from common.metrics import policy_meter
from common.weights import WeightAccumulator, aliases, tensor_nbytes
from policy_server.adapters import AdapterMerger

log = logging.getLogger(__name__)


class ModelVersions:
    """The model at its current version, plus the replaced tensors of versions still in use.
    `forward` and `swap` run on the scheduler thread only; `begin_update` anywhere."""

    def __init__(self, model: torch.nn.Module, device: torch.device, max_update_bytes: int = 0):
        self.model = model
        self.device = device
        self.version = 0
        self.max_update_bytes = max_update_bytes  # 0: the model's size bounds an update
        state = model.state_dict()
        self._canonical = aliases(state)  # tied names -> the name their tensor travels under
        # What an update is checked against: names, dtypes, shapes (meta tensors hold no memory).
        self._specs = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in state.items()}
        self._retired: dict[int, dict[str, torch.Tensor]] = {}  # old version -> its changed tensors
        self._adapters = AdapterMerger()  # adapter updates -> merged weights

    def begin_update(self) -> WeightAccumulator:
        """An accumulator for one update (header, chunks, commit), checked against the model; it
        takes full tensors or LoRA adapter factors (common/adapters.py)."""
        return UpdateAccumulator(self._specs, self.version, self._canonical,
                                 max_total_bytes=self.max_update_bytes or None)

    def forward(self, version: int, **kwargs):
        """The model's forward at `version`: the module itself, or with an older version's tensors."""
        if version == self.version:
            return self.model(**kwargs)
        # An older version still has running streams: the same module with its old tensors.
        return functional_call(self.model, self._retired[version], (), kwargs, tie_weights=True, strict=False)

    def swap(self, target: int, tensors: dict[str, torch.Tensor], running: int) -> int:
        """Make `tensors` the model's, as version `target`. `running`: streams on the current
        version, which keep its tensors (retired) until they end. Between steps only."""
        started = time.perf_counter()
        if target <= self.version:
            raise Aborted(f"the server moved to version {self.version} meanwhile; target {target} is stale",
                          "header.target_version")
        tensors, adapter_base = self._adapters.resolve(tensors, self.model.state_dict())  # factors -> weights
        new = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        current = self.model.state_dict(keep_vars=True)
        old = {name: current[name].detach() for name in new}  # keeps the old storage alive
        for retired in self._retired.values():
            for name, tensor in old.items():
                retired.setdefault(name, tensor)
        if running:
            self._retired[self.version] = dict(old)
        for name, tensor in new.items():
            self._set_tensor(name, tensor)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("weights: version %d -> %d (%d tensors, %d bytes); %d running stream(s) keep version %d",
                 self.version, target, len(new), sum(tensor_nbytes(t) for t in new.values()), running, self.version)
        self.version = target
        self._adapters.applied(adapter_base)
        policy_meter().update.observe(time.perf_counter() - started)
        return target

    def release(self, in_use: Collection[int]) -> None:
        """Forget the tensors of older versions no stream runs on any more."""
        for version in list(self._retired):
            if version not in in_use:
                del self._retired[version]

    def _set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        owner_name, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr].data = tensor  # tied modules share this Parameter
        elif attr in owner._buffers:
            owner._buffers[attr] = tensor
        else:
            raise AssertionError(f"{name} is neither a parameter nor a buffer")
