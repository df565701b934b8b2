"""The objective interface the training loop is written against, and its three implementations.

An objective declares what it needs from a step (`needs`: which frozen models run, whether pi_old is
scored before the first update, entropy, outcome rewards, the teacher's hidden states), may do
batch-level work once the batch is scored (`prepare`: REOPOLD's token selection, GRPO's group
advantages), and turns one micro-batch's student outputs into `(loss, metrics)`. The loop asks; it
never looks at an objective's name. The maths lives in `megatron_opd.objectives` (pure torch).

A micro-batch is a `batching.MicroBatch`: built once per step, completed by scoring with what `needs`
asked for (on the last pipeline stage); `prepare` returns new micro-batches with what it adds.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import Optional

import torch

from megatron_opd.batching import MicroBatch, with_global_counts
from megatron_opd.config import (ERPDConfig, GOPDConfig, GRPOConfig, ObjectiveConfig, ObjectiveNeeds,
                                 REOPOLDConfig, SFTObjectiveConfig)
from megatron_opd.objectives import (gopd_loss, group_advantages, grpo_loss, reopold_loss, stage1_loss,
                                    trust_region_distill_loss)
from megatron_opd.objectives.erpd import ERPDStage1Config, ERPDStage2Config
from megatron_opd.objectives.kl import kl_estimate
from megatron_opd.objectives.policy_loss import (aggregate_loss, logprob_gap, masked_mean, masked_std,
                                                 off_policy_weights)
from megatron_opd.objectives.reopold import clipped_reward, phase, reward_floor, select_tokens


@dataclass
class StudentOutputs:
    """What the update's forward pass gives an objective for one micro-batch."""

    logprobs: torch.Tensor
    """[b, s] log p(sampled token) at the response positions, with grad (0 elsewhere)."""

    entropy: Optional[torch.Tensor] = None
    """[b, s] entropy of the next-token distribution (needs.update_entropy)."""

    hidden: Optional[torch.Tensor] = None
    """[n, H] final hidden states at the n response positions, with grad (needs.teacher_hidden)."""

    lm_head: Optional[torch.Tensor] = None
    """[V/tp, H] this rank's LM-head rows, the trainable parameter (needs.teacher_hidden)."""

    kl: Optional[torch.Tensor] = None
    """[b, s] the exact per-token KL to the teacher, with grad (needs.teacher_hidden)."""

    teacher_logprobs: Optional[torch.Tensor] = None
    """[b, s] the teacher's log p(sampled token), from the same LM-head pass as `kl` (no grad)."""


