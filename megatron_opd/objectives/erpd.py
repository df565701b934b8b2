"""ERPD — Extreme Region Policy Distillation (shared/papers/erpd-extreme-region-policy-distillation.md).

Two stages on one fixed rollout batch (prompts x G samples, outcome rewards R in {0, 1}). The PDF's
formulas did not survive extraction; these are the standard forms the text names (ALGORITHMS.md §3).

Stage 1 — a teacher trained aggressively off-policy on the batch (many epochs), selectable loss:
  GRPO         clipped surrogate (eps 0.2 / 0.28) with group-normalised advantages (the paper's PPO
               needs a value model and is not offered)
  SAPO         soft gate f(rho) = sigmoid(tau (rho - 1)) * 4 / tau, loss = -f(rho) A
               (f'(1) = 1 like the plain ratio; separate tau for A > 0 and A < 0, tau_neg = 1.05)
  CE           implicit PRM: r(y) = beta * sum_t log(pi/pi_old) (or mean), loss = BCE(sigmoid r, R)
  MSE          "unlearned" weak teacher: fit beta * log(pi/pi_old) to R, per token or summed
Stage 2 — distillation of the stage-1 signal into pi_old under a trust region:
  S_t = lp_numerator - lp_denominator  (fixed), whitened over the batch's response tokens,
  PPO-clipped surrogate with rho = pi_theta / pi_old and advantage S, + KL(pi_theta || pi_old) and
  entropy terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_opd.objectives.kl import kl_estimate
from megatron_opd.objectives.policy_loss import (
    aggregate_loss,
    check_finite,
    check_same_shape,
    clipped_surrogate,
    masked_mean,
)

# The paper's PPO trains a value model; without one "ppo" would be GRPO under another name, so it is
# not offered (a value model is not built here).
STAGE1_LOSSES = ("grpo", "sapo", "ce", "mse")
SIGNAL_STRATEGIES = (1, 2, 3)


#: Which stage-1 settings each loss reads, and their defaults (a null field means "the default where it
#: applies"; a field set for a loss that does not read it is refused).
STAGE1_FIELDS = {
    "grpo": {"eps_low": 0.2, "eps_high": 0.28},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "ce": {"beta": 0.01, "aggregation": "sum"},
    "mse": {"beta": 0.01, "aggregation": "sum", "mse_per_token": True, "mse_target": "signed"},
}


@dataclass
class ERPDStage1Config:
    """Stage 1: the aggressively trained off-policy teacher."""

    loss: str = "sapo"
    """One of grpo, sapo, ce, mse (PPO needs a value model, which is not built: not offered)."""

    eps_low: Optional[float] = None
    """grpo: lower clip (null = 0.2)."""

    eps_high: Optional[float] = None
    """grpo: upper clip (null = 0.28)."""

    tau_pos: Optional[float] = None
    """sapo: gate temperature for positive advantages (null = 1.0)."""

    tau_neg: Optional[float] = None
    """sapo: gate temperature for negative advantages (null = the paper's 1.05)."""

    beta: Optional[float] = None
    """ce / mse: implicit-reward scale (null = 0.01; paper: 0.001-0.05 for CE)."""

    aggregation: Optional[str] = None
    """ce / mse: aggregate the log-ratio over the response by "sum" (default) or "mean"."""

    mse_per_token: Optional[bool] = None
    """mse: regress each token's implicit reward on the return (critic-like; default) instead of the sum."""

    mse_target: Optional[str] = None
    """mse: what the implicit reward is regressed on: "signed" (2R - 1 = +-1; the default) or "reward"
    (R in {0, 1} as it is). At pi = pi_old the implicit reward is 0, so with "reward" a failed sample
    (target 0) gives no gradient at all, while the paper's "unlearning" phase (the checkpoint strategy 2
    divides by) is driven by negative samples: "signed" pushes their log-ratios down from the start."""

    kl_coef: float = 0.0
    """Optional weak KL-to-pi_old penalty (k3)."""

    def __post_init__(self):
        if self.loss not in STAGE1_LOSSES:
            raise ValueError(f"erpd.stage1.loss={self.loss!r}: use one of {STAGE1_LOSSES}")
        used = STAGE1_FIELDS[self.loss]
        for name in ("eps_low", "eps_high", "tau_pos", "tau_neg", "beta", "aggregation", "mse_per_token",
                     "mse_target"):
            if getattr(self, name) is not None and name not in used:
                raise ValueError(f"erpd.stage1.{name}={getattr(self, name)!r} is not used by loss={self.loss}; "
                                 "remove it")
        if self.setting("aggregation") not in (None, "sum", "mean"):
            raise ValueError("erpd.stage1.aggregation must be 'sum' or 'mean'")
        if self.setting("mse_target") not in (None, "signed", "reward"):
            raise ValueError(f"erpd.stage1.mse_target={self.mse_target!r}: use signed or reward")
        for name in ("tau_pos", "tau_neg", "beta"):
            if self.setting(name) is not None and self.setting(name) <= 0:
                raise ValueError(f"erpd.stage1.{name} must be > 0")
        if self.kl_coef < 0:
            raise ValueError("erpd.stage1.kl_coef must be >= 0")

    def setting(self, name: str):
        """The value `loss` reads for `name` (its default when null); None if `loss` does not read it."""
        default = STAGE1_FIELDS[self.loss].get(name)
        value = getattr(self, name)
        return default if value is None else value


@dataclass
class ERPDStage2Config:
    """Stage 2: trust-region distillation of the fixed signal."""

    strategy: int = 1
    """1: teacher = stage-1 policy, denominator = pi_old; 2: MSE policy over its early checkpoint;
    3: numerator = pi_old (or current), denominator = an earlier, weaker checkpoint."""

    eps_low: float = 0.2
    """Clip below."""

    eps_high: float = 0.28
    """Clip above."""

    kl_coef: float = 0.0
    """KL(pi_theta || pi_old) weight (paper: 0.001-0.2)."""

    entropy_coef: float = 0.0
    """Entropy bonus (paper: 0.5 in the iterative runs)."""

    keep: Optional[str] = None
    """Outlier ablation on positive samples: "positive" or "negative" part of the raw S only, then
    whitening over the kept tokens (the paper: "whitening after masking"); None keeps all."""

    def __post_init__(self):
        if self.strategy not in SIGNAL_STRATEGIES:
            raise ValueError(f"erpd.stage2.strategy={self.strategy}: use one of {SIGNAL_STRATEGIES}")
        if self.keep not in (None, "positive", "negative"):
            raise ValueError("erpd.stage2.keep must be null, 'positive' or 'negative'")


# ------------------------------------------------------------------------------------------------
# Stage 1
# ------------------------------------------------------------------------------------------------
def group_normalized_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (R - mean_group) / (std_group + eps) over consecutive groups of `group_size` samples.

    Args:
        rewards: `[num_prompts * group_size]` outcome rewards.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be 1-D with a multiple of "
                         f"group_size={group_size} entries")
    g = rewards.view(-1, group_size).float()
    return ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True, unbiased=False) + eps)).view(-1)


