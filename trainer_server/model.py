"""The model as training sees it: precision, LoRA adapters, FSDP sharding, and the loss module.

`prepare` takes the loaded Hugging Face model and returns a `Prepared`: the policy, how the
reference of the KL term is computed, and `loss` (a module, so FSDP can own it). Modes, chosen by
the trainer's flags (README, "Trainer"):

- fp32 full (--precision fp32): parameters, gradients and AdamW state in fp32; the reference is a
  frozen fp32 copy. About 16 bytes per parameter plus 4 for the reference, before activations.
- bf16 full (--precision bf16): mixed precision, the standard for torch.optim.AdamW: fp32 master
  weights, gradients and optimizer state; forward and backward run under torch.autocast in
  bfloat16. The frozen reference has no optimizer and is held in bfloat16 (2 bytes per parameter).
  The kernel gets bfloat16 hidden states and head and accumulates in fp32 (docs/design.md,
  "Kernels").
- LoRA (--lora-rank R, either precision): PEFT adapters on a frozen base (trainer_server/lora.py);
  the base is held in the compute dtype, the adapters train in fp32, and the reference is the same
  model with the adapters off: no second copy (docs/design.md, "The loss").
- FSDP (--fsdp, under torchrun, with any of the above): FSDP2 `fully_shard` on every transformer
  block (the classes the model names in `_no_split_modules`) and then on the loss module as the
  root, so parameters, gradients and optimizer state are sharded, and the embedding and head,
  which the fused loss reads outside the blocks, are gathered for the loss's forward and backward.
  Gradients are summed over ranks, not averaged, like the data-parallel path
  (trainer_server/training.py).

What leaves the trainer: `published()` is the full state dict (full modes) or the adapter factors
(LoRA, common/adapters.py); `checkpoint_state()` is the full state dict or the adapter tensors.
Under FSDP both are collective: every rank calls them, rank 0 gets the tensors.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from trainer_server.config import PRECISIONS


@dataclass(frozen=True)
class ModelMode:
    """How the model trains (the trainer's --precision, --lora-*, --fsdp)."""

    precision: str = "fp32"  # fp32 | bf16 (mixed: fp32 master weights, bf16 compute)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen base
    lora_alpha: float = 16.0  # LoRA scaling numerator: the update is (alpha / rank) B A
    lora_targets: tuple[str, ...] = ()  # module name suffixes to adapt; empty: PEFT's default for the model
    fsdp: bool = False  # shard with FSDP2 over the torchrun processes

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision: must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank: must be >= 0 (0: full fine-tuning), got {self.lora_rank}")
        if self.lora_rank and not self.lora_alpha > 0:
            raise ValueError(f"--lora-alpha: must be > 0, got {self.lora_alpha}")
        if self.lora_targets and not self.lora_rank:
            raise ValueError("--lora-targets: needs --lora-rank > 0")

    @property
    def name(self) -> str:
        """A short label, e.g. "bf16+lora8+fsdp" (checkpoints record it; resuming checks it)."""
        parts = [self.precision] + ([f"lora{self.lora_rank}"] if self.lora_rank else []) + (["fsdp"] if self.fsdp else [])
        return "+".join(parts)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def output_head(model: torch.nn.Module) -> torch.nn.Parameter:
    """The lm_head weight [V, H] the kernel multiplies the last hidden states with."""
    head = model.get_output_embeddings()
    assert head is not None and hasattr(head, "weight"), f"{type(model).__name__} has no output embeddings"
    return head.weight


def last_hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The input of lm_head (final layer norm applied): the base model's last hidden state."""
    return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)


class PolicyLoss(torch.nn.Module):
    """Policy and reference forward, then the fused token loss: one module, the FSDP root.

    forward(...) returns the kernel's (loss, row_losses, kl) for one packed micro-batch; the
    reference runs first, without gradients (the policy with adapters off under LoRA)."""

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module | None, peft_model, mode: ModelMode):
        super().__init__()
        self.policy = policy
        self.reference = reference  # None under LoRA: the policy with adapters off
        self._peft = [peft_model]  # a list: not a submodule (the policy already is its base model)
        self.mode = mode

    def _reference_context(self):
        return self._peft[0].disable_adapter() if self.reference is None else contextlib.nullcontext()

    def forward(self, ids, mask, gather, row_index, targets, weights, behavior, *, beta: float, variant: str,
                clip_eps: float, loss_fn):
        dtype = self.mode.compute_dtype
        autocast = torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32)
        reference = self.policy if self.reference is None else self.reference
        with torch.no_grad(), self._reference_context(), autocast:
            ref_hidden = last_hidden(reference, ids, mask)  # (B, L, H)
            ref_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])[gather].to(dtype)  # (T, H)
            ref_head = output_head(reference).to(dtype)  # (V, H)
        with autocast:
            hidden = last_hidden(self.policy, ids, mask)  # (B, L, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[gather].to(dtype)  # (T, H)
        head = output_head(self.policy).to(dtype)  # (V, H); a differentiable cast of the fp32 master
        return loss_fn(hidden, head, ref_hidden, ref_head, row_index, targets, weights, beta=beta, variant=variant,
                       behavior_logprobs=behavior if variant == "pg_clip" else None, clip_eps=clip_eps,
                       return_details=True)


