"""Fused per-token weighted likelihood + KL loss (docs/design.md, "The loss" and "Kernels").

Two entry points with the same semantics:

    loss = token_loss(logits, ref_logits, row_index, targets, weights, beta=0.1)
    loss = fused_linear_token_loss(hidden, lm_head_weight, ref_hidden, ref_lm_head_weight,
                                   row_index, targets, weights, beta=0.1)

L = (1/R) sum_rows l(w, p) + beta (1/T) sum_{t in kl_mask} KL(pi_t || pi_ref_t); gradients flow
into the policy inputs only. Three back ends agree: "reference" (plain PyTorch, the
specification), "cpu" (chunked PyTorch) and "triton" (CUDA; CPU tensors under
TRITON_INTERPRET=1). backend=None picks triton for CUDA tensors and cpu otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import cpu, reference
from kernels.functions import FusedLinearTokenLoss, TokenLoss
from kernels.rows import VARIANTS, Rows, check_args, prepare_rows

__all__ = ["token_loss", "fused_linear_token_loss", "VARIANTS", "BACKENDS"]

BACKENDS = ("reference", "cpu", "triton")


def _pick_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return "triton" if device.type == "cuda" else "cpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and device.type != "cuda":
        from kernels import triton_loss  # imported on first use: CPU-only callers never load Triton

        if not triton_loss.INTERPRETED:
            raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return backend


def _loss_and_grad(backend: str):
    if backend == "triton":
        from kernels import triton_loss

        return triton_loss.loss_and_grad
    return cpu.loss_and_grad


def _check_matrix(name: str, t: Tensor, shape: tuple[int, ...] | None = None) -> None:
    if t.dim() != 2 or not t.dtype.is_floating_point:
        raise ValueError(f"{name}: must be a 2-D floating-point tensor, got {t.dtype} {list(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}: must have shape {list(shape)}, got {list(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: must not be empty, got {list(t.shape)}")


def _rows(n: int, vocab: int, device: torch.device, row_index, targets, weights, options: dict) -> Rows:
    check_args(n, vocab, device, row_index, targets, weights, **options)
    return prepare_rows(n, row_index, targets, weights, **options)


def token_loss(
    logits: Tensor,
    ref_logits: Tensor,
    row_index: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    beta: float,
    variant: str = "unlikelihood",
    behavior_logprobs: Tensor | None = None,
    clip_eps: float = 0.2,
    kl_mask: Tensor | None = None,
    return_details: bool = False,
    backend: str | None = None,
):
    """Loss from policy logits [N, V] and reference logits [N, V], differentiable in logits only.

    row_index, targets, weights, behavior_logprobs: [R], rows may share a position. kl_mask: [N]
    bool, positions whose KL counts (default all). Returns the scalar loss, or with
    return_details=True (loss, row_losses [R], kl [N]), the last two detached (logging).
    """
    _check_matrix("logits", logits)
    _check_matrix("ref_logits", ref_logits, tuple(logits.shape))
    if ref_logits.device != logits.device:
        raise ValueError(f"ref_logits: must be on {logits.device} like logits, got {ref_logits.device}")
    options = dict(beta=beta, variant=variant, behavior_logprobs=behavior_logprobs, clip_eps=clip_eps, kl_mask=kl_mask)
    backend = _pick_backend(backend, logits.device)
    n, vocab = logits.shape
    rows = _rows(n, vocab, logits.device, row_index, targets, weights, options)
    if backend == "reference":
        return reference.token_loss(
            logits, ref_logits, row_index, targets, weights, return_details=return_details, **options
        )
    logits_c = logits if logits.stride(-1) == 1 else logits.contiguous()
    ref_c = ref_logits if ref_logits.stride(-1) == 1 else ref_logits.contiguous()
    loss, row_losses, kl = TokenLoss.apply(logits_c, ref_c, rows, _loss_and_grad(backend))
    return (loss, row_losses, kl) if return_details else loss


def default_chunk_size(n: int, vocab: int, hidden: int, device: torch.device, itemsize: int) -> int:
    """Positions per chunk of the fused-linear path.

    On CUDA, 1024 positions (fewer when a [C, V] chunk would pass 256 MiB, at least 64): the
    grad_W GEMM has K = C, and each chunk reads and writes all of grad_W in fp32, so chunks much
    smaller than 1024 make the head's gradient memory-bound. On CPU, equal chunks of at most 512 MiB of fp32
    logits (`kernels.cpu.default_chunk_size`).
    """
    if device.type == "cuda":
        c = max(64, min(1024, (256 * 2**20) // (vocab * itemsize)))
        return min(n, 1 << (c.bit_length() - 1))
    return cpu.default_chunk_size(n, vocab)


def fused_linear_token_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    ref_hidden: Tensor,
    ref_lm_head_weight: Tensor,
    row_index: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    beta: float,
    variant: str = "unlikelihood",
    behavior_logprobs: Tensor | None = None,
    clip_eps: float = 0.2,
    kl_mask: Tensor | None = None,
    chunk_size: int | None = None,
    return_details: bool = False,
    backend: str | None = None,
):
    """Loss from hidden states [N, H] and lm_head weights [V, H] (policy and reference).

    Differentiable in hidden and lm_head_weight; never holds all [N, V] logits (chunks of
    chunk_size positions, default from `default_chunk_size`). Same rows, options and return
    values as `token_loss`.
    """
    _check_matrix("hidden", hidden)
    n, width = hidden.shape
    _check_matrix("lm_head_weight", lm_head_weight)
    vocab = lm_head_weight.shape[0]
    _check_matrix("lm_head_weight", lm_head_weight, (vocab, width))
    _check_matrix("ref_hidden", ref_hidden)
    _check_matrix("ref_lm_head_weight", ref_lm_head_weight, (vocab, ref_hidden.shape[1]))
    if ref_hidden.shape[0] != n:
        raise ValueError(f"ref_hidden: must have N = {n} rows like hidden, got {list(ref_hidden.shape)}")
    for name, t in (("lm_head_weight", lm_head_weight), ("ref_hidden", ref_hidden), ("ref_lm_head_weight", ref_lm_head_weight)):
        if t.device != hidden.device:
            raise ValueError(f"{name}: must be on {hidden.device} like hidden, got {t.device}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    options = dict(beta=beta, variant=variant, behavior_logprobs=behavior_logprobs, clip_eps=clip_eps, kl_mask=kl_mask)
    backend = _pick_backend(backend, hidden.device)
    rows = _rows(n, vocab, hidden.device, row_index, targets, weights, options)
    if backend == "reference":
        return reference.fused_linear_token_loss(
            hidden, lm_head_weight, ref_hidden, ref_lm_head_weight, row_index, targets, weights,
            return_details=return_details, **options,
        )  # fmt: skip
    chunk = chunk_size or default_chunk_size(n, vocab, width, hidden.device, hidden.element_size())
    loss, row_losses, kl = FusedLinearTokenLoss.apply(
        hidden, lm_head_weight, ref_hidden, ref_lm_head_weight, rows, chunk, _loss_and_grad(backend)
    )
    return (loss, row_losses, kl) if return_details else loss