def sapo_gate(ratio: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """f(rho) = sigmoid(tau (rho - 1)) * 4 / tau;  f(1) = 2/tau, f'(1) = 1."""
    return torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau


def sapo_loss_per_token(logprobs, old_logprobs, advantages, tau_pos: float, tau_neg: float):
    ratio = (logprobs - old_logprobs.detach()).clamp(-20, 20).exp()
    adv = advantages.detach()
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    return -sapo_gate(ratio, tau) * adv


def implicit_reward(logprobs, old_logprobs, mask, beta: float, aggregation: str) -> torch.Tensor:
    """r(y) = beta * sum_t (lp - lp_old)  (or the mean over response tokens): `[b]`."""
    log_ratio = (logprobs - old_logprobs.detach()) * mask
    total = log_ratio.sum(-1)
    if aggregation == "mean":
        total = total / mask.sum(-1).clamp(min=1)
    return beta * total


def stage1_loss(
    cfg: ERPDStage1Config,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    outcome_rewards: torch.Tensor,
    advantages: Optional[torch.Tensor] = None,
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict]:
    """Stage-1 teacher loss of one micro-batch.

    Args:
        outcome_rewards: `[b]` verifier rewards R in {0, 1}.
        advantages: `[b]` per-sequence advantages for GRPO/PPO/SAPO (e.g. group-normalised).
    """
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, mask=mask)
    check_finite(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    if outcome_rewards.shape != logprobs.shape[:1]:
        raise ValueError(f"outcome_rewards has shape {tuple(outcome_rewards.shape)}, expected "
                         f"({logprobs.shape[0]},)")
    mask = mask.to(logprobs.dtype)
    metrics: dict = {}
    get = cfg.setting
    if cfg.loss in ("grpo", "sapo"):
        if advantages is None:
            raise ValueError(f"stage-1 loss {cfg.loss!r} needs per-sequence advantages")
        adv = advantages.view(-1, 1).expand_as(logprobs)
        if cfg.loss == "sapo":
            per_token = sapo_loss_per_token(logprobs, old_logprobs, adv, get("tau_pos"), get("tau_neg"))
        else:
            per_token, metrics = clipped_surrogate(logprobs, old_logprobs, adv, mask, get("eps_low"),
                                                   get("eps_high"))
        loss = aggregate_loss(per_token, mask, loss_agg_mode, num_tokens, num_seqs)
    elif cfg.loss == "ce":
        r = implicit_reward(logprobs, old_logprobs, mask, get("beta"), get("aggregation"))  # [b]
        per_seq = F.binary_cross_entropy_with_logits(r, outcome_rewards.to(r.dtype), reduction="none")
        loss = per_seq.sum() / (num_seqs if num_seqs is not None else max(len(per_seq), 1))
        metrics["ce/implicit_reward_mean"] = r.detach().mean()
    else:  # mse
        target = outcome_rewards.to(logprobs.dtype)
        if get("mse_target") == "signed":  # +-1: failed samples pull their log-ratios down at pi = pi_old
            target = 2 * target - 1
        if get("mse_per_token"):
            pred = get("beta") * (logprobs - old_logprobs.detach())  # each token's implicit reward
            per_token = (pred - target.view(-1, 1)) ** 2
            loss = aggregate_loss(per_token, mask, loss_agg_mode, num_tokens, num_seqs)
            pred_seq = masked_mean(pred.detach(), mask, dim=-1)
        else:
            pred_seq = implicit_reward(logprobs, old_logprobs, mask, get("beta"), get("aggregation"))
            per_seq = (pred_seq - target) ** 2
            loss = per_seq.sum() / (num_seqs if num_seqs is not None else max(len(per_seq), 1))
        metrics["mse/explained_variance"] = explained_variance(pred_seq.detach(), target)
    if cfg.kl_coef:
        loss = loss + cfg.kl_coef * aggregate_loss(kl_estimate(logprobs, old_logprobs, "k3"), mask,
                                                   loss_agg_mode, num_tokens, num_seqs)
    return loss, metrics


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - pred) / Var(target) (1 = perfect fit; <= 0 = no better than the mean; NaN
    where the target is constant). A 0-d tensor: no host read."""
    var = target.float().var(unbiased=False)
    ev = 1.0 - (target.float() - pred.float()).var(unbiased=False) / var
    return torch.where(var == 0, torch.full_like(ev, float("nan")), ev)


# ------------------------------------------------------------------------------------------------
# Stage 2
# ------------------------------------------------------------------------------------------------
def build_signal(numerator_logprobs: torch.Tensor, denominator_logprobs: torch.Tensor) -> torch.Tensor:
    """S_t = lp_numerator - lp_denominator (fixed during stage 2).

    Strategy 1: numerator = stage-1 policy, denominator = pi_old.
    Strategy 2: numerator = MSE-trained policy, denominator = its early "unlearned" checkpoint.
    Strategy 3: numerator = pi_old (or current), denominator = an earlier, weaker checkpoint.
    """
    check_same_shape("numerator_logprobs", numerator_logprobs, denominator_logprobs=denominator_logprobs)
    return (numerator_logprobs - denominator_logprobs).detach()


def strategy_signal(strategy: int, old_logprobs: torch.Tensor, teacher: Optional[torch.Tensor] = None,
                    unlearned: Optional[torch.Tensor] = None, weak: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The stage-2 token signal of a strategy (ERPD Fig. 3), from log-probs of the sampled tokens `[b, s]`:

        1: S = lp_teacher - lp_old          (the stage-1 policy over pi_old)
        2: S = lp_teacher - lp_unlearned    (an MSE-trained policy over its early "unlearned" checkpoint)
        3: S = lp_old - lp_weak             (pi_old over an earlier, weaker policy)
    """
    needed = {1: {"teacher": teacher}, 2: {"teacher": teacher, "unlearned": unlearned}, 3: {"weak": weak}}
    if strategy not in needed:
        raise ValueError(f"strategy={strategy}: use one of {SIGNAL_STRATEGIES}")
    missing = [name for name, t in needed[strategy].items() if t is None]
    if missing:
        raise ValueError(f"strategy {strategy} needs the {' and '.join(missing)} log-probs")
    if strategy == 1:
        return build_signal(teacher, old_logprobs)
    if strategy == 2:
        return build_signal(teacher, unlearned)
    return build_signal(old_logprobs, weak)


