"""One optimizer step of the token-level loss: the policy, the frozen reference, the fused kernel.

The loss is docs/design.md's ("The loss", normative), computed by `kernels.fused_linear_token_loss` from the
policy's last hidden states (the input of lm_head, i.e. after the final layer norm) and lm_head
weight against the frozen reference's:

    L = (1/R) sum_rows l(w, p)  +  beta (1/T) sum_t KL_t,

rows from the annotations, KL at every completion position t of the batch (never the prompt).
Only completion positions are gathered from the hidden states, so the kernel's N positions are
exactly the T completion positions and no kl_mask is needed.

Splitting a batch (data-parallel ranks, micro-batches) must not change L. The kernel normalizes
by the rows R_m and positions T_m it sees, so each part m is called with weights scaled by
R_m / R and beta scaled by T_m / T: every per-row term is positively homogeneous in its weight
(-w log p, -|w| log(1 - p), -min(rho w, clip(rho) w)), hence part m contributes exactly
(1/R) sum_{rows in m} l + beta (1/T) sum_{t in m} KL_t, and the parts' gradients are summed.

Dropout stays off (eval mode) while training: the KL and the per-token terms are then exact
functions of the weights, and data-parallel ranks agree with a single process.

Tied embeddings (GPT-2: lm_head.weight is transformer.wte.weight): the kernel's gradient for the
lm_head weight is accumulated by autograd into the same Parameter as the embedding's gradient,
because the very Parameter object is passed to the kernel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer_server.distributed import Collective
from trainer_server.rows import Example


@dataclass(frozen=True)
class StepParams:
    """What rank 0 decides for a step and sends with the batch."""

    variant: str
    beta: float
    learning_rate: float
    clip_eps: float = 0.2
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class StepResult:
    loss: float  # token_loss + beta * kl (the kernel's scalar, summed over parts)
    token_loss: float  # (1/R) sum_rows l
    kl: float  # (1/T) sum_t KL_t, mean KL per completion position
    mean_abs_weight: float
    rows: int  # R
    sequences: int
    completion_tokens: int  # T
    tokens: int  # prompt + completion tokens processed (what tokens/s counts)
    grad_norm: float
    skipped: bool  # the loss or the gradient was not finite: nothing was applied
    seconds: float


def output_head(model: torch.nn.Module) -> torch.nn.Parameter:
    """The lm_head weight [V, H] the kernel multiplies the last hidden states with."""
    head = model.get_output_embeddings()
    assert head is not None and hasattr(head, "weight"), f"{type(model).__name__} has no output embeddings"
    return head.weight


def check_supported(model: torch.nn.Module) -> None:
    """The fused loss assumes logits = hidden @ W^T exactly; refuse models that do more."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: lm_head has a bias, which the fused loss does not take")
    config = model.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__}: config.{name} = {value} changes the logits; not supported")


def last_hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The input of lm_head (final layer norm applied): the base model's last hidden state."""
    return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)