class Objective(abc.ABC):
    """The interface: what a step must provide, batch-level preparation, and the micro-batch loss."""

    needs: ObjectiveNeeds = ObjectiveNeeds()

    def prepare(self, micro: list[MicroBatch], step: int, dp_group=None) -> tuple[list[MicroBatch], dict]:
        """Batch-level work after scoring, before the first update (every micro-batch of this replica;
        `dp_group` spans the replicas). Returns the micro-batches with what it adds (new objects; the
        inputs are not changed) and its metrics."""
        return micro, {}

    def student_outputs(self, mb: MicroBatch, hidden: torch.Tensor, lm_head: torch.Tensor,
                        target: torch.Tensor) -> StudentOutputs:
        """Objectives that run the LM heads themselves (needs.teacher_hidden) compute the update's
        student outputs in their own pass: `hidden` [n, H] the student's final hidden states at the n
        response positions of mb, `lm_head` [V/tp, H] its trainable LM-head shard, `target` [n] the
        sampled tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not run the LM heads (needs.teacher_hidden)")

    @abc.abstractmethod
    def loss(self, mb: MicroBatch, out: StudentOutputs, step: int) -> tuple[torch.Tensor, dict]:
        """This micro-batch's share of the step's loss (normalised by mb.global_tokens /
        mb.global_seqs) and its metrics."""


class GOPDObjective(Objective):
    """G-OPD / ExOPD: the sampled-token reward as a clipped policy-gradient advantage, or the exact
    per-token KL to the teacher over the vocabulary (estimator full / topk)."""

    def __init__(self, cfg: GOPDConfig, tp_group=None, vocab_size: Optional[int] = None):
        self.cfg, self.tp_group, self.vocab_size = cfg, tp_group, vocab_size
        self.needs = cfg.needs()

    def loss(self, mb, out, step):
        cfg = self.cfg
        if cfg.estimator == "sampled":
            eps_low, eps_high = cfg.clip
            return gopd_loss(
                out.logprobs, mb.teacher_logprobs, mb.mask, cfg.lam, cfg,
                ref_logprobs=mb.reference_logprobs, old_logprobs=mb.old_logprobs,
                rollout_logprobs=mb.rollout_logprobs, eps_low=eps_low, eps_high=eps_high,
                dual_clip_c=cfg.dual_clip_c, entropy=out.entropy, num_tokens=mb.global_tokens,
                num_seqs=mb.global_seqs)
        return self._exact_kl_loss(mb, out)

    def student_outputs(self, mb, hidden, lm_head, target):
        """Exact KL: the KL, the student's log-prob (and entropy) and the teacher's log-prob of each
        sampled token from one pass over both LM heads (`vocab_parallel_kl_and_logprobs`).

        With several teachers each sample's KL is to its own (domain's) teacher: each teacher's LM head
        runs only over its rows' positions (`mb.teacher_positions`, host-built), and the per-teacher
        results are put back in place; a teacher without a row in this micro-batch is skipped."""
        from megatron_opd.vocab_kl import vocab_parallel_kl_and_logprobs

        cfg = self.cfg

        def pass_over(h_s, h_t, w_t, y):  # -> (kl, lp, entropy or None, teacher lp), [m] each
            return vocab_parallel_kl_and_logprobs(
                h_s, lm_head, h_t, w_t, y, self.tp_group, self.vocab_size, cfg.direction, cfg.top_k,
                compute_entropy=self.needs.update_entropy)

        if not mb.teacher_positions:  # one teacher: every position
            kl, lp, ent, lp_t = pass_over(hidden, mb.teacher_hidden[0], mb.teacher_lm_head[0], target)
        else:
            n = hidden.shape[0]
            kl, lp, lp_t = (hidden.new_zeros(n, dtype=torch.float32) for _ in range(3))  # [n]
            ent = hidden.new_zeros(n, dtype=torch.float32) if self.needs.update_entropy else None
            for h_t, w_t, pos in zip(mb.teacher_hidden, mb.teacher_lm_head, mb.teacher_positions):
                if h_t is None:
                    continue
                kl_k, lp_k, ent_k, lp_t_k = pass_over(hidden.index_select(0, pos), h_t, w_t,
                                                      target.index_select(0, pos))  # [n_k] each
                kl, lp, lp_t = kl.index_copy(0, pos, kl_k), lp.index_copy(0, pos, lp_k), lp_t.index_copy(0, pos, lp_t_k)
                if ent is not None:
                    ent = ent.index_copy(0, pos, ent_k)
        mask = mb.mask.bool()  # [b, s]

        def at_positions(values):  # [n] -> [b, s], 0 elsewhere, differentiable
            return torch.zeros(mask.shape, dtype=torch.float32, device=values.device).masked_scatter(mask, values)

        return StudentOutputs(logprobs=at_positions(lp), entropy=at_positions(ent) if ent is not None else None,
                              hidden=hidden, lm_head=lm_head, kl=at_positions(kl),
                              teacher_logprobs=at_positions(lp_t.detach()))

    def _exact_kl_loss(self, mb, out):
        cfg = self.cfg
        mask = mb.mask.bool()  # [b, s]
        per_token = out.kl
        m = mask.to(per_token.dtype)
        metrics = {"kl/student_teacher_exact": masked_mean(per_token.detach(), m)}
        old = out.logprobs.detach() if mb.old_logprobs is None else mb.old_logprobs
        if mb.rollout_logprobs is not None:
            # the engine sampled the prefix that reaches each position; the KL there does not depend on
            # the token sampled at it, so its prefix's ratio (not its own) is the correction
            w, is_metrics = off_policy_weights(old, mb.rollout_logprobs, m, cfg.tis_cap, cfg.is_mask, prefix=True)
            if w is not None:
                per_token = per_token * w
                metrics.update(is_metrics)
        if cfg.kl_coef:
            per_token = per_token + cfg.kl_coef * kl_estimate(out.logprobs, mb.reference_logprobs,
                                                              cfg.kl_loss_estimator)
        if cfg.entropy_coef:
            per_token = per_token - cfg.entropy_coef * out.entropy
        loss = aggregate_loss(per_token, m, cfg.loss_agg_mode, mb.global_tokens, mb.global_seqs)
        with torch.no_grad():
            reward = out.teacher_logprobs - old
            metrics.update({"reward/mean": masked_mean(reward, m),
                            "reward/std": masked_std(reward, m),
                            "kl/student_teacher": masked_mean(-reward, m)})
            if out.entropy is not None:
                metrics["entropy"] = masked_mean(out.entropy.detach(), m)
        return loss, metrics


class REOPOLDObjective(Objective):
    """REOPOLD: floored reward, tokens selected per phase over the whole batch before the update."""

    def __init__(self, cfg: REOPOLDConfig):
        self.cfg = cfg
        self.needs = cfg.needs()

    def prepare(self, micro, step, dp_group=None):
        """Each micro-batch with its token_select: the phase's rule over all of this step's tokens (all
        micro-batches, and the data-parallel replicas through `dp_group`)."""
        if not micro or micro[0].old_logprobs is None:
            return micro, {}  # not the last pipeline stage
        cfg = self.cfg
        widths = [mb.mask.shape[1] for mb in micro]
        width = max(widths)

        def cat(tensors):  # [rows of every micro-batch, width]
            return torch.cat([torch.nn.functional.pad(t.float(), (0, width - t.shape[1])) for t in tensors])

        floor = reward_floor(cfg.mixture, cfg.floor_form) if cfg.mixture is not None else None
        current = phase(step, cfg.switch_step)
        keep = select_tokens(cat([mb.teacher_logprobs for mb in micro]) - cat([mb.old_logprobs for mb in micro]),
                             cat([mb.old_entropy for mb in micro]), cat([mb.mask for mb in micro]),
                             current, floor=floor, exploration=cfg.exploration_rule,
                             exploration_beta=cfg.exploration_beta, refinement_beta=cfg.refinement_beta,
                             group=dp_group)
        ends = torch.tensor([mb.mask.shape[0] for mb in micro]).cumsum(0).tolist()
        return [replace(mb, token_select=keep[end - mb.mask.shape[0]:end, :w])
                for mb, w, end in zip(micro, widths, ends)], {}

    def loss(self, mb, out, step):
        cfg = self.cfg
        loss, metrics = reopold_loss(
            out.logprobs, mb.teacher_logprobs, mb.mask, mb.token_select,
            old_logprobs=mb.old_logprobs, rollout_logprobs=mb.rollout_logprobs,
            reward_clip_mixture=cfg.mixture, floor_form=cfg.floor_form, eps_low=cfg.eps_low,
            eps_high=cfg.eps_high, tis_cap=cfg.tis_cap, is_mask=cfg.is_mask, loss_agg_mode=cfg.loss_agg_mode,
            num_tokens=mb.global_tokens, num_seqs=mb.global_seqs)
        metrics["reopold/phase"] = float(phase(step, cfg.switch_step) == "refinement")
        metrics["entropy"] = masked_mean(mb.old_entropy, mb.mask.to(mb.old_entropy.dtype))
        return loss, metrics


def with_group_advantages(micro: list[MicroBatch], normalize_std: bool = True) -> list[MicroBatch]:
    """The micro-batches with their advantages [b], from every micro-batch's outcome rewards and prompt
    group ids. A prompt's samples all live on one replica (prompts are split over replicas whole), so the
    groups are complete here; token budgets may reorder rows, hence ids rather than positions."""
    if not micro:
        return micro
    rewards = torch.cat([mb.outcome_rewards for mb in micro])
    groups = torch.cat([mb.group for mb in micro])
    adv = group_advantages(rewards.cpu(), groups.cpu(), normalize_std)
    ends = torch.tensor([mb.outcome_rewards.shape[0] for mb in micro]).cumsum(0).tolist()
    return [replace(mb, advantages=adv[end - mb.outcome_rewards.shape[0]:end].to(mb.outcome_rewards.device))
            for mb, end in zip(micro, ends)]


class GRPOObjective(Objective):
    """GRPO from verifier rewards: group-normalised advantages (each prompt's rollout.n samples)."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.needs = cfg.needs()

    def prepare(self, micro, step, dp_group=None):
        return with_group_advantages(micro, self.cfg.normalize_std), {}

    def loss(self, mb, out, step):
        cfg = self.cfg
        loss, metrics = grpo_loss(
            out.logprobs, mb.advantages, mb.mask, cfg, old_logprobs=mb.old_logprobs,
            rollout_logprobs=mb.rollout_logprobs, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
            dual_clip_c=cfg.dual_clip_c, ref_logprobs=mb.reference_logprobs, entropy=out.entropy,
            num_tokens=mb.global_tokens, num_seqs=mb.global_seqs)
        metrics["reward/mean"] = mb.outcome_rewards.float().mean()
        return loss, metrics


class ERPDStage1Objective(Objective):
    """ERPD stage 1 on a fixed batch: GRPO / SAPO (group-normalised advantages), CE or MSE (outcome
    rewards), ratios against the batch's pi_old."""

    needs = ObjectiveNeeds(teachers=False, old_policy=True, outcome_rewards=True, fused_logprobs=True)

    def __init__(self, cfg: ERPDStage1Config):
        self.cfg = cfg

    def prepare(self, micro, step, dp_group=None):
        return with_group_advantages(micro), {}

    def loss(self, mb, out, step):
        loss, metrics = stage1_loss(self.cfg, out.logprobs, mb.old_logprobs, mb.mask, mb.outcome_rewards,
                                    advantages=mb.advantages, num_tokens=mb.global_tokens,
                                    num_seqs=mb.global_seqs)
        with torch.no_grad():
            m = mb.mask.to(out.logprobs.dtype)
            metrics["kl/student_old_k1"] = masked_mean(out.logprobs.detach() - mb.old_logprobs, m)
        return loss, metrics


class ERPDStage2Objective(Objective):
    """ERPD stage 2: the stored, fixed signal mb.signal as the advantage of a PPO-clipped surrogate
    against pi_old, with KL-to-pi_old and entropy terms."""

    def __init__(self, cfg: ERPDStage2Config):
        self.cfg = cfg
        self.needs = ObjectiveNeeds(teachers=False, old_policy=True, update_entropy=cfg.entropy_coef > 0,
                                    fused_logprobs=True)

    def loss(self, mb, out, step):
        return trust_region_distill_loss(self.cfg, out.logprobs, mb.old_logprobs, mb.signal, mb.mask,
                                         entropy=out.entropy, num_tokens=mb.global_tokens,
                                         num_seqs=mb.global_seqs)


class SFTObjective(Objective):
    """SFT on teacher samples: the negative log-likelihood of the teacher's tokens (the rollout
    log-probs are then the teacher's, which gives a free KL(teacher || student) estimate)."""

    def __init__(self, cfg: SFTObjectiveConfig):
        self.cfg = cfg
        self.needs = cfg.needs()

    def prepare(self, micro, step, dp_group=None):
        """correct_only: the verifier's rejected samples leave the mask, and the step's counts."""
        if not self.cfg.correct_only or not micro:
            return micro, {}
        kept = torch.stack([(mb.outcome_rewards > 0).sum() for mb in micro]).sum()
        micro = [replace(mb, mask=mb.mask * (mb.outcome_rewards > 0).view(-1, 1).to(mb.mask.dtype),
                         response_tokens=None)  # rows left the mask: counted on the device now
                 for mb in micro]
        micro = with_global_counts(micro, dp_group, at_least=1.0)
        return micro, {"sft/kept_fraction": float(kept) / sum(mb.mask.shape[0] for mb in micro)}  # once a step

    def loss(self, mb, out, step):
        m = mb.mask.to(out.logprobs.dtype)
        loss = aggregate_loss(-out.logprobs, m, self.cfg.loss_agg_mode, mb.global_tokens, mb.global_seqs)
        with torch.no_grad():
            metrics = {"kl/teacher_student": masked_mean(mb.rollout_logprobs - out.logprobs.detach(), m),
                       "nll": masked_mean(-out.logprobs.detach(), m)}
        return loss, metrics


def build_objective(cfg: ObjectiveConfig, tp_group=None, vocab_size: Optional[int] = None) -> Objective:
    """The configured objective (`tp_group` and `vocab_size` serve the exact-KL estimators). For ERPD,
    the stage-1 objective of its first loss (the pipeline switches objectives between stages)."""
    settings = cfg.settings
    if isinstance(settings, GOPDConfig):
        return GOPDObjective(settings, tp_group, vocab_size)
    if isinstance(settings, REOPOLDConfig):
        return REOPOLDObjective(settings)
    if isinstance(settings, ERPDConfig):
        return ERPDStage1Objective(settings.stage1)
    if isinstance(settings, SFTObjectiveConfig):
        return SFTObjective(settings)
    return GRPOObjective(settings)


def objective_loss(objective: Objective, mb: MicroBatch, out: StudentOutputs, step: int) -> tuple[torch.Tensor, dict]:
    """The objective's loss for one micro-batch, plus the trainer-vs-engine log-prob gap on its tokens
    (free: the forward pass already ran; not where the samples are the teacher's)."""
    loss, metrics = objective.loss(mb, out, step)
    if mb.rollout_logprobs is not None and not objective.needs.teacher_samples:
        metrics.update(logprob_gap(out.logprobs.detach(), mb.rollout_logprobs, mb.mask))
    return loss, metrics
