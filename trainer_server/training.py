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

Precision, LoRA and FSDP (trainer_server/model.py): the forward to the loss is `Prepared.loss`, a
module (the FSDP root when sharded). Under FSDP gradients are reduce-scattered (summed) by FSDP
itself instead of the flat all-reduce below, and every rank runs the same number of micro-batches
(a rank with fewer runs zero-weight ones), because FSDP's collectives run in every forward and
backward.

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
from trainer_server.model import ModelMode, Prepared, prepare
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


class PolicyTrainer:
    """The trainable policy, the frozen reference and the optimizer; `step` is collective."""

    def __init__(
        self,
        model: torch.nn.Module | Prepared,
        reference: torch.nn.Module | None,
        collective: Collective,
        *,
        learning_rate: float,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        micro_batch_size: int = 0,
        pad_id: int = 0,
    ):
        from kernels import fused_linear_token_loss  # imported here so config/store users need no kernels

        # model: a Prepared one (trainer_server/model.py), or a plain model trained in fp32 against `reference`
        self.prepared = model if isinstance(model, Prepared) else prepare(model, ModelMode(), reference)
        check_supported(self.prepared.policy)
        self.loss_fn = fused_linear_token_loss
        self.model = self.prepared.policy  # in eval mode: dropout off (module docstring)
        self.reference = self.prepared.reference  # None under LoRA (the policy with adapters off)
        self.collective = collective
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.device = next(self.model.parameters()).device
        self.params = self.prepared.parameters()  # tied weights appear once
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
        padding = self._fsdp_padding(batch, len(parts))

        self.optimizer.zero_grad(set_to_none=False)
        # sums over this rank's parts: kernel loss, sum of per-row terms, sum of KL, sum |w|, tokens
        stats = torch.zeros(5, dtype=torch.float64)
        for part in parts:
            stats += self._forward_backward(part, params, total_rows, total_positions)
        for _ in range(padding):
            self._forward_backward(batch[:1], params, total_rows, total_positions, zero=True)
        self.collective.all_reduce_(stats)
        loss, token_sum, kl_sum, abs_weight_sum, tokens = stats.tolist()
        if self.prepared.mode.fsdp:
            grad_norm = self._sharded_grad_norm()
        else:
            grads = self._all_reduce_grads()
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
                          total_positions: int, zero: bool = False) -> torch.Tensor:
        """Loss of one micro-batch, normalized globally (module docstring); backward into .grad.
        Returns [kernel loss, sum of row terms, sum of KL, sum |w|, tokens]. zero: an FSDP padding
        part, weights and beta 0 (it adds nothing to the gradients; its statistics are dropped)."""
        inputs = pack(part, self.pad_id, self.device)
        rows, positions = inputs.row_index.numel(), inputs.gather.numel()  # R_m, T_m
        row_scale, kl_scale = (0.0, 0.0) if zero else (rows / total_rows, positions / total_positions)
        loss, row_losses, kl = self.prepared.loss(
            inputs.ids, inputs.mask, inputs.gather, inputs.row_index, inputs.targets, inputs.weights * row_scale,
            inputs.behavior, beta=params.beta * kl_scale, variant=params.variant, clip_eps=params.clip_eps,
            loss_fn=self.loss_fn,
        )
        if torch.isfinite(loss) or self.prepared.mode.fsdp:  # FSDP: every rank runs every backward
            loss.backward()
        if zero:
            return torch.zeros(5, dtype=torch.float64)
        # row_losses carry the scaled weights: divide the scale back out for the reported term
        token_sum = row_losses.detach().double().sum() / row_scale
        return torch.stack([
            loss.detach().double().reshape(()),
            token_sum,
            kl.detach().double().sum(),
            inputs.weights.abs().double().sum(),
            torch.tensor(float(inputs.mask.sum()), dtype=torch.float64),
        ]).cpu()

    def _fsdp_padding(self, batch: Sequence[Example], parts: int) -> int:
        """Under FSDP: how many zero-weight micro-batches this rank adds so that every rank runs as
        many as the busiest one (each rank works out every rank's count from the same batch)."""
        if not self.prepared.mode.fsdp:
            return 0
        counts = [len(self._micro_batches(list(batch[self.collective.shard(len(batch), rank)])))
                   for rank in range(self.collective.world_size)]
        return max(counts) - parts

    def _sharded_grad_norm(self) -> float:
        """The global gradient norm from FSDP's gradient shards (summed over ranks)."""
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.params:
            if p.grad is not None:
                squares += p.grad.to_local().double().pow(2).sum().to(self.device)
        if self.collective.active:
            self.collective.all_reduce_(squares)
        return float(squares.sqrt().item())

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
