"""Glue between the trainer's micro-batches and the pure objectives (megatron_opd.objectives).

A micro-batch dict carries, on the last pipeline stage: "mask", "teacher_logprobs", optionally
"reference_logprobs", "old_logprobs", "old_entropy", "rollout_logprobs", "token_select", and the
step's global counts "global_tokens" / "global_seqs".
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_opd.config import ObjectiveConfig
from megatron_opd.objectives import gopd_loss, reopold_loss
from megatron_opd.objectives.reopold import clipped_reward, phase, select_tokens
from megatron_opd.rollout.monitor import logprob_gap


def objective_loss(cfg: ObjectiveConfig, mb: dict, logprobs: torch.Tensor,
                   entropy: Optional[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
    """The configured objective's loss for one micro-batch (`logprobs` [b, s] with grad)."""
    common = dict(
        old_logprobs=mb.get("old_logprobs"),
        rollout_logprobs=mb.get("rollout_logprobs"),
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, tis_cap=cfg.tis_cap,
        loss_agg_mode=cfg.loss_agg_mode,
        num_tokens=mb["global_tokens"], num_seqs=mb["global_seqs"],
    )
    if cfg.name == "gopd":
        loss, metrics = gopd_loss(
            logprobs, mb["teacher_logprobs"], mb["mask"], lam=cfg.lam,
            ref_logprobs=mb.get("reference_logprobs"), dual_clip_c=cfg.dual_clip_c,
            kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
            entropy=entropy, entropy_coef=cfg.entropy_coef, **common)
    else:
        loss, metrics = reopold_loss(
            logprobs, mb["teacher_logprobs"], mb["mask"], step=step,
            entropy=mb.get("old_entropy"), reward_clip_mixture=cfg.reward_clip_mixture,
            entropy_top_beta=cfg.entropy_top_beta, switch_step=cfg.switch_step,
            token_select_mask=mb.get("token_select"), **common)
    # Trainer vs vLLM log-probs on this micro-batch's tokens, free: the forward pass already ran.
    if mb.get("rollout_logprobs") is not None:
        metrics.update(logprob_gap(logprobs.detach(), mb["rollout_logprobs"], mb["mask"]))
    return loss, metrics


def select_reopold_tokens(cfg: ObjectiveConfig, micro: list[dict], step: int, group=None) -> None:
    """REOPOLD's token selection over the whole rollout batch (all micro-batches, and DP ranks via
    `group`), stored as mb["token_select"]. Needs pi_old log-probs and entropies (last PP stage)."""
    if not micro or "old_logprobs" not in micro[0]:
        return
    widths = [mb["mask"].shape[1] for mb in micro]
    S = max(widths)

    def cat(key, fill=0.0):
        return torch.cat([torch.nn.functional.pad(mb[key].float(), (0, S - mb[key].shape[1]), value=fill)
                          for mb in micro])

    mask = cat("mask")
    reward, _ = clipped_reward(cat("old_logprobs"), cat("teacher_logprobs"), cfg.reward_clip_mixture)
    keep = select_tokens(reward, cat("old_entropy"), mask, cfg.entropy_top_beta, phase(step, cfg.switch_step), group)
    row = 0
    for mb, w in zip(micro, widths):
        b = mb["mask"].shape[0]
        mb["token_select"] = keep[row:row + b, :w]
        row += b
