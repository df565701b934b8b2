"""Shared policy-gradient machinery: validation, masked statistics, aggregation with global counts,
the clipped surrogate (asymmetric eps, dual clip) and truncated importance sampling.

Shapes: `[b, s]` = (sequences, response positions); `mask` is 1 on response tokens.

Normalisation is by *global* counts: `num_tokens` / `num_seqs` are the valid tokens / sequences of the
whole optimizer step, across every micro-batch and data-parallel rank (NeMo-RL's design). Each
micro-batch's loss is then a partial sum, so adding them (and summing gradients across DP ranks) is
exactly the full-batch loss, whatever the micro-batch lengths.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_opd.checks import require

if TYPE_CHECKING:  # the config imports the objectives (their configs live beside their maths)
    from megatron_opd.config import LossTermsConfig

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


# ------------------------------------------------------------------------------------------------
# validation (cheap; names the argument)
# ------------------------------------------------------------------------------------------------
def check_same_shape(reference_name: str, reference: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(reference.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(reference.shape)} "
                             f"(the shape of {reference_name})")


def check_finite(mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """NaN/inf log-probs on response tokens are an error (they would poison the update silently).
    Inside `checks.deferred()` (the training step) the check costs no host read of its own."""
    m = mask.bool()
    for name, t in tensors.items():
        if t is not None:
            require(torch.isfinite(t) | ~m, f"{name} contains NaN or inf on response tokens (mask == 1)")


# ------------------------------------------------------------------------------------------------
# masked statistics
# ------------------------------------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    denom = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / denom.clamp(min=1)


def masked_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mu = masked_mean(x, mask)
    return masked_mean((x - mu) ** 2, mask).sqrt()


# ------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------
def global_counts(masks: list[torch.Tensor], group=None) -> tuple[float, float]:
    """Valid tokens and sequences of all micro-batches `masks` ([b, s] each), summed over `group`.

    With no group (or torch.distributed not initialised) the counts are local.
    """
    # beside the masks: on the accelerator where the group is NCCL, on the host where it is gloo
    t = torch.zeros(2, dtype=torch.float64, device=masks[0].device if masks else "cpu")
    for m in masks:
        t[0] += m.sum()
        t[1] += (m.sum(-1) > 0).sum()
    if group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    tokens, seqs = t.tolist()  # one host read for both
    return tokens, seqs


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
) -> torch.Tensor:
    """Reduce a `[b, s]` per-token loss to this micro-batch's share of the step's loss.

    - "token-mean":           sum_{i,t} L_it / N_tokens
    - "seq-mean-token-sum":   sum_i (sum_t L_it) / N_seqs
    - "seq-mean-token-mean":  sum_i (sum_t L_it / T_i) / N_seqs

    Args:
        num_tokens / num_seqs: global counts (see `global_counts`); default to this micro-batch's.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode={mode!r}: use one of {AGG_MODES}")
    check_same_shape("per_token_loss", per_token_loss, mask=mask)
    mask = mask.to(per_token_loss.dtype)
    if mode == "token-mean":
        denom = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
        return masked_sum(per_token_loss, mask) / denom
    seq_has_tokens = (mask.sum(-1) > 0).to(per_token_loss.dtype)
    denom = num_seqs if num_seqs is not None else seq_has_tokens.sum().clamp(min=1)
    per_seq = masked_sum(per_token_loss, mask, dim=-1)  # [b]
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / denom