@dataclass
class Prepared:
    """The policy ready to train, in a mode; see the module docstring."""

    mode: ModelMode
    policy: torch.nn.Module  # the Hugging Face model (LoRA layers injected in place under LoRA)
    loss: PolicyLoss
    peft_model: object | None = None  # the PeftModel under LoRA

    @property
    def reference(self) -> torch.nn.Module | None:
        return self.loss.reference

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains (tied weights once)."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ---- what leaves the trainer ----

    def published(self, leader: bool = True) -> dict[str, torch.Tensor]:
        """What a publish sends, as CPU tensors: the full state dict without aliases, or the adapter
        factors (common/adapters.py). Collective under FSDP; only the leader gets tensors."""
        if self.mode.lora_rank:
            from trainer_server.lora import adapter_factors

            factors = adapter_factors(self.peft_model, _full_tensor)
            return factors if leader else {}
        return _full_state(self.policy, leader)

    def checkpoint_state(self, leader: bool = True) -> dict[str, torch.Tensor]:
        """What a checkpoint holds of the weights, as CPU tensors: the full state dict, or the
        adapter tensors (the base comes again from --model). Collective under FSDP."""
        if self.mode.lora_rank:
            from trainer_server.lora import adapter_parameters

            out = {name: _full_tensor(p).detach().to("cpu", copy=True) for name, p in
                   adapter_parameters(self.peft_model).items()}
            return out if leader else {}
        return _full_state(self.policy, leader)

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what `checkpoint_state` gave (under FSDP every rank, each with the whole state,
        keeps its shard)."""
        expected = self._live_state()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model in mode {self.mode.name}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, tensor in expected.items():
                source = state[name]
                if _is_dtensor(tensor):
                    from torch.distributed.tensor import distribute_tensor

                    source = distribute_tensor(source.to(tensor.device, tensor.dtype), tensor.device_mesh,
                                               tensor.placements)
                tensor.copy_(source)

    def _live_state(self) -> dict[str, torch.Tensor]:
        if self.mode.lora_rank:
            from trainer_server.lora import adapter_parameters

            return dict(adapter_parameters(self.peft_model))
        return _named_state(self.policy)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state dict to save (gathered in full under FSDP: collective)."""
        if not self.mode.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.loss, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load what `optimizer_state` gave (under FSDP every rank, each with the whole state)."""
        if not self.mode.fsdp:
            optimizer.load_state_dict(state)
            return
        if not state.get("state"):
            return  # nothing kept per parameter (plain SGD); the learning rate is set at every step
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.loss, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))


def prepare(model: torch.nn.Module, mode: ModelMode, reference: torch.nn.Module | None = None) -> Prepared:
    """`model`: the loaded Hugging Face model in fp32 (changed in place). `reference`: the frozen
    reference for full modes (default: a copy of `model`, in the compute dtype); ignored under
    LoRA. Under FSDP the process group must exist (torchrun)."""
    peft_model = None
    if mode.lora_rank:
        from trainer_server.lora import add_adapters

        model.to(mode.compute_dtype)  # the frozen base in the compute dtype
        peft_model = add_adapters(model, mode.lora_rank, mode.lora_alpha, mode.lora_targets)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # the adapters train in fp32 (master weights)
        reference = None
    else:
        if reference is None:
            reference = copy.deepcopy(model).to(mode.compute_dtype)  # (ties kept)
        reference.eval().requires_grad_(False)
        model.requires_grad_(True)
    model.eval()  # dropout off (trainer_server/training.py)
    loss = PolicyLoss(model, reference, peft_model, mode)
    if mode.fsdp:
        _shard(loss)
    return Prepared(mode, model, loss, peft_model)


def _shard(loss: PolicyLoss) -> None:
    """FSDP2: every transformer block, then the loss module as the root (module docstring)."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(loss.policy, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"--fsdp: {type(loss.policy).__name__} names no transformer block class (_no_split_modules)")
    sharded = []
    for model in (loss.policy, loss.reference):
        if model is None:
            continue
        for module in model.modules():
            if type(module).__name__ in blocks:
                sharded.append(fully_shard(module))
    sharded.append(fully_shard(loss))
    for module in sharded:
        # sum over ranks (each rank's loss is already globally normalized), with plain SUM
        # collectives (gloo has no pre-multiplied sum)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (collective), the tensor itself otherwise."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _named_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict's tensors without aliases (tied parameters under their first name), live."""
    keys = module.state_dict(keep_vars=True).keys()
    found = dict(module.named_parameters())  # tied parameters appear once
    found.update(module.named_buffers())
    return {k: found[k] for k in keys if k in found}


def _full_state(module: torch.nn.Module, leader: bool) -> dict[str, torch.Tensor]:
    """CPU copies of the state dict's tensors (aliases dropped), gathered under FSDP."""
    out = {}
    for name, tensor in _named_state(module).items():
        full = _full_tensor(tensor.detach())
        if leader:
            out[name] = full.to("cpu", copy=True)
    return out
