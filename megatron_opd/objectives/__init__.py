"""Distillation objectives as pure torch functions (no Megatron imports).

Each loss returns `(loss, metrics)` and normalises by the optimizer step's *global* token/sequence
counts, so micro-batching and data parallelism cannot change the objective.
"""

from megatron_opd.objectives.erpd import (
    ERPDStage1Config,
    ERPDStage2Config,
    build_signal,
    ensemble_signals,
    group_normalized_advantages,
    keep_part,
    kept_tokens,
    sapo_gate,
    stage1_loss,
    stage2_signals,
    trust_region_distill_loss,
    whiten,
    whiten_batch,
)
from megatron_opd.objectives.gopd import gopd_advantage, gopd_loss, select_per_sample
from megatron_opd.objectives.grpo import group_advantages, grpo_loss
from megatron_opd.objectives.kl import kl_estimate
from megatron_opd.objectives.policy_loss import (
    AGG_MODES,
    aggregate_loss,
    clipped_surrogate,
    global_counts,
    off_policy_weights,
    policy_gradient_loss,
)
from megatron_opd.objectives.reopold import (
    clipped_reward,
    phase,
    reopold_loss,
    reward_floor,
    select_tokens,
    top_fraction_mask,
)
