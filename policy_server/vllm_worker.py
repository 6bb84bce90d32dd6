"""What runs inside vLLM's worker processes: loading a checked weight update into the model.

vLLM adds this class's methods to every worker (AsyncEngineArgs.worker_extension_cls), and the
engine calls them by name through collective_rpc, so no code travels pickled. The update arrives
as a safetensors file of the model's complete state in checkpoint names (the Hugging Face state
dict's), written by policy_server/vllm_engine.py after common/weights.py checked the update and
its checksum (docs/design.md, "Weights wire format").

It goes through vLLM's in-place reload (model_runner.reload_weights), which runs the model's own
`load_weights` (the hook verl and OpenRLHF use: it transposes, fuses and shards checkpoint tensors
as vLLM's loader does at start-up) and then redoes, layer by layer, what vLLM does to weights after
loading them. That is why the whole state travels: a layer only part of whose tensors arrive is
rebuilt with the rest uninitialized, and on a CPU vLLM repacks every linear layer's weight for its
GEMM kernels and drops the plain tensor, so nothing else would hold the missing part.

Imports nothing of vLLM at module level: `self` is vLLM's worker, which has `model_runner`.
"""

from __future__ import annotations


class WeightLoader:
    def load_update(self, path: str) -> int:
        """Reload this worker's model from the full state at `path`; returns the tensor count."""
        from safetensors.torch import load_file
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        tensors = load_file(path)  # {checkpoint name: tensor}, on the CPU
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        # A tied LM head loads nothing of its own (its weight is the embedding's), so the reload
        # leaves its kernel state alone; on a CPU that state is a packed copy of the old embedding.
        # Rebuild it from the weight every embedding-shaped layer now holds.
        for module in self.model_runner.model.modules():
            if isinstance(module, VocabParallelEmbedding) and module.weight.numel():
                module.quant_method.process_weights_after_loading(module)
        return len(tensors)
