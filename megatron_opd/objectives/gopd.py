"""G-OPD / ExOPD (Generalized On-Policy Distillation; shared/papers/g-opd-exopd.md, Eq. 11-14).

Objective (Eq. 11):  max_theta E_y~pi_theta [ lam * log(pi*/pi_ref)(y) - KL(pi_theta || pi_ref) ].
Its policy gradient (Eq. 14) uses the token advantage

    A_t^{G-OPD} = (lp_s - lp_t) + (lam - 1)(lp_r - lp_t)

with the sign of a quantity to *descend*. We use the advantage to *maximise*, adv_t = -A_t^{G-OPD}:

    adv_t = (lp_t - lp_s) + (lam - 1)(lp_t - lp_r) = lam (lp_t - lp_r) - (lp_s - lp_r)     (stop-grad)

- lam = 1: standard OPD (reverse KL to the teacher); the reference cancels and is never needed.
- 0 < lam < 1: reward interpolation; lam > 1: reward extrapolation (ExOPD; the paper fixes 1.25).
- Reward correction (strong-to-weak): pi_ref = the teacher's pre-RL base model instead of the student's.
- Multi-teacher: each sample's teacher (and optionally its own reference) is chosen by domain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from megatron_opd.checks import require
from megatron_opd.objectives.policy_loss import (
    check_finite,
    check_same_shape,
    masked_mean,
    masked_std,
    policy_gradient_loss,
)

if TYPE_CHECKING:  # the config imports the objectives (their configs live beside their maths)
    from megatron_opd.config import LossTermsConfig


def gopd_advantage(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """adv_t = (lp_t - lp_s) + (lam - 1)(lp_t - lp_r), no grad (`[b, s]`).

    Raises:
        ValueError: lam != 1 without reference log-probs (never silently plain OPD).
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    check_same_shape("student_logprobs", student_logprobs, teacher_logprobs=teacher_logprobs,
                     ref_logprobs=ref_logprobs)
    with torch.no_grad():
        adv = teacher_logprobs - student_logprobs
        if lam != 1.0:
            if ref_logprobs is None:
                raise ValueError(
                    f"lam={lam} needs ref_logprobs (a reference model); lam=1 is plain OPD. "
                    "Configure `reference` (default: the student's initial weights)."
                )
            adv = adv + (lam - 1.0) * (teacher_logprobs - ref_logprobs)
    return adv


def select_per_sample(stacked: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Multi-teacher routing: `stacked` [n_teachers, b, s], `index` [b] -> [b, s] (row i from index[i])."""
    if stacked.dim() != 3 or index.dim() != 1 or stacked.shape[1] != index.shape[0]:
        raise ValueError(f"stacked {tuple(stacked.shape)} must be [n_teachers, b, s] and index "
                         f"{tuple(index.shape)} must be [b]")
    require((index >= 0) & (index < stacked.shape[0]), f"teacher index out of range [0, {stacked.shape[0]})")
    return stacked.gather(0, index.view(1, -1, 1).expand(1, -1, stacked.shape[2]))[0]


def gopd_loss(
    logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    lam: float = 1.0,
    terms: Optional["LossTermsConfig"] = None,
    *,
    ref_logprobs: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: Optional[float] = None,
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    entropy: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict]:
    """G-OPD policy-gradient loss of one micro-batch (to minimise), and its metrics.

    The advantage is built from pi_old (`old_logprobs`, default: `logprobs` detached, i.e. the first
    update on a fresh batch) and applied through the PPO clipped surrogate with rho = pi_theta/pi_old;
    at rho = 1 its gradient is exactly Eq. 14's. Optional: token-level TIS weight
    min(exp(lp_old - lp_rollout), C); KL(student || reference) term; entropy bonus (`terms`: a
    config.LossTermsConfig, None = none of them); an extra `token_mask` (e.g. REOPOLD's token selection)
    that zeroes tokens without changing normalisation.

    Args:
        logprobs: `[b, s]` student log p(y_t), with grad.
        teacher_logprobs / ref_logprobs / old_logprobs / rollout_logprobs: `[b, s]`, no grad.
        mask: `[b, s]` response tokens.
        num_tokens / num_seqs: global counts of the optimizer step (see policy_loss.global_counts).
    """
    check_same_shape("logprobs", logprobs, teacher_logprobs=teacher_logprobs, mask=mask,
                     ref_logprobs=ref_logprobs, old_logprobs=old_logprobs,
                     rollout_logprobs=rollout_logprobs, entropy=entropy, token_mask=token_mask)
    check_finite(mask, logprobs=logprobs, teacher_logprobs=teacher_logprobs, ref_logprobs=ref_logprobs,
                 old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs)
    mask = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    adv = gopd_advantage(old, teacher_logprobs, ref_logprobs, lam)
    loss, metrics = policy_gradient_loss(
        logprobs, old, adv, mask, eps_low, eps_high, terms, dual_clip_c=dual_clip_c,
        rollout_logprobs=rollout_logprobs, ref_logprobs=ref_logprobs, entropy=entropy, token_mask=token_mask,
        num_tokens=num_tokens, num_seqs=num_seqs)

    with torch.no_grad():
        reward = teacher_logprobs - old  # the OPD token reward log(pi*/pi_theta)
        metrics.update({
            "reward/mean": masked_mean(reward, mask),
            "reward/std": masked_std(reward, mask),
            "advantage/mean": masked_mean(adv, mask),
            "advantage/std": masked_std(adv, mask),
            "kl/student_teacher": masked_mean(-reward, mask),  # k1 estimate of KL(s || t)
        })
        if ref_logprobs is not None:
            metrics["kl/student_reference"] = masked_mean(old - ref_logprobs, mask)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return loss, metrics
