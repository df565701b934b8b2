"""GRPO (the papers' RL baseline): outcome rewards from the verifier, advantages normalised within each
prompt's group of G samples, the shared clipped policy loss.

    A_i = (R_i - mean_{j in g(i)} R_j) / (std_{j in g(i)} R_j + eps)      (every token of sample i)

`normalize_std=False` keeps the mean-centring only (Dr. GRPO). A group whose rewards are all equal
gets zero advantage: it carries no learning signal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from megatron_opd.objectives.policy_loss import check_finite, check_same_shape, masked_mean, policy_gradient_loss

if TYPE_CHECKING:  # the config imports the objectives (their configs live beside their maths)
    from megatron_opd.config import LossTermsConfig


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages `[N]` from outcome rewards `[N]` and group ids `[N]` (any order)."""
    if rewards.dim() != 1 or groups.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must be equal 1-D")
    r = rewards.double()
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    total = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, r)
    mean = total / counts
    centred = r - mean[inverse]
    if not normalize_std:
        return centred.float()
    var = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, centred**2) / counts
    return (centred / (var.sqrt()[inverse] + eps)).float()


def grpo_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    terms: Optional["LossTermsConfig"] = None,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: Optional[float] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    """GRPO loss of one micro-batch (to minimise): `advantages` `[b]` per sample, the rest `[b, s]`;
    `terms` a config.LossTermsConfig (TIS, KL term, entropy bonus, aggregation), None = none of them."""
    check_same_shape("logprobs", logprobs, mask=mask, old_logprobs=old_logprobs,
                     rollout_logprobs=rollout_logprobs, ref_logprobs=ref_logprobs, entropy=entropy)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({logprobs.shape[0]},)")
    check_finite(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    mask = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    adv = advantages.to(logprobs.dtype).view(-1, 1).expand_as(logprobs)
    loss, metrics = policy_gradient_loss(
        logprobs, old, adv, mask, eps_low, eps_high, terms, dual_clip_c=dual_clip_c,
        rollout_logprobs=rollout_logprobs, ref_logprobs=ref_logprobs, entropy=entropy, num_tokens=num_tokens,
        num_seqs=num_seqs)
    with torch.no_grad():
        metrics["advantage/mean"] = masked_mean(adv, mask)
        metrics["advantage/std"] = masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt()
        if ref_logprobs is not None:
            metrics["kl/student_reference"] = masked_mean(old - ref_logprobs, mask)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return loss, metrics
