"""REOPOLD: relaxed on-policy distillation (shared/papers/reopold-abstract.md; reconstructed in
shared/ALGORITHMS.md §2 — its full text is not public, so every piece here is switchable).

Token reward r_t = lp_t - lp_s (stop-grad), used as a policy-gradient advantage with the PPO ratio
against pi_old. Three relaxations:

1. Mixture-based reward clipping: r_t <- max(r_t, log(m / (1 - m))) — a floor on the heavy negative
   tail (tokens the teacher finds very unlikely). m = 0.2 gives a floor of -1.386.
2. Entropy-based token-level dynamic sampling: only tokens whose *student* entropy is in the top beta
   fraction of the batch's response tokens contribute.
3. Exploration -> refinement: before `switch_step` tokens are selected by reward magnitude |r_t|
   (the most informative corrections); from `switch_step` on, by entropy.

Selected-out tokens contribute zero loss but the normaliser stays the step's global token count, so
the selection scales the step like dynamic sampling does rather than re-weighting the kept tokens.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.objectives.policy_loss import (
    aggregate_loss,
    check_finite,
    check_same_shape,
    clipped_surrogate,
    masked_mean,
    masked_std,
    truncated_is_weights,
)

PHASES = ("exploration", "refinement")


def reward_floor(mixture: float) -> float:
    """log(m / (1 - m)): the clipping floor for mixture weight m in (0, 1)."""
    if not 0 < mixture < 1:
        raise ValueError(f"reward_clip_mixture must be in (0, 1), got {mixture}")
    return math.log(mixture / (1.0 - mixture))


def clipped_reward(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mixture: Optional[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """r = lp_t - lp_s (no grad), floored at log(m/(1-m)) when `mixture` is set.

    Returns:
        (reward [b, s], clipped [b, s] bool — where the floor was applied).
    """
    check_same_shape("student_logprobs", student_logprobs, teacher_logprobs=teacher_logprobs)
    with torch.no_grad():
        r = teacher_logprobs - student_logprobs
        if mixture is None:
            return r, torch.zeros_like(r, dtype=torch.bool)
        floor = reward_floor(mixture)
        return r.clamp(min=floor), r < floor


def top_fraction_mask(
    score: torch.Tensor, mask: torch.Tensor, beta: float, group=None
) -> torch.Tensor:
    """Keep the tokens whose `score` is in the top `beta` fraction of the valid tokens.

    Locally (no group) exactly ceil(beta * N) tokens are kept, ties broken by position. Over a
    data-parallel `group` the scores are all-gathered, the ceil(beta * N_global)-th largest becomes the
    threshold, and every token at or above it is kept (ties may keep a few more).

    Args:
        score: `[b, s]` e.g. student entropy.
        mask: `[b, s]` response tokens.
        beta: fraction in (0, 1].
    """
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    check_same_shape("score", score, mask=mask)
    valid = mask.bool()
    vals = score.detach()[valid].float()
    keep = torch.zeros_like(valid)
    distributed = group is not None and dist.is_initialized() and dist.get_world_size(group) > 1
    if not distributed:
        k = math.ceil(beta * vals.numel())
        if k == 0:
            return keep
        idx = torch.topk(vals, k, sorted=False).indices
        flat = torch.zeros(vals.numel(), dtype=torch.bool, device=vals.device)
        flat[idx] = True
        keep[valid] = flat
        return keep
    from megatron_opd.platform import collective_device

    dev = collective_device(group)  # NCCL groups take accelerator tensors, gloo groups host tensors
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([vals.numel()], device=dev), group=group)
    n_max = max(int(s) for s in sizes)
    padded = torch.full((n_max,), float("-inf"), device=dev)
    padded[: vals.numel()] = vals.to(dev)
    gathered = [torch.empty(n_max, device=dev) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    everything = torch.cat(gathered).to(vals.device)
    n_total = sum(int(s) for s in sizes)
    k = math.ceil(beta * n_total)
    if k == 0:
        return keep
    threshold = torch.topk(everything, k).values[-1]
    keep[valid] = vals >= threshold
    return keep


def phase(step: int, switch_step: Optional[int]) -> str:
    """"exploration" before `switch_step`, "refinement" from it on (always refinement when None)."""
    return "exploration" if switch_step is not None and step < switch_step else "refinement"


def reopold_loss(
    logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    step: int = 0,
    old_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    reward_clip_mixture: Optional[float] = 0.2,
    entropy_top_beta: Optional[float] = 0.5,
    switch_step: Optional[int] = None,
    token_select_mask: Optional[torch.Tensor] = None,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    tis_cap: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    group=None,
) -> tuple[torch.Tensor, dict]:
    """REOPOLD loss of one micro-batch (to minimise) and its metrics.

    Token selection needs the whole batch: pass `token_select_mask` computed by the caller over all
    micro-batches (see `select_tokens`), or let this function select within the micro-batch.

    Args:
        entropy: `[b, s]` student entropy (pi_old's; no grad) — needed for refinement selection.
    """
    check_same_shape("logprobs", logprobs, teacher_logprobs=teacher_logprobs, mask=mask,
                     old_logprobs=old_logprobs, entropy=entropy, rollout_logprobs=rollout_logprobs,
                     token_select_mask=token_select_mask)
    check_finite(mask, logprobs=logprobs, teacher_logprobs=teacher_logprobs, old_logprobs=old_logprobs)
    mask = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    reward, clipped = clipped_reward(old, teacher_logprobs, reward_clip_mixture)
    current = phase(step, switch_step)
    if token_select_mask is None:
        token_select_mask = select_tokens(reward, entropy, mask, entropy_top_beta, current, group)
    keep = token_select_mask.to(mask.dtype) * mask
    per_token, metrics = clipped_surrogate(logprobs, old, reward, mask, eps_low, eps_high)
    if tis_cap is not None and rollout_logprobs is not None:
        per_token = per_token * truncated_is_weights(old, rollout_logprobs, tis_cap)
    loss = aggregate_loss(per_token * keep, mask, loss_agg_mode, num_tokens, num_seqs)
    with torch.no_grad():
        metrics.update({
            "reward/mean": masked_mean(reward, mask).item(),
            "reward/std": masked_std(reward, mask).item(),
            "kl/student_teacher": masked_mean(old - teacher_logprobs, mask).item(),
            "reopold/fraction_clipped": masked_mean(clipped.to(mask.dtype), mask).item(),
            "reopold/fraction_kept": float(keep.sum()) / max(float(mask.sum()), 1.0),
            "reopold/phase": float(current == "refinement"),
        })
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy, mask).item()
    return loss, metrics


def select_tokens(
    reward: torch.Tensor,
    entropy: Optional[torch.Tensor],
    mask: torch.Tensor,
    beta: Optional[float],
    current_phase: str,
    group=None,
) -> torch.Tensor:
    """Token selection of the current phase: top-beta by |reward| (exploration) or by entropy
    (refinement); all response tokens when beta is None."""
    if current_phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {current_phase!r}")
    if beta is None:
        return mask.bool()
    if current_phase == "exploration":
        return top_fraction_mask(reward.abs(), mask, beta, group)
    if entropy is None:
        raise ValueError("entropy is required for entropy-based token selection (refinement phase)")
    return top_fraction_mask(entropy, mask, beta, group)