# ------------------------------------------------------------------------------------------------
# surrogate and importance weights
# ------------------------------------------------------------------------------------------------
def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate, per token, to *minimise*.

        rho = exp(lp - lp_old)
        L   = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
        dual clip (A < 0):  L = min(L, -c A)          (bounds the loss of very large ratios)

    Returns:
        per-token loss `[b, s]` and metrics (clip fraction, dual-clip fraction, ratio mean/max).
    """
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-20.0, 20.0)  # exp overflow guard
    ratio = log_ratio.exp()
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    m = mask.bool()
    metrics = {"clip_fraction": _frac((clipped > unclipped) & m, m)}
    if dual_clip_c is not None:
        capped = torch.minimum(loss, -dual_clip_c * adv)
        dual = (adv < 0) & (capped < loss)
        loss = torch.where(adv < 0, capped, loss)
        metrics["dual_clip_fraction"] = _frac(dual & m, m)
    with torch.no_grad():
        metrics["ratio_mean"] = masked_mean(ratio, mask)
        metrics["ratio_max"] = torch.where(m, ratio, torch.ones_like(ratio)).max()  # 1 if no response token
    return loss, metrics


def prefix_is_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                      cap: float) -> torch.Tensor:
    """Truncated importance weights of each response position's *prefix*, no grad: w_t = min(prod_{j<t}
    pi_old(y_j) / pi_rollout(y_j), C) over the response tokens before t (1 at the first). What corrects a
    per-position quantity that does not depend on the token sampled at t (the exact KL over the
    vocabulary): position t is reached through the engine's earlier samples; its own sample's ratio does
    not enter the value and would only add variance. All `[b, s]` (`off_policy_weights` with prefix=True)."""
    if cap is None or cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    return off_policy_weights(old_logprobs, rollout_logprobs, mask, cap, prefix=True)[0]


def off_policy_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                       tis_cap: Optional[float], is_mask: Optional[Sequence[float]] = None,
                       prefix: bool = False) -> tuple[Optional[torch.Tensor], dict]:
    """The importance weights that correct for samples drawn by the engine's (behaviour) policy, no grad.
    With the ratio r_t = pi_old(y_t) / pi_rollout(y_t) (prefix=True: r_t = prod_{j<t} of it over the
    response tokens before t, `prefix_is_weights`):

        w_t = min(r_t, tis_cap) * 1[low <= r_t <= high]     (each factor only where set)

    `tis_cap` truncates (token-level TIS); `is_mask` = (low, high) drops the tokens whose ratio leaves
    [low, high] (IcePop-style masked IS), which keeps the normaliser, so a dropped token only loses its
    gradient. Returns (None, {}) when neither is set. Metrics: the ratio's mean and max over the response
    tokens, the truncated and the masked fraction. All `[b, s]`."""
    if tis_cap is None and is_mask is None:
        return None, {}
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    check_same_shape("old_logprobs", old_logprobs, rollout_logprobs=rollout_logprobs, mask=mask)
    with torch.no_grad():
        m = mask.to(torch.float32)
        log_ratio = (old_logprobs.float() - rollout_logprobs.float()) * m  # 0 off the response
        if prefix:
            log_ratio = log_ratio.cumsum(-1) - log_ratio
        ratio = log_ratio.exp()
        metrics = {"offpolicy/ratio_mean": masked_mean(ratio, m),
                   "offpolicy/ratio_max": torch.where(m.bool(), ratio, torch.ones_like(ratio)).max()}
        w = torch.ones_like(ratio) if tis_cap is None else log_ratio.clamp(max=math.log(tis_cap)).exp()
        if tis_cap is not None:
            metrics["tis_weight_mean"] = masked_mean(w, m)
            metrics["tis_truncated_fraction"] = masked_mean((ratio >= tis_cap - 1e-6).float(), m)
        if is_mask is not None:
            low, high = is_mask
            kept = ((ratio >= low) & (ratio <= high)).float()
            w = w * kept if tis_cap is not None else ratio * kept
            metrics["offpolicy/masked_fraction"] = masked_mean(1.0 - kept, m)
    return w, metrics


def _frac(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x.sum() / m.sum().clamp(min=1)


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    terms: Optional["LossTermsConfig"] = None,
    *,
    dual_clip_c: Optional[float] = None,
    rollout_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
) -> tuple[torch.Tensor, dict]:
    """The policy loss every advantage-based objective shares (to minimise), per micro-batch:

        L_t = clipped_surrogate(rho_t, adv_t) * w_t  [+ kl_coef * KL_t(pi || ref)]  [- entropy_coef * H_t]

    with w_t the off-policy weight (`off_policy_weights`: `terms.tis_cap`, `terms.is_mask`) when
    `rollout_logprobs` are given,
    then aggregated over `mask` (times `token_mask`, which drops tokens without changing the normaliser)
    with the step's global counts (`terms.loss_agg_mode`). All `[b, s]`. `terms` (config.LossTermsConfig:
    tis_cap, loss_agg_mode, kl_coef / kl_estimator, entropy_coef): None = none of them, token-mean.
    """
    tis_cap, loss_agg_mode, kl_coef, kl_estimator, entropy_coef = unpack_terms(terms)
    from megatron_opd.objectives.kl import kl_estimate

    per_token, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, eps_low, eps_high,
                                           dual_clip_c)
    if rollout_logprobs is not None:
        w, is_metrics = off_policy_weights(old_logprobs, rollout_logprobs, mask, tis_cap,
                                           getattr(terms, "is_mask", None))
        if w is not None:
            per_token = per_token * w
            metrics.update(is_metrics)
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        per_token = per_token + kl_coef * kl_estimate(logprobs, ref_logprobs, kl_estimator)
    if entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs entropy")
        per_token = per_token - entropy_coef * entropy
    loss_mask = mask if token_mask is None else mask * token_mask.to(mask.dtype)
    return aggregate_loss(per_token, loss_mask, loss_agg_mode, num_tokens, num_seqs), metrics


def logprob_gap(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor) -> dict:
    """Trainer-vs-engine mismatch, what token-level TIS corrects: max and mean |trainer - engine| log-prob
    over response tokens (`[b, s]` each). fp32 on both sides agrees to ~1e-5; bf16 differs by ~0.1."""
    if trainer_logprobs.shape != rollout_logprobs.shape or trainer_logprobs.shape != mask.shape:
        raise ValueError(f"shapes differ: trainer {tuple(trainer_logprobs.shape)}, rollout "
                         f"{tuple(rollout_logprobs.shape)}, mask {tuple(mask.shape)}")
    m = mask.to(torch.float32)
    gap = (trainer_logprobs.float() - rollout_logprobs.float()).abs() * m  # 0 off the response
    return {"mismatch/max_abs": gap.max(), "mismatch/mean_abs": masked_mean(gap, m)}


def unpack_terms(terms: Optional["LossTermsConfig"]) -> tuple:
    """(tis_cap, loss_agg_mode, kl_coef, kl_estimator, entropy_coef) of a LossTermsConfig; None: no TIS, no
    KL term, no entropy bonus, token-mean."""
    if terms is None:
        return None, "token-mean", 0.0, "k3", 0.0
    return terms.tis_cap, terms.loss_agg_mode, terms.kl_coef, terms.kl_loss_estimator, terms.entropy_coef
