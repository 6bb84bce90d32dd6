"""The loss in plain PyTorch: the specification the other back ends are tested against.

Written to be obviously right, not fast: it materializes log-softmax of both [N, V] logits and lets
autograd differentiate. Tests run it in float64. Semantics (docs/design.md, "The loss"):

    L = (1/R) sum_rows l(w, p) + beta (1/T) sum_{t in kl_mask} KL_t
    KL_t = sum_v pi(v|t) (log pi(v|t) - log pi_ref(v|t))

with l per variant: likelihood -w log p; unlikelihood -w log p for w >= 0 and -|w| log(1 - p)
for w < 0; pg_clip -min(rho w, clip(rho, 1 - eps, 1 + eps) w), rho = exp(log p - mu), falling
back to likelihood where mu is NaN or not given. A row with w = 0 contributes exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def row_losses(
    logits: Tensor,
    row_index: Tensor,
    targets: Tensor,
    weights: Tensor,
    variant: str,
    behavior_logprobs: Tensor | None,
    clip_eps: float,
) -> Tensor:
    """Per-row loss l (R,), differentiable in logits."""
    z = logits[row_index.long()]  # (R, V)
    y = targets.long()[:, None]  # (R, 1)
    w = weights.to(z.dtype)  # (R,)
    lse = torch.logsumexp(z, dim=-1)  # (R,)
    logp = z.gather(1, y)[:, 0] - lse  # (R,) log p_y
    # log(1 - p_y) = lse(others) - lse(all), no cancellation when p_y is near 1
    log1mp = torch.logsumexp(z.scatter(1, y, float("-inf")), dim=-1) - lse  # (R,)
    if variant == "likelihood":
        loss = -w * logp
    elif variant == "unlikelihood":
        loss = torch.where(w >= 0, -w * logp, w * log1mp)  # w * log1mp = -|w| log(1 - p) for w < 0
    elif variant == "pg_clip":
        loss = -w * logp
        if behavior_logprobs is not None:
            mu = behavior_logprobs.to(z.dtype)
            known = ~torch.isnan(mu)
            rho = torch.exp(logp - torch.where(known, mu, 0.0))
            clipped = -torch.minimum(rho * w, rho.clamp(1 - clip_eps, 1 + clip_eps) * w)
            loss = torch.where(known, clipped, loss)
    else:
        raise ValueError(f"variant: unknown {variant!r}")
    return torch.where(w == 0, 0.0, loss)


def kl_per_position(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(pi || pi_ref) per position (N,), differentiable in logits only."""
    logp = F.log_softmax(logits, dim=-1)  # (N, V)
    logq = F.log_softmax(ref_logits.detach().to(logits.dtype), dim=-1)  # (N, V)
    p = logp.exp()  # (N, V)
    # entries with p = 0 (masked logits) contribute 0, also where both logits are -inf
    diff = torch.where(p > 0, logp - logq, 0.0)  # (N, V)
    return (p * diff).sum(-1)


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
):
    """The loss from [N, V] logits; see the module docstring."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # low-precision inputs are computed in fp32
    rows = row_losses(logits, row_index, targets, weights, variant, behavior_logprobs, clip_eps)  # (R,)
    kl = kl_per_position(logits, ref_logits)  # (N,)
    if kl_mask is None:
        kl_mask = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    num_rows, num_kl = rows.numel(), int(kl_mask.sum())
    loss = rows.sum() / max(num_rows, 1) + beta * torch.where(kl_mask, kl, 0.0).sum() / max(num_kl, 1)
    if return_details:
        return loss, rows.detach(), kl.detach()
    return loss


def fused_linear_token_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    ref_hidden: Tensor,
    ref_lm_head_weight: Tensor,
    row_index: Tensor,
    targets: Tensor,
    weights: Tensor,
    *,
    chunk_size: int | None = None,
    **kwargs,
):
    """The loss from hidden states and lm_head weights: logits materialized, then token_loss.

    chunk_size is accepted for a uniform signature and ignored: the reference never chunks.
    """
    logits = hidden @ lm_head_weight.T  # (N, V)
    with torch.no_grad():
        ref_logits = ref_hidden @ ref_lm_head_weight.T  # (N, V)
    return token_loss(logits, ref_logits, row_index, targets, weights, **kwargs)
