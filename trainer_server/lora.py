"""LoRA adapters on a frozen base, with PEFT, and what of them is published and checkpointed.

`add_adapters` injects LoRA layers into the loaded Hugging Face model in place (PEFT's
get_peft_model): the base weights are frozen, only the adapters' A and B train. The reference
model of the KL term is the same model with the adapters switched off (`PeftModel.disable_adapter`),
so no second copy of the weights exists (docs/design.md, "The loss").

`adapter_factors` turns the adapters into the wire format of common/adapters.py: per adapted
weight W (S0, S1) of the plain model, up (S0, r) and down (r, S1) with W + up @ down the adapted
weight. PEFT computes a Linear layer's output as x W^T + s x A^T B^T (A: (r, in), B: (out, r),
s = alpha / r), i.e. W + s B A; GPT-2's Conv1D stores W as (in, out) (PEFT's fan_in_fan_out), so
there the delta is (s B A)^T = A^T (s B^T).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

ADAPTER = "default"  # the PEFT adapter name; the trainer trains one adapter


def add_adapters(model: torch.nn.Module, rank: int, alpha: float, targets: tuple[str, ...]):
    """Wrap `model` (changed in place) with LoRA adapters; returns the PeftModel.
    targets: module name suffixes (e.g. "c_attn", "q_proj"); empty: PEFT's default for the
    architecture. Refuses targets that would adapt the output head (the fused loss multiplies the
    head's own weight) or anything that is not a linear layer."""
    from peft import LoraConfig, get_peft_model

    head = model.get_output_embeddings()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets) if targets else None,
        lora_dropout=0.0,  # dropout stays off while training (trainer_server/training.py)
        bias="none",
        fan_in_fan_out=_uses_conv1d(model),
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # PEFT names the targets it found no module for
        raise ValueError(f"--lora-targets {','.join(targets) or '(default)'}: {exc}") from None
    for name, module in adapted_layers(peft_model):
        if module.get_base_layer() is head:
            raise ValueError(f"--lora-targets: {name} is the output head, which the fused loss needs unadapted")
    return peft_model


def _uses_conv1d(model: torch.nn.Module) -> bool:
    """GPT-2-style models keep their projections in transformers' Conv1D ((in, out) weights)."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def adapted_layers(peft_model) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name in the plain model, LoRA layer) for every adapted layer, in module order."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


def adapter_parameters(peft_model) -> dict[str, torch.nn.Parameter]:
    """The trainable tensors, by their name in the plain model (what checkpoints hold)."""
    return {name: p for name, p in peft_model.get_base_model().named_parameters() if p.requires_grad}


def adapter_factors(peft_model, full_tensor=lambda t: t) -> dict[str, torch.Tensor]:
    """{"<weight>.lora_up": (S0, r), "<weight>.lora_down": (r, S1)} on the CPU in fp32, for every
    adapted weight (common/adapters.py). `full_tensor` gathers a sharded tensor (FSDP)."""
    from common.adapters import factor_names

    out = {}
    with torch.no_grad():
        for name, module in adapted_layers(peft_model):
            a = full_tensor(module.lora_A[ADAPTER].weight).detach().float().cpu()  # (r, in)
            b = full_tensor(module.lora_B[ADAPTER].weight).detach().float().cpu()  # (out, r)
            scale = float(module.scaling[ADAPTER])
            if module.fan_in_fan_out:  # W is (in, out): delta = A^T (s B^T)
                up, down = a.T.contiguous(), (scale * b.T).contiguous()  # (in, r), (r, out)
            else:  # W is (out, in): delta = (s B) A
                up, down = (scale * b).contiguous(), a.contiguous()  # (out, r), (r, in)
            up_name, down_name = factor_names(name + ".weight")
            out[up_name], out[down_name] = up, down
    return out
