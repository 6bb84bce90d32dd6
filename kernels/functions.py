"""The autograd Functions around a back end's `loss_and_grad`, shared by the CPU and Triton paths.

A back end is one function, `loss_and_grad(z, r, rows, out) -> (row_loss, kl)`, that computes
the loss terms of [N, V] logits and writes dL/dz into `out` in the same pass (the weights of the
loss are known in the forward pass, so there is nothing to recompute later: see
notes/kernels-prior-art.md). Backward only scales the stored gradients by grad_output.

- `TokenLoss`: from logits. The only [N, V] allocation is the gradient that the API implies.
- `FusedLinearTokenLoss`: from hidden states and lm_head weights. Positions go in chunks of C:
  logits of a chunk (C, V) = hidden_c W^T, the back end overwrites them in place with their
  gradient, which is consumed at once: grad_hidden_c = g W, grad_W += g^T hidden_c in fp32.
  Peak extra memory is two [C, V] logits chunks (policy, reference) plus the back end's own
  chunk buffers, and grad_W in fp32; all [N, V] logits never exist.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kernels.rows import Rows

LossAndGrad = Callable[[Tensor, Tensor, Rows, Tensor], tuple[Tensor, Tensor]]


def _total(row_loss: Tensor, kl: Tensor, rows: Rows) -> Tensor:
    """(1/R) sum l + sum_t (beta/T) [t in mask] KL_t, with the normalizers folded into rows."""
    return row_loss.sum() * rows.inv_rows + (kl * rows.kl_weight.to(kl.dtype)).sum()


def _scaled(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    """grad * grad_output, skipping the [N, V]-sized multiply in the usual case grad_output = 1."""
    if grad is None or bool(grad_output == 1):
        return grad
    return grad * grad_output.to(grad.dtype)


class TokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, ref_logits: Tensor, rows: Rows, loss_and_grad: LossAndGrad):
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, V)
        row_loss, kl = loss_and_grad(logits.detach(), ref_logits.detach(), rows, grad)
        ctx.grads = [grad]
        row_loss = rows.unsort(row_loss)
        ctx.mark_non_differentiable(row_loss, kl)
        return _total(row_loss, kl, rows), row_loss, kl

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _row_loss: Tensor, _kl: Tensor):
        if not ctx.grads:
            raise RuntimeError("token_loss: backward ran twice; the gradient is handed over, not kept")
        grad = ctx.grads.pop()  # give up our reference so autograd can take the buffer as is
        return _scaled(grad, grad_loss), None, None, None


def _accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b, accumulating in fp32 whatever the dtype of a and b.

    On CUDA, bf16/fp16 operands go straight into cuBLAS with an fp32 output (addmm's out_dtype,
    torch >= 2.8); elsewhere, or if that overload is refused, the operands are upcast first
    ([C, V] and [C, H] temporaries, the chunk's size).
    """
    if a.dtype != acc.dtype and acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class FusedLinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        ref_hidden: Tensor,
        ref_weight: Tensor,
        rows: Rows,
        chunk_size: int,
        loss_and_grad: LossAndGrad,
    ):
        n = hidden.shape[0]
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (N, H)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        row_loss = torch.empty(rows.num_rows, dtype=acc_dtype, device=hidden.device)
        kl = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        hidden, weight = hidden.detach(), weight.detach()
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            h = hidden[start:end]  # (C, H)
            z = h @ weight.T  # (C, V), becomes dL/dz in place
            r = ref_hidden[start:end].detach() @ ref_weight.detach().T  # (C, V)
            sub = rows.slice(start, end)
            a, b = rows.offsets_cpu[start], rows.offsets_cpu[end]
            row_loss[a:b], kl[start:end] = loss_and_grad(z, r, sub, z)
            del r
            if grad_hidden is not None:
                torch.mm(z, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                _accumulate_fp32(grad_weight, z.T, h)
            del z
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.grads = [(grad_hidden, grad_weight)]
        row_loss = rows.unsort(row_loss)
        ctx.mark_non_differentiable(row_loss, kl)
        return _total(row_loss, kl, rows), row_loss, kl

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _row_loss: Tensor, _kl: Tensor):
        if not ctx.grads:
            raise RuntimeError("fused_linear_token_loss: backward ran twice; the gradients are handed over, not kept")
        grad_hidden, grad_weight = ctx.grads.pop()
        return _scaled(grad_hidden, grad_loss), _scaled(grad_weight, grad_loss), None, None, None, None, None