def whiten(signal: torch.Tensor, mask: torch.Tensor, group=None, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit std over the response tokens (over a DP `group` when given); 0 elsewhere."""
    return whiten_batch([signal], [mask], group, eps)[0]


def whiten_batch(signals: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], group=None,
                 eps: float = 1e-8) -> list[torch.Tensor]:
    """`whiten` with the statistics of every micro-batch's response tokens together (`[b_i, s_i]` each),
    all-reduced over a data-parallel `group`."""
    for signal, mask in zip(signals, masks):
        check_same_shape("signal", signal, mask=mask)
    stats = torch.zeros(3, dtype=torch.float64, device=signals[0].device)
    for signal, mask in zip(signals, masks):
        m = mask.to(torch.float64)
        x = signal.to(torch.float64) * m
        stats += torch.stack([m.sum(), x.sum(), (x * x).sum()])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)  # on the signals' device, which the group's backend takes
    n = stats[0].clamp(min=1)
    mean = stats[1] / n
    std = (stats[2] / n - mean**2).clamp(min=0).sqrt()
    return [(((s.to(torch.float64) - mean) / (std + eps)) * m.to(torch.float64)).to(s.dtype)
            for s, m in zip(signals, masks)]


def keep_part(signal: torch.Tensor, positive_samples: torch.Tensor, keep: Optional[str]) -> torch.Tensor:
    """Outlier ablation: on positive samples (`[b]` bool) keep only S > 0 ("positive") or S < 0."""
    if keep is None:
        return signal
    return signal * kept_tokens(signal, positive_samples, keep).to(signal.dtype)


def kept_tokens(signal: torch.Tensor, positive_samples: torch.Tensor, keep: Optional[str]) -> torch.Tensor:
    """[b, s] bool: the tokens the outlier ablation keeps (all of them on negative samples; on positive
    samples those whose S is > 0 for "positive", < 0 for "negative"; everything for keep=None)."""
    if keep is None:
        return torch.ones_like(signal, dtype=torch.bool)
    part = signal > 0 if keep == "positive" else signal < 0
    return part | ~positive_samples.view(-1, 1).expand_as(signal)


def stage2_signals(signals: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
                   positive_samples: Sequence[torch.Tensor], keep: Optional[str], whiten_signal: bool,
                   group=None) -> list[torch.Tensor]:
    """One stage-2 signal of every micro-batch (`[b_i, s_i]` each) as the paper prepares it: the outlier
    ablation on the *raw* S (`kept_tokens`), then whitening over what is kept (the batch's kept response
    tokens, all-reduced over a data-parallel `group`); 0 at the dropped tokens. Masking by the sign of
    the whitened S instead would keep a different set (every token with 0 < S < mean changes side)."""
    kept = [mask * kept_tokens(s, pos, keep).to(mask.dtype) for s, mask, pos in zip(signals, masks, positive_samples)]
    if whiten_signal:
        return whiten_batch(signals, kept, group)
    return [s * k.to(s.dtype) for s, k in zip(signals, kept)]


def ensemble_signals(signals: Sequence[torch.Tensor], mask: torch.Tensor, group=None) -> torch.Tensor:
    """Several signals summed after whitening each ("simultaneous" ensemble). The sequential variant
    is a loop: distil with signal 1 for k steps, then with signal 2."""
    if not signals:
        raise ValueError("ensemble_signals needs at least one signal")
    return sum(whiten(s, mask, group) for s in signals)


def trust_region_distill_loss(
    cfg: ERPDStage2Config,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    signal: torch.Tensor,
    mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    num_tokens: Optional[float] = None,
    num_seqs: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict]:
    """Stage 2: PPO-clipped surrogate with the fixed (whitened) signal as advantage,
    + kl_coef * KL(pi_theta || pi_old) - entropy_coef * H."""
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, signal=signal, mask=mask, entropy=entropy)
    check_finite(mask, logprobs=logprobs, old_logprobs=old_logprobs, signal=signal)
    mask = mask.to(logprobs.dtype)
    per_token, metrics = clipped_surrogate(logprobs, old_logprobs, signal, mask, cfg.eps_low, cfg.eps_high)
    kl = kl_estimate(logprobs, old_logprobs, "k3")
    if cfg.kl_coef:
        per_token = per_token + cfg.kl_coef * kl
    if cfg.entropy_coef:
        if entropy is None:
            raise ValueError("erpd.stage2.entropy_coef > 0 needs entropy")
        per_token = per_token - cfg.entropy_coef * entropy
    loss = aggregate_loss(per_token, mask, loss_agg_mode, num_tokens, num_seqs)
    metrics["kl/student_old"] = masked_mean(kl.detach(), mask)
    return loss, metrics