class PolicyTrainer:
    """The trainable policy, the frozen reference and the optimizer; `step` is collective."""

    def __init__(
        self,
        model: torch.nn.Module,
        reference: torch.nn.Module,
        collective: Collective,
        *,
        learning_rate: float,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        micro_batch_size: int = 0,
        pad_id: int = 0,
    ):
        from kernels import fused_linear_token_loss  # imported here so config/store users need no kernels

        check_supported(model)
        self.loss_fn = fused_linear_token_loss
        self.model = model.eval()  # eval: dropout off (module docstring)
        self.reference = reference.eval().requires_grad_(False)
        self.collective = collective
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
        if optimizer == "adamw":
            # fused: one kernel over all tensors; on the CPU about 7x faster than the per-tensor loop
            self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay, fused=True)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=learning_rate, weight_decay=weight_decay)
        else:
            raise ValueError(f"optimizer: must be adamw or sgd, got {optimizer!r}")

    # ---- one step ----

    def step(self, batch: Sequence[Example], params: StepParams) -> StepResult:
        """Forward + backward on this rank's shard, all-reduce, then one optimizer step unless the loss
        or the gradient is not finite. Every rank calls it with the same batch and params."""
        start = time.perf_counter()
        total_rows = sum(len(e.rows) for e in batch)  # R
        total_positions = sum(len(e.completion_ids) for e in batch)  # T
        assert total_rows > 0 and total_positions > 0, f"empty batch: {len(batch)} sequences, {total_rows} rows"
        shard = list(batch[self.collective.shard(len(batch))])
        parts = self._micro_batches(shard)

        self.optimizer.zero_grad(set_to_none=False)
        # sums over this rank's parts: kernel loss, sum of per-row terms, sum of KL, sum |w|, tokens
        stats = torch.zeros(5, dtype=torch.float64)
        for part in parts:
            stats += self._forward_backward(part, params, total_rows, total_positions)
        grads = self._all_reduce_grads()
        self.collective.all_reduce_(stats)
        loss, token_sum, kl_sum, abs_weight_sum, tokens = stats.tolist()

        grad_norm = float(torch.linalg.vector_norm(grads).item()) if grads.numel() else 0.0
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=False)  # nothing of this step reaches the weights
        else:
            if params.max_grad_norm > 0 and grad_norm > params.max_grad_norm:
                for p in self.params:
                    p.grad.mul_(params.max_grad_norm / (grad_norm + 1e-6))
            for group in self.optimizer.param_groups:
                group["lr"] = params.learning_rate
            self.optimizer.step()
        return StepResult(
            loss=loss,
            token_loss=token_sum / total_rows,
            kl=kl_sum / total_positions,
            mean_abs_weight=abs_weight_sum / total_rows,
            rows=total_rows,
            sequences=len(batch),
            completion_tokens=total_positions,
            tokens=int(tokens),
            grad_norm=grad_norm,
            skipped=skipped,
            seconds=time.perf_counter() - start,
        )

    def _micro_batches(self, shard: list[Example]) -> list[list[Example]]:
        size = self.micro_batch_size or max(1, len(shard))
        return [shard[i : i + size] for i in range(0, len(shard), size)]

    def _forward_backward(self, part: list[Example], params: StepParams, total_rows: int,
                          total_positions: int) -> torch.Tensor:
        """Loss of one micro-batch, normalized globally (module docstring); backward into .grad.
        Returns [kernel loss, sum of row terms, sum of KL, sum |w|, tokens]."""
        inputs = pack(part, self.pad_id, self.device)
        rows, positions = inputs.row_index.numel(), inputs.gather.numel()  # R_m, T_m
        row_scale, kl_scale = rows / total_rows, positions / total_positions
        hidden = last_hidden(self.model, inputs.ids, inputs.mask)  # (B, L, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[inputs.gather]  # (T_m, H)
        with torch.no_grad():
            ref_hidden = last_hidden(self.reference, inputs.ids, inputs.mask)  # (B, L, H)
            ref_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])[inputs.gather]  # (T_m, H)
        loss, row_losses, kl = self.loss_fn(
            hidden,
            output_head(self.model),
            ref_hidden,
            output_head(self.reference),
            inputs.row_index,
            inputs.targets,
            inputs.weights * row_scale,
            beta=params.beta * kl_scale,
            variant=params.variant,
            behavior_logprobs=inputs.behavior if params.variant == "pg_clip" else None,
            clip_eps=params.clip_eps,
            return_details=True,
        )
        if torch.isfinite(loss):
            loss.backward()
        # row_losses carry the scaled weights: divide the scale back out for the reported term
        token_sum = row_losses.detach().double().sum() / row_scale
        return torch.stack([
            loss.detach().double().reshape(()),
            token_sum,
            kl.detach().double().sum(),
            inputs.weights.abs().double().sum(),
            torch.tensor(float(inputs.mask.sum()), dtype=torch.float64),
        ]).cpu()

    def _all_reduce_grads(self) -> torch.Tensor:
        """Sum the gradients over ranks in one flat buffer; returns it (for the norm)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.params])  # (num_params,)
        if self.collective.active:
            self.collective.all_reduce_(flat)
            offset = 0
            for p in self.params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return flat


@dataclass(frozen=True)
class Packed:
    """A micro-batch as tensors: right-padded ids, where the completion positions are, the rows."""

    ids: torch.Tensor  # (B, L) int64
    mask: torch.Tensor  # (B, L) int64, 1 on real tokens
    gather: torch.Tensor  # (T,) index into the flattened (B*L) hidden states: the state predicting
    # completion token t of sequence b sits at b*L + P_b + t - 1 (P_b prompt length)
    row_index: torch.Tensor  # (R,) index into the T gathered positions
    targets: torch.Tensor  # (R,) token ids
    weights: torch.Tensor  # (R,) float32
    behavior: torch.Tensor  # (R,) float32 behavior logprob; NaN where unknown (replacement rows, none given)


def pack(examples: Sequence[Example], pad_id: int, device: torch.device) -> Packed:
    length = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, L)
    gather, row_index, targets, weights, behavior = [], [], [], [], []
    offset = 0  # completion positions of the earlier sequences
    for b, e in enumerate(examples):
        prompt, completion = len(e.prompt_ids), len(e.completion_ids)
        assert prompt >= 1 and completion >= 1, f"sequence {b}: prompt {prompt}, completion {completion} tokens"
        ids[b, : prompt + completion] = torch.tensor(e.prompt_ids + e.completion_ids)
        mask[b, : prompt + completion] = 1
        gather.extend(b * length + prompt - 1 + t for t in range(completion))
        for r in e.rows:
            assert 0 <= r.position < completion, f"row position {r.position} outside completion of {completion}"
            row_index.append(offset + r.position)
            targets.append(r.token_id)
            weights.append(r.weight)
            known = e.behavior_logprobs is not None and not r.replacement
            behavior.append(e.behavior_logprobs[r.position] if known else math.nan)
        offset += completion
    return Packed(
        ids=ids.to(device),
        mask=mask.to(device),
        gather=torch.tensor(gather, dtype=torch.long, device=device),
        row_index=torch.tensor(row_index, dtype=torch.long, device=device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        weights=torch.tensor(weights, dtype=torch.float32, device=device),
        behavior=torch.tensor(behavior, dtype=torch.float32, device=device),
    )
