"""REOPOLD: relaxed on-policy distillation (shared/papers/reopold-abstract.md; reconstructed in
shared/ALGORITHMS.md §2 — its full text is not public, so every piece here is switchable).

Token reward r_t = lp_t - lp_s (stop-grad), used as a policy-gradient advantage with the PPO ratio
against pi_old. Three relaxations:

1. Mixture-based reward clipping: r_t <- max(r_t, floor(m)) — a floor on the heavy negative tail
   (tokens the teacher finds very unlikely). Secondary sources disagree on the floor's form:
   "log_odds" log(m / (1 - m)) (-1.386 at m = 0.2; default) or "log_m_scaled" log(m) / (1 - m)
   (-2.012 at m = 0.2).
2. Entropy-based token-level dynamic sampling: in the refinement phase only tokens whose *student*
   entropy is in the top beta fraction of the batch's response tokens contribute.
3. Exploration -> refinement at `switch_step`. Exploration rule (the secondary sources say phase I
   masks tokens whose reward is below the floor; the other two are kept for ablations):
   "mask_below_floor" drops them, "clamp" raises them to the floor and keeps all tokens,
   "top_abs_reward" keeps the top beta fraction by |clamped reward|.

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
    off_policy_weights,
)

PHASES = ("exploration", "refinement")


FLOOR_FORMS = ("log_odds", "log_m_scaled")
EXPLORATION_RULES = ("mask_below_floor", "clamp", "top_abs_reward")


def reward_floor(mixture: float, form: str = "log_odds") -> float:
    """The clipping floor for mixture weight m in (0, 1): log(m / (1 - m)) ("log_odds") or
    log(m) / (1 - m) ("log_m_scaled")."""
    if not 0 < mixture < 1:
        raise ValueError(f"reward_clip_mixture must be in (0, 1), got {mixture}")
    if form not in FLOOR_FORMS:
        raise ValueError(f"floor form {form!r}: use one of {FLOOR_FORMS}")
    if form == "log_odds":
        return math.log(mixture / (1.0 - mixture))
    return math.log(mixture) / (1.0 - mixture)


def clipped_reward(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mixture: Optional[float],
    form: str = "log_odds",
) -> tuple[torch.Tensor, torch.Tensor]:
    """r = lp_t - lp_s (no grad), floored at reward_floor(m, form) when `mixture` is set.

    Returns:
        (reward [b, s], clipped [b, s] bool — where the floor was applied).
    """
    check_same_shape("student_logprobs", student_logprobs, teacher_logprobs=teacher_logprobs)
    with torch.no_grad():
        r = teacher_logprobs - student_logprobs
        if mixture is None:
            return r, torch.zeros_like(r, dtype=torch.bool)
        floor = reward_floor(mixture, form)
        return r.clamp(min=floor), r < floor


def top_fraction_mask(
    score: torch.Tensor, mask: torch.Tensor, beta: float, group=None
) -> torch.Tensor:
    """Keep the tokens whose `score` is in the top `beta` fraction of the valid tokens: every token at
    or above the ceil(beta * N)-th largest score of all N valid tokens (over a data-parallel `group`:
    all-gathered). Tokens tied with that score are all kept, so the kept set depends on the scores
    alone, never on how the batch is split over replicas (breaking ties by position kept 80 of 100
    tied tokens in one process and all 100 over two replicas).

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
        keep[valid] = vals >= torch.topk(vals, k).values[-1]
        return keep
    dev = vals.device  # the inputs' device is the one the group's backend takes (NCCL: GPU, gloo: host)
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
    token_select_mask: torch.Tensor,
    old_logprobs: Optional[torch.Tensor] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    reward_clip_mixture: Optional[float] = 0.2,
    floor_form: str = "log_odds",
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    tis_cap: Optional[float] = None,
    is_mask: Optional[tuple[float, float]] = None,
    loss_agg_mode: str = "token-mean",
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    """REOPOLD loss of one micro-batch (to minimise) and its metrics.

    Token selection needs the whole batch, so it is the caller's (`select_tokens` over every
    micro-batch and data-parallel rank, before the first update): `token_select_mask` `[b, s]`.
    """
    check_same_shape("logprobs", logprobs, teacher_logprobs=teacher_logprobs, mask=mask,
                     old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs,
                     token_select_mask=token_select_mask)
    check_finite(mask, logprobs=logprobs, teacher_logprobs=teacher_logprobs, old_logprobs=old_logprobs)
    mask = mask.to(logprobs.dtype)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    reward, clipped = clipped_reward(old, teacher_logprobs, reward_clip_mixture, floor_form)
    keep = token_select_mask.to(mask.dtype) * mask
    per_token, metrics = clipped_surrogate(logprobs, old, reward, mask, eps_low, eps_high)
    if rollout_logprobs is not None:
        w, is_metrics = off_policy_weights(old, rollout_logprobs, mask, tis_cap, is_mask)
        if w is not None:
            per_token = per_token * w
            metrics.update(is_metrics)
    loss = aggregate_loss(per_token * keep, mask, loss_agg_mode, num_tokens, num_seqs)
    with torch.no_grad():
        metrics.update({
            "reward/mean": masked_mean(reward, mask),
            "reward/std": masked_std(reward, mask),
            "kl/student_teacher": masked_mean(old - teacher_logprobs, mask),
            "reopold/fraction_clipped": masked_mean(clipped.to(mask.dtype), mask),
            "reopold/fraction_kept": keep.sum() / mask.sum().clamp(min=1),
        })
    return loss, metrics


def select_tokens(
    raw_reward: torch.Tensor,
    entropy: Optional[torch.Tensor],
    mask: torch.Tensor,
    current_phase: str,
    floor: Optional[float] = None,
    exploration: str = "mask_below_floor",
    exploration_beta: Optional[float] = None,
    refinement_beta: Optional[float] = 0.5,
    group=None,
) -> torch.Tensor:
    """The tokens that train in the current phase (`[b, s]` bool).

    Args:
        raw_reward: `[b, s]` lp_t - lp_old before the floor.
        entropy: `[b, s]` pi_old's entropy (refinement with a beta).
        floor: the reward floor (None: no floor).
        exploration: "mask_below_floor" (reward >= floor), "clamp" (all), "top_abs_reward" (top
            exploration_beta by |max(reward, floor)|).
        refinement_beta: top fraction by entropy in refinement; None keeps all.
        group: data-parallel group over which top-beta thresholds are taken.
    """
    if current_phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {current_phase!r}")
    valid = mask.bool()
    if current_phase == "exploration":
        if exploration not in EXPLORATION_RULES:
            raise ValueError(f"exploration rule {exploration!r}: use one of {EXPLORATION_RULES}")
        if exploration in ("mask_below_floor", "clamp") and floor is None:
            raise ValueError(f"exploration rule {exploration!r} needs a reward floor")
        if exploration == "mask_below_floor":
            return valid & (raw_reward >= floor)
        if exploration == "clamp":
            return valid
        if exploration_beta is None:
            raise ValueError("exploration rule 'top_abs_reward' needs exploration_beta")
        clamped = raw_reward if floor is None else raw_reward.clamp(min=floor)
        return top_fraction_mask(clamped.abs(), mask, exploration_beta, group)
    if refinement_beta is None:
        return valid
    if entropy is None:
        raise ValueError("entropy is required for entropy-based token selection (refinement phase)")
    return top_fraction_mask(entropy, mask, refinement_beta, group)
