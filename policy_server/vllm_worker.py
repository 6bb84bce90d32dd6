"""What runs inside vLLM's worker processes: loading a checked weight update into the model.

vLLM adds this class's methods to every worker (AsyncEngineArgs.worker_extension_cls), and the
engine calls them by name through collective_rpc, so no code travels pickled. The update arrives
as a safetensors file (written by policy_server/vllm_engine.py after common/weights.py checked the
whole update and its checksum) and goes through the model's own `load_weights`, the hook verl and
OpenRLHF use: it takes the checkpoint's names (the Hugging Face state dict's), transposes, fuses
and shards them the way vLLM's loader does at start-up (docs/design.md, "Weights wire format").
It runs inside vLLM's in-place reload (model_runner.reload_weights), which also redoes what vLLM
does to weights after loading them: on a CPU, vLLM repacks every linear layer's weight for its
GEMM kernels and drops the plain tensor, so a bare load_weights would find nothing to copy into.

Imports nothing of vLLM itself: `self` is vLLM's worker, which has `model_runner.model`.
"""

from __future__ import annotations


class WeightLoader:
    def load_update(self, path: str) -> int:
        """Load every tensor of the file at `path` into this worker's model; returns the count."""
        from safetensors.torch import load_file

        tensors = load_file(path)  # {checkpoint name: tensor}, on the CPU
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)

