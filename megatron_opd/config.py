"""Typed, validated configuration of a megatron_opd run.

A recipe YAML (configs/recipes/*.yaml) is merged onto these dataclasses with OmegaConf: unknown keys
and wrong types are refused with the full key path, then each dataclass's `__post_init__` checks
values and cross-field constraints, before any process group, model or engine is created. A recipe
may name another with `base: <path>` (inheritance); command-line `key=value` overrides come last.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from megatron_opd.models.builder import PrecisionConfig
from megatron_opd.objectives.erpd import STAGE1_LOSSES, ERPDStage1Config, ERPDStage2Config
from megatron_opd.models.student import OptimConfig
from megatron_opd.parallel import ParallelConfig


TOKENIZER_MODES = ("same", "cross")


@dataclass
class ModelRoleConfig:
    """One model role: where its architecture and weights come from."""

    checkpoint: Optional[str] = None
    """HF checkpoint directory (safetensors + config.json). None only for the demo, which builds its own."""

    spec: Optional[str] = None
    """Model spec YAML (configs/models/). None: read the architecture from the checkpoint's config.json."""

    domain: Optional[str] = None
    """Multi-teacher routing: prompts whose domain tag equals this are scored by this teacher."""

    offload: bool = False
    """Teachers / reference: keep the weights in pinned host memory except while the model scores
    (GPU; the same calls run and do nothing on CPU). Refused for the student."""

    tokenizer: str = "same"
    """Teachers: "same" (the student's token ids are scored as they are; a different tokenizer is refused)
    or "cross" (another tokenizer: the response is decoded, re-tokenized and re-templated for the teacher,
    and per-span log-ratios become the token rewards; sampled-token objectives only; see
    megatron_opd/cross_tokenizer.py). The student and the reference are always "same"."""

    def __post_init__(self):
        if self.spec is not None and not Path(self.spec).is_file():
            raise ValueError(f"model spec file {self.spec!r} does not exist (see configs/models/)")
        if self.tokenizer not in TOKENIZER_MODES:
            raise ValueError(f"tokenizer={self.tokenizer!r}: use one of {TOKENIZER_MODES}")


@dataclass
class RolloutConfig:
    """vLLM generation of the student's on-policy samples."""

    n: int = 1
    """Samples per prompt (the G-OPD paper uses n=1)."""

    temperature: float = 1.0
    """Sampling temperature (log-probs are always reported at T=1: they are the policy's)."""

    top_p: float = 1.0
    """Nucleus sampling mass."""

    max_new_tokens: int = 256
    """Response length cap."""

    max_model_len: int = 1024
    """Prompt + response cap of the engine (and of trainer sequences)."""

    stop: List[str] = field(default_factory=list)
    """Stop strings (the chat template's end-of-turn token always stops)."""

    enable_thinking: Optional[bool] = None
    """Qwen3 chat-template switch: false = non-thinking prompts (Instruct-2507 / Non-Thinking
    teachers), true = thinking; None = the template's default. Refused for a template without it."""

    dtype: str = "float32"
    """Engine dtype; bfloat16 differs from the fp32 trainer by up to ~0.2 nats (see TIS)."""

    kv_cache_gib: float = 1.0
    """CPU engine: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."""

    gpu_memory_utilization: float = 0.5
    """GPU engine: fraction of device memory vLLM may take (colocated with training)."""

    refit_bucket_mb: int = 256
    """Refit streams weights in buckets of about this many MiB; two transport slots of the largest
    bucket's size are shared with each engine (the engine loads one while the trainer packs the other)."""

    tensor_parallel_size: int = 1
    """Engine TP, independent of the training layout: every group of this many ranks of a data-parallel
    replica hosts one engine (its shards on exactly those ranks' devices), so a job of W ranks runs
    W / tensor_parallel_size engines and every device generates (rollout/placement.py). Must divide
    TP x PP and the model's attention heads, and keep each engine on one node."""

    engines_per_replica: Optional[int] = None
    """null: every device of a replica hosts an engine shard (TP x PP / tensor_parallel_size engines per
    replica). A smaller divisor runs fewer engines (1 = one engine per replica, on its first rank),
    freeing their devices' memory for the models, at that much less generation throughput."""

    enforce_eager: Optional[bool] = None
    """vLLM without CUDA graphs; null = the platform's answer (eager on CPU, CUDA graphs on GPU)."""

    placement: str = "colocated"
    """colocated: the engines share the training ranks' devices (the fields above place them) and
    generation alternates with training. dedicated: the last `dedicated_ranks` ranks of the job run one
    engine each and nothing else; the training layout covers the other ranks; the student's weights are
    broadcast to them after every step (rollout/dedicated.py), and with train.max_staleness=1 they
    generate step k+1's batch while step k trains."""

    dedicated_ranks: Optional[int] = None
    """placement=dedicated: how many ranks (one engine of tensor_parallel_size 1 each) generate; must
    leave a world size the training layout divides. Refused with placement=colocated."""


    def __post_init__(self):
        if self.n < 1:
            raise ValueError("rollout.n must be >= 1")
        if self.temperature <= 0:
            raise ValueError("rollout.temperature must be > 0 (on-policy sampling)")
        if not 0 < self.top_p <= 1:
            raise ValueError("rollout.top_p must be in (0, 1]")
        if self.max_new_tokens < 1 or self.max_model_len <= self.max_new_tokens:
            raise ValueError(
                "rollout.max_new_tokens must be >= 1 and below rollout.max_model_len "
                f"(got {self.max_new_tokens} and {self.max_model_len})"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"rollout.dtype={self.dtype!r}: use float32, bfloat16 or float16")
        if self.refit_bucket_mb < 1:
            raise ValueError("rollout.refit_bucket_mb must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.tensor_parallel_size={self.tensor_parallel_size}: must be >= 1")
        if self.engines_per_replica is not None and self.engines_per_replica < 1:
            raise ValueError("rollout.engines_per_replica must be >= 1 or null (every device hosts an engine)")
        if self.placement not in ("colocated", "dedicated"):
            raise ValueError(f"rollout.placement={self.placement!r}: use colocated or dedicated")
        if self.placement == "colocated" and self.dedicated_ranks is not None:
            raise ValueError("rollout.dedicated_ranks is used by rollout.placement=dedicated only; remove it "
                             "or set rollout.placement=dedicated")
        if self.placement == "dedicated":
            if self.dedicated_ranks is None or self.dedicated_ranks < 1:
                raise ValueError("rollout.placement=dedicated needs rollout.dedicated_ranks >= 1 (the number "
                                 "of engine-only ranks at the end of the job)")
            if self.tensor_parallel_size != 1 or self.engines_per_replica is not None:
                raise ValueError("rollout.tensor_parallel_size / engines_per_replica place colocated engines; "
                                 "with rollout.placement=dedicated each dedicated rank runs one engine of TP 1: "
                                 "leave them at 1 / null")

    @property
    def engine_ranks(self) -> int:
        """Ranks of the job that run engines only (0 when colocated)."""
        return self.dedicated_ranks if self.placement == "dedicated" else 0


@dataclass
class TrainConfig:
    """The loop: batch sizes, length, evaluation and checkpoint cadence."""

    steps: int = 100
    """Optimizer steps (the papers: 50 same-size, 100 strong-to-weak)."""

    prompts_per_step: int = 64
    """Prompts per step across all data-parallel ranks (paper: 1024)."""

    micro_batch_size: int = 4
    """Sequences per forward/backward micro-batch on one rank; with max_tokens_per_micro_batch, the
    most sequences one micro-batch may hold."""

    max_tokens_per_micro_batch: Optional[int] = None
    """Token budget of a micro-batch (rows x its longest sequence, padding included): each mini-batch's
    sequences are sorted by length and cut into micro-batches of varying row count that fit it, each
    padded only to its own longest sequence. null: micro_batch_size rows in rollout order, each padded to
    its own longest. Must be >= rollout.max_model_len (one sequence always fits). The loss and gradients
    of a step do not depend on the cut (losses are normalised by the step's global token count)."""

    logprob_impl: str = "auto"
    """How every model's log p(sampled token) is computed from its last layer: "fused" (the LM-head GEMM,
    softmax statistics and their backward in token chunks over the response positions only, so no
    [tokens, V/tp] logits exist), "logits" (megatron's output layer materialises [b, s, V/tp] logits,
    then a chunked vocab-parallel softmax over the response positions) or "auto" (fused from 16,384
    vocabulary columns per TP rank, logits below; see README, "One OPD step", for the measurements)."""

    mini_batches: int = 1
    """Optimizer updates per rollout batch (>1: several clipped PPO-style updates on one batch)."""

    eval_every: int = 10
    """Held-out evaluation every this many steps (0: only at the start and the end)."""

    eval_samples: int = 4
    """k of avg@k in evaluation."""

    save_every: int = 10
    """Checkpoint every this many steps (0: only at the end)."""

    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted after a successful save)."""

    seed: int = 1234
    """Seed of data order, sampling and initialisation."""

    out_dir: str = "runs/opd"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard events, plots."""

    resume: str = "true"
    """true: continue from the newest complete checkpoint in out_dir if one exists, refusing a config that
    changed in anything but the run length, evaluation or logging (RESUMABLE_CHANGES) or the layout
    (LAYOUT_CHANGES: TP / PP / EP / data-parallel size, nodes; the checkpoint is resharded on load and
    the log says so); force: continue with any change, listed in the log; false: start afresh (an earlier
    run's outputs are moved to previous_runs/<N>/, never deleted)."""

    skip_nonfinite: bool = True
    """Skip (and count) an update whose loss or grad norm is not finite instead of stopping."""

    max_staleness: int = 0
    """Optimizer steps between the weights that generated a batch and the update that trains on it.
    0: synchronous (generate, then train, then refit). 1: one-step-off (rollout.placement=dedicated only):
    the engines generate step k+1's batch with step k's weights while step k trains; the objective's
    importance-sampling correction (tis_cap, is_mask) weighs each token by pi_current / pi_behaviour."""

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "micro_batch_size", "mini_batches", "eval_samples",
                     "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"train.max_tokens_per_micro_batch must be >= 1 or null, got "
                             f"{self.max_tokens_per_micro_batch}")
        if self.logprob_impl not in ("auto", "fused", "logits"):
            raise ValueError(f"train.logprob_impl={self.logprob_impl!r}: use auto, fused or logits")
        self.resume = str(self.resume).lower()  # YAML booleans arrive as "True" / "False"
        if self.resume not in ("true", "false", "force"):
            raise ValueError(f"train.resume={self.resume!r}: use true, false or force")
        if self.max_staleness not in (0, 1):
            raise ValueError(f"train.max_staleness={self.max_staleness}: use 0 (synchronous) or 1 (one-step-off)")


@dataclass(frozen=True)
class ObjectiveNeeds:
    """What an objective asks of a training step; the loop provides exactly this and nothing more."""

    teachers: bool = True
    """Teacher log-probs of the sampled tokens (mb.teacher_logprobs)."""

    reference: bool = False
    """Reference log-probs (mb.reference_logprobs): a reference model is built and run."""

    old_policy: bool = False
    """pi_old log-probs and entropies from a scoring pass before the first update (mb.old_logprobs,
    mb.old_entropy), for a batch-level selection (`Objective.prepare`)."""

    update_entropy: bool = False
    """The student's entropy in the update's forward pass (an entropy term in the loss)."""

    outcome_rewards: bool = False
    """The verifier's reward of each sample (mb.outcome_rewards [b]) and its prompt group
    (mb.group [b])."""

    teacher_hidden: bool = False
    """The teacher's final hidden states at the response positions and its LM-head shard
    (mb.teacher_hidden, mb.teacher_lm_head) and the student's (exact full-vocabulary KL)."""

    teacher_samples: bool = False
    """The step's samples come from the teacher (a rollout engine on teachers[0].checkpoint) instead of
    the student: off-policy distillation. The student's engine then only serves evaluation."""

    fused_logprobs: bool = False
    """Every log-prob of the run through the fused LM-head path: the objective reads final hidden states
    from it (ERPD's pi_old for its exact KL report) and compares models' log-probs, which must then all
    come from one path (train.logprob_impl: logits is refused)."""


KL_LOSS_ESTIMATORS = ("k2", "k3")  # k1's gradient is zero in expectation: not a loss term
GOPD_ESTIMATORS = ("sampled", "full", "topk")
REOPOLD_EXPLORATION_RULES = ("mask_below_floor", "clamp", "top_abs_reward")
REOPOLD_FLOOR_FORMS = ("log_odds", "log_m_scaled")


def _refuse(section: str, field_name: str, value, why: str) -> None:
    raise ValueError(f"objective.{section}.{field_name}={value!r} is not used {why}; remove it")


def _check_policy_loss(section: str, eps_low, eps_high, tis_cap, loss_agg_mode) -> None:
    if eps_low is not None and eps_low < 0 or eps_high is not None and eps_high < 0:
        raise ValueError(f"objective.{section}.eps_low / eps_high must be >= 0")
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"objective.{section}.tis_cap must be > 0 or null (no rollout correction)")
    if loss_agg_mode not in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        raise ValueError(f"objective.{section}.loss_agg_mode={loss_agg_mode!r}: use token-mean, "
                         "seq-mean-token-sum or seq-mean-token-mean")


def _check_is_mask(section: str, bounds) -> None:
    if bounds is None:
        return
    if len(bounds) != 2 or not 0 <= bounds[0] < 1 < bounds[1]:
        raise ValueError(f"objective.{section}.is_mask={list(bounds)}: give [low, high] with 0 <= low < 1 < high "
                         "(IcePop: [0.5, 5.0]), or null")


def _resolve_kl_term(section: str, cfg) -> None:
    """kl_estimator only means something with kl_coef > 0 (default k3 then); k1 is refused as a loss."""
    if cfg.kl_coef < 0:
        raise ValueError(f"objective.{section}.kl_coef must be >= 0")
    if cfg.kl_coef == 0:
        if cfg.kl_estimator is not None:
            _refuse(section, "kl_estimator", cfg.kl_estimator, "without a KL term (kl_coef = 0)")
        return
    if (cfg.kl_estimator or "k3") not in KL_LOSS_ESTIMATORS:
        raise ValueError(
            f"objective.{section}.kl_estimator={cfg.kl_estimator!r}: use k2 or k3 as a loss term (k1's "
            "gradient is zero in expectation, so a k1 KL term would not pull towards the reference)")


@dataclass
class LossTermsConfig:
    """The terms an objective's per-token loss may carry besides its core (shared by gopd and grpo)."""

    tis_cap: Optional[float] = 5.0
    """Truncated importance sampling cap C against the engine's log-probs; null disables. A sampled-token
    loss weights each token by its own ratio min(pi_old / pi_rollout, C); gopd's exact KL (estimator
    full / topk), whose value at a position does not depend on the token sampled there, by the ratio of
    the position's prefix, min(prod_{j<t} pi_old / pi_rollout, C) (`policy_loss.prefix_is_weights`)."""

    is_mask: Optional[List[float]] = None
    """[low, high]: masked importance sampling (IcePop-style): a token whose ratio pi_old / pi_rollout
    (the trainer's policy over the engine's, which with train.max_staleness=1 is one step older) leaves
    [low, high] is dropped from the loss (weight 0, the normaliser kept); inside, its weight is the ratio
    (truncated at tis_cap if set). null = off (default; IcePop uses [0.5, 5.0]). The exact KL masks by its
    prefix ratio, as tis_cap does."""

    loss_agg_mode: str = "token-mean"
    """"token-mean", "seq-mean-token-sum" or "seq-mean-token-mean" (global normalisation)."""

    kl_coef: float = 0.0
    """Weight of a KL(student || reference) loss term (> 0 runs the reference)."""

    kl_estimator: Optional[str] = None
    """With kl_coef > 0: "k3" (default) or "k2"; k1 is refused (zero-mean gradient)."""

    entropy_coef: float = 0.0
    """Entropy bonus weight (> 0 computes the student's entropy in the update)."""

    def _check_terms(self, section: str) -> None:
        _check_is_mask(section, self.is_mask)
        _resolve_kl_term(section, self)
        if self.entropy_coef < 0:
            raise ValueError(f"objective.{section}.entropy_coef must be >= 0")

    @property
    def kl_loss_estimator(self) -> str:
        return self.kl_estimator or "k3"


@dataclass
class GOPDConfig(LossTermsConfig):
    """G-OPD / ExOPD (objective.name: gopd): the token reward lam * log(pi_t / pi_ref) - log(pi / pi_ref)
    as a policy-gradient advantage (estimator: sampled), or the exact per-token KL to the teacher over
    the whole vocabulary or its top-k (estimator: full / topk)."""

    lam: float = 1.0
    """Reward scale lambda: 1 = OPD (no reference is run); 1.25 = ExOPD; (0, 1) interpolation.
    lam != 1 runs a reference (default: the student's initial weights)."""

    reward_correction: bool = False
    """Reference = the teacher's pre-RL base model (strong-to-weak); `reference.checkpoint` must be it."""

    estimator: str = "sampled"
    """"sampled": the log-ratio of the sampled token as a policy-gradient advantage (the papers');
    "full": the exact per-token KL over the whole vocabulary, vocabulary-parallel (lam = 1 only);
    "topk": the same KL over the teacher's top-k tokens and one tail bucket of the rest (vocab_kl.py)."""

    kl_direction: Optional[str] = None
    """full / topk: "reverse" = KL(student || teacher) (default; what OPD minimises) or "forward"."""

    top_k: Optional[int] = None
    """topk: the teacher's top tokens the KL is taken over, each its own bucket, with one tail bucket for
    the rest of each model's mass (required there)."""

    eps_low: Optional[float] = None
    """sampled: PPO clip below (ratio >= 1 - eps_low); null = 0.2."""

    eps_high: Optional[float] = None
    """sampled: PPO clip above (ratio <= 1 + eps_high); null = 0.28."""

    dual_clip_c: Optional[float] = None
    """sampled: dual clip for negative advantages (e.g. 3.0); null disables."""

    def __post_init__(self):
        if self.lam <= 0:
            raise ValueError(f"objective.gopd.lam must be > 0, got {self.lam}")
        if self.estimator not in GOPD_ESTIMATORS:
            raise ValueError(f"objective.gopd.estimator={self.estimator!r}: use one of {GOPD_ESTIMATORS}")
        _check_policy_loss("gopd", self.eps_low, self.eps_high, self.tis_cap, self.loss_agg_mode)
        self._check_terms("gopd")
        if self.estimator == "sampled":
            for name in ("kl_direction", "top_k"):
                if getattr(self, name) is not None:
                    _refuse("gopd", name, getattr(self, name), "by estimator=sampled (only full / topk)")
            if self.dual_clip_c is not None and self.dual_clip_c <= 1:
                raise ValueError(f"objective.gopd.dual_clip_c must be > 1, got {self.dual_clip_c}")
            return
        for name in ("eps_low", "eps_high", "dual_clip_c"):  # no ratio: the KL is differentiated directly
            if getattr(self, name) is not None:
                _refuse("gopd", name, getattr(self, name), f"by estimator={self.estimator} (no PPO ratio: the "
                        "exact KL is differentiated directly)")
        if self.lam != 1.0:
            raise ValueError(f"objective.gopd.estimator={self.estimator} is the exact KL to the teacher (lam = 1); "
                             f"lam={self.lam} (a reference-scaled reward) needs estimator=sampled")
        if self.kl_direction not in (None, "reverse", "forward"):
            raise ValueError(f"objective.gopd.kl_direction={self.kl_direction!r}: use reverse or forward")
        if self.estimator == "topk":
            if self.top_k is None or self.top_k < 1:
                raise ValueError("objective.gopd.estimator=topk needs objective.gopd.top_k >= 1 (e.g. 64)")
        elif self.top_k is not None:
            _refuse("gopd", "top_k", self.top_k, "by estimator=full (only topk)")

    # Resolved values of the fields whose null means "the default where it applies" (the schema keeps
    # null, so that a field set by a recipe can be told from one that was not).
    @property
    def clip(self) -> tuple[float, float]:
        return (0.2 if self.eps_low is None else self.eps_low, 0.28 if self.eps_high is None else self.eps_high)

    @property
    def direction(self) -> str:
        return self.kl_direction or "reverse"

    def needs(self) -> ObjectiveNeeds:
        return ObjectiveNeeds(teachers=True, reference=self.lam != 1.0 or self.kl_coef > 0,
                              update_entropy=self.entropy_coef > 0,
                              teacher_hidden=self.estimator != "sampled")


@dataclass
class REOPOLDConfig:
    """REOPOLD (objective.name: reopold; reconstructed from secondary sources, every rule switchable):
    the reward lp_t - lp_s floored at a mixture bound, tokens selected per phase — exploration (before
    switch_step) by the floor or by |reward|, refinement by the student's entropy."""

    mixture: Optional[float] = 0.2
    """Mixture weight m of the reward floor (see floor_form); null = no floor."""

    floor_form: str = "log_odds"
    """The floor as a function of m: "log_odds" = log(m / (1 - m)) (-1.386 at m = 0.2) or
    "log_m_scaled" = log(m) / (1 - m) (-2.012 at m = 0.2); secondary sources give both."""

    refinement_beta: Optional[float] = 0.5
    """Refinement phase: keep the tokens whose student entropy is in the top beta fraction of the
    batch's response tokens; null keeps all."""

    switch_step: Optional[int] = None
    """Exploration -> refinement at this step; null = refinement throughout."""

    exploration: Optional[str] = None
    """Exploration rule (only with switch_step): "mask_below_floor" (default: tokens whose reward is
    below the floor are dropped), "clamp" (raised to the floor, all kept) or "top_abs_reward" (clamped,
    then the top exploration_beta fraction by |reward| kept)."""

    exploration_beta: Optional[float] = None
    """top_abs_reward: the fraction of tokens kept."""

    eps_low: float = 0.2
    """PPO clip below."""

    eps_high: float = 0.28
    """PPO clip above."""

    tis_cap: Optional[float] = 5.0
    """Token-level truncated importance sampling cap; null disables."""

    is_mask: Optional[List[float]] = None
    """[low, high]: masked importance sampling, as objective.gopd.is_mask (null = off; IcePop: [0.5, 5.0])."""

    loss_agg_mode: str = "token-mean"
    """Loss aggregation (global normalisation; selected-out tokens count in the normaliser)."""

    def __post_init__(self):
        _check_policy_loss("reopold", self.eps_low, self.eps_high, self.tis_cap, self.loss_agg_mode)
        _check_is_mask("reopold", self.is_mask)
        if self.mixture is not None and not 0 < self.mixture < 1:
            raise ValueError("objective.reopold.mixture must be in (0, 1) or null")
        if self.floor_form not in REOPOLD_FLOOR_FORMS:
            raise ValueError(f"objective.reopold.floor_form={self.floor_form!r}: use one of {REOPOLD_FLOOR_FORMS}")
        if self.refinement_beta is not None and not 0 < self.refinement_beta <= 1:
            raise ValueError("objective.reopold.refinement_beta must be in (0, 1] or null")
        if self.switch_step is None:
            for name in ("exploration", "exploration_beta"):
                if getattr(self, name) is not None:
                    _refuse("reopold", name, getattr(self, name), "without an exploration phase (set "
                            "objective.reopold.switch_step)")
            return
        if self.switch_step < 0:
            raise ValueError("objective.reopold.switch_step must be >= 0")
        rule = self.exploration_rule
        if rule not in REOPOLD_EXPLORATION_RULES:
            raise ValueError(f"objective.reopold.exploration={rule!r}: use one of {REOPOLD_EXPLORATION_RULES}")
        if rule in ("mask_below_floor", "clamp") and self.mixture is None:
            raise ValueError(f"objective.reopold.exploration={rule} needs a floor: set "
                             "objective.reopold.mixture (e.g. 0.2)")
        if rule == "top_abs_reward":
            if self.exploration_beta is None or not 0 < self.exploration_beta <= 1:
                raise ValueError("objective.reopold.exploration=top_abs_reward needs exploration_beta in (0, 1]")
        elif self.exploration_beta is not None:
            _refuse("reopold", "exploration_beta", self.exploration_beta,
                    f"by exploration={rule} (only top_abs_reward)")

    @property
    def exploration_rule(self) -> str:
        return self.exploration or "mask_below_floor"

    def needs(self) -> ObjectiveNeeds:
        # pi_old's log-probs (the reward) and entropies (refinement) for the batch-level selection
        return ObjectiveNeeds(teachers=True, old_policy=True)


@dataclass
class GRPOConfig(LossTermsConfig):
    """GRPO baseline (objective.name: grpo): verifier rewards, advantages normalised within each
    prompt's group of rollout.n samples, the same clipped policy loss; no teacher."""

    normalize_std: bool = True
    """Divide by the group's reward std (GRPO); false = mean-centred only (Dr. GRPO)."""

    eps_low: float = 0.2
    """PPO clip below."""

    eps_high: float = 0.28
    """PPO clip above."""

    dual_clip_c: Optional[float] = None
    """Dual clip for negative advantages; null disables."""

    def __post_init__(self):
        _check_policy_loss("grpo", self.eps_low, self.eps_high, self.tis_cap, self.loss_agg_mode)
        self._check_terms("grpo")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"objective.grpo.dual_clip_c must be > 1, got {self.dual_clip_c}")

    def needs(self) -> ObjectiveNeeds:
        return ObjectiveNeeds(teachers=False, reference=self.kl_coef > 0, update_entropy=self.entropy_coef > 0,
                              outcome_rewards=True)


@dataclass
class ERPDConfig:
    """ERPD (objective.name: erpd; run with `megatron-opd erpd`): per rollout batch (prompts x rollout.n
    samples of pi_old, verifier rewards), stage 1 trains a teacher aggressively off-policy on that one
    batch, keeping a candidate every `candidate_every` steps; stage 2 computes the token signal
    S = lp_numerator - lp_denominator once, stores it with the batch, restores pi_old and distils S into
    it under a trust region. `iterations` > 1: the stage-2 student is the next batch's pi_old."""

    stage1: ERPDStage1Config = field(default_factory=ERPDStage1Config)
    """Stage-1 loss and its settings (grpo, sapo, ce, mse)."""

    ensemble_with: List[str] = field(default_factory=list)
    """More stage-1 losses, each trained from pi_old on the same batch; their signals are combined
    (`ensemble`). Empty: one teacher."""

    ensemble: Optional[str] = None
    """With ensemble_with: "sum" (each signal whitened, then summed; default) or "sequential" (distil
    one signal after the other, stage2_steps each)."""

    ensemble_strategies: Optional[List[int]] = None
    """With ensemble_with: the stage-2 strategy of each member, in the order [stage1.loss, *ensemble_with]:
    1 = the member over pi_old, 2 = the member over its early candidate `unlearned_step` (MSE members
    only). The paper's best row (Table 8: an MSE-unlearned signal plus a CE old-policy signal) is
    stage1.loss=mse, ensemble_with=[ce], ensemble_strategies=[2, 1]. null: stage2.strategy for every member."""

    stage1_steps: int = 40
    """Optimizer steps of stage 1 on the fixed batch: each is one update on one of its
    train.mini_batches mini-batches, in turn (mini_batches = 1: the whole batch every step)."""

    stage1_lr: float = 1.0e-4
    """Stage-1 learning rate (constant)."""

    candidate_every: int = 10
    """Keep (and evaluate on the held-out prompts) a stage-1 candidate every this many steps."""

    stage2: ERPDStage2Config = field(default_factory=ERPDStage2Config)
    """Stage-2 signal strategy and trust-region settings."""

    stage2_steps: int = 16
    """Optimizer steps of stage 2 on the batch, mini-batches in turn (the paper: 16-32, one epoch or
    less)."""

    stage2_lr: float = 1.0e-4
    """Stage-2 learning rate (constant)."""

    teacher_step: Optional[int] = None
    """The stage-1 candidate used as the signal's numerator (strategies 1 and 2); null = the last."""

    unlearned_step: Optional[int] = None
    """Strategy 2: the early ("unlearned") stage-1 candidate used as the denominator (required there)."""

    weak_checkpoint: Optional[str] = None
    """Strategy 3: HF checkpoint of an earlier, weaker policy (the denominator; numerator = pi_old)."""

    whiten: bool = True
    """Whiten each signal over the batch's response tokens (zero mean, unit std) before use."""

    iterations: int = 1
    """Rollout batches; each batch's stage-2 student is the next batch's pi_old."""

    def __post_init__(self):
        for name in ("stage1_steps", "stage2_steps", "candidate_every", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"objective.erpd.{name} must be >= 1")
        for name in ("stage1_lr", "stage2_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"objective.erpd.{name} must be > 0")
        for loss in self.ensemble_with:
            if loss not in STAGE1_LOSSES:
                raise ValueError(f"objective.erpd.ensemble_with: {loss!r} is not one of {STAGE1_LOSSES}")
        if self.ensemble_with:
            if (self.ensemble or "sum") not in ("sum", "sequential"):
                raise ValueError(f"objective.erpd.ensemble={self.ensemble!r}: use sum or sequential")
        elif self.ensemble is not None:
            raise ValueError(f"objective.erpd.ensemble={self.ensemble!r} is not used without ensemble_with; "
                             "remove it")
        candidates = set(range(self.candidate_every, self.stage1_steps + 1, self.candidate_every))
        candidates.add(self.stage1_steps)
        strategy = self.stage2.strategy
        if self.ensemble_strategies is not None:
            self._check_member_strategies(candidates)
            return
        if strategy == 3:
            for name in ("teacher_step", "unlearned_step"):
                if getattr(self, name) is not None:
                    raise ValueError(f"objective.erpd.{name} is not used by strategy 3 (numerator = pi_old); "
                                     "remove it")
            if self.weak_checkpoint is None:
                raise ValueError("objective.erpd.stage2.strategy=3 needs objective.erpd.weak_checkpoint (an HF "
                                 "checkpoint of an earlier, weaker policy: the signal's denominator)")
            if self.ensemble_with:
                raise ValueError("objective.erpd.ensemble_with: strategy 3 trains no stage-1 teacher")
            return
        if self.weak_checkpoint is not None:
            raise ValueError(f"objective.erpd.weak_checkpoint is used by strategy 3 only (strategy {strategy}); "
                             "remove it")
        if strategy == 2 and (self.stage1.loss != "mse" or self.ensemble_with):
            raise ValueError("objective.erpd.stage2.strategy=2 distils an MSE-trained policy over its early "
                             "checkpoint: set objective.erpd.stage1.loss=mse and no ensemble_with")
        self._check_candidate_steps(candidates, "objective.erpd.stage2.strategy=2" if strategy == 2 else None)

    def _check_candidate_steps(self, candidates: set, strategy_2: Optional[str]) -> None:
        """teacher_step must be a kept candidate, and unlearned_step an earlier one, used only where
        strategy 2 is (`strategy_2`: the setting that asks for it, named in the message; None: nowhere)."""
        if self.teacher_step is not None and self.teacher_step not in candidates:
            raise ValueError(f"objective.erpd.teacher_step={self.teacher_step} is not a kept candidate: use one "
                             f"of {sorted(candidates)} (multiples of candidate_every, and stage1_steps)")
        if strategy_2 is None:
            if self.unlearned_step is not None:
                raise ValueError("objective.erpd.unlearned_step is used by strategy 2 only; remove it")
            return
        if self.unlearned_step is None or self.unlearned_step not in candidates:
            raise ValueError(f"{strategy_2} needs objective.erpd.unlearned_step = an early kept candidate (one of "
                             f"{sorted(candidates)}), e.g. {min(candidates)}")
        if self.unlearned_step >= (self.teacher_step or self.stage1_steps):
            raise ValueError("objective.erpd.unlearned_step must come before the teacher step")

    def _check_member_strategies(self, candidates: set) -> None:
        members = self.stage1_losses
        if not self.ensemble_with:
            raise ValueError("objective.erpd.ensemble_strategies gives each ensemble member its strategy: it "
                             "needs ensemble_with (or use objective.erpd.stage2.strategy for one teacher)")
        if self.stage2.strategy != 1:
            raise ValueError("objective.erpd.stage2.strategy is replaced by ensemble_strategies; remove it")
        if len(self.ensemble_strategies) != len(members):
            raise ValueError(f"objective.erpd.ensemble_strategies={self.ensemble_strategies}: give one strategy "
                             f"per member of {members} (stage1.loss, then ensemble_with)")
        for loss, strategy in zip(members, self.ensemble_strategies):
            if strategy not in (1, 2):
                raise ValueError(f"objective.erpd.ensemble_strategies: {strategy} for {loss}: use 1 or 2 (strategy "
                                 "3 trains no stage-1 teacher)")
            if strategy == 2 and loss != "mse":
                raise ValueError(f"objective.erpd.ensemble_strategies: strategy 2 for {loss}: it distils an "
                                 "MSE-trained policy over its early candidate; give it to an mse member")
        if self.weak_checkpoint is not None:
            raise ValueError("objective.erpd.weak_checkpoint is used by strategy 3 only; remove it")
        self._check_candidate_steps(
            candidates, "objective.erpd.ensemble_strategies: strategy 2" if 2 in self.ensemble_strategies else None)

    @property
    def stage1_losses(self) -> list[str]:
        return [self.stage1.loss, *self.ensemble_with]

    @property
    def member_strategies(self) -> list[int]:
        """The stage-2 strategy of each stage-1 member (`stage1_losses` order)."""
        return list(self.ensemble_strategies or [self.stage2.strategy] * len(self.stage1_losses))

    def needs(self) -> ObjectiveNeeds:
        # pi_old's log-probs (stage-1 ratios, stage-2 trust region) and the verifier's rewards
        return ObjectiveNeeds(teachers=False, old_policy=True, outcome_rewards=True,
                              update_entropy=self.stage2.entropy_coef > 0, fused_logprobs=True)


@dataclass
class SFTObjectiveConfig:
    """SFT on teacher samples (objective.name: sft; the off-policy distillation baseline): each step the
    teacher samples responses to the step's prompts through its own vLLM engine and the student is
    trained on their negative log-likelihood. No Megatron teacher is built."""

    correct_only: bool = False
    """Train only on samples the verifier accepts (rejection sampling); false = every sample."""

    loss_agg_mode: str = "token-mean"
    """Aggregation of the per-token NLL (global normalisation)."""

    def __post_init__(self):
        _check_policy_loss("sft", None, None, None, self.loss_agg_mode)

    def needs(self) -> ObjectiveNeeds:
        return ObjectiveNeeds(teachers=False, teacher_samples=True, outcome_rewards=self.correct_only)


OBJECTIVE_SECTIONS = {"gopd": GOPDConfig, "reopold": REOPOLDConfig, "grpo": GRPOConfig, "erpd": ERPDConfig,
                      "sft": SFTObjectiveConfig}

#: Flat keys of the earlier ObjectiveConfig -> where they live now (a recipe using one gets told).
MOVED_OBJECTIVE_KEYS = {
    "lam": "gopd.lam", "reward_correction": "gopd.reward_correction", "eps_low": "<name>.eps_low",
    "eps_high": "<name>.eps_high", "dual_clip_c": "<name>.dual_clip_c", "tis_cap": "<name>.tis_cap",
    "loss_agg_mode": "<name>.loss_agg_mode", "kl_coef": "<name>.kl_coef",
    "kl_estimator": "<name>.kl_estimator", "entropy_coef": "<name>.entropy_coef",
    "reward_clip_mixture": "reopold.mixture", "entropy_top_beta": "reopold.refinement_beta",
    "switch_step": "reopold.switch_step",
}


@dataclass
class ObjectiveConfig:
    """Which objective trains the student (`name`) and its own section; the sections of the other
    objectives must be absent (a recipe inheriting one sets it to null)."""

    name: str = "gopd"
    """"gopd" (OPD / ExOPD / reward correction / multi-teacher / exact KL), "reopold", "grpo", "sft"
    (SFT on teacher samples) with `megatron-opd train`, or "erpd" (the two-stage pipeline:
    `megatron-opd erpd`)."""

    gopd: Optional[GOPDConfig] = None
    """Settings of objective.name=gopd (defaults when absent)."""

    reopold: Optional[REOPOLDConfig] = None
    """Settings of objective.name=reopold (defaults when absent)."""

    grpo: Optional[GRPOConfig] = None
    """Settings of objective.name=grpo (defaults when absent)."""

    erpd: Optional[ERPDConfig] = None
    """Settings of objective.name=erpd (defaults when absent; `megatron-opd erpd`)."""

    sft: Optional[SFTObjectiveConfig] = None
    """Settings of objective.name=sft (defaults when absent)."""

    def __post_init__(self):
        if self.name not in OBJECTIVE_SECTIONS:
            raise ValueError(f"objective.name={self.name!r}: use one of {tuple(OBJECTIVE_SECTIONS)}")
        for other in OBJECTIVE_SECTIONS:
            if other != self.name and getattr(self, other) is not None:
                raise ValueError(
                    f"objective.{other} is set but objective.name={self.name}: its settings would be "
                    f"ignored. Remove objective.{other} (a recipe inheriting it: `{other}: null`) or set "
                    f"objective.name={other}")
    @property
    def settings(self):
        """The chosen objective's section (its defaults when the recipe gives none)."""
        return getattr(self, self.name) or OBJECTIVE_SECTIONS[self.name]()

    def needs(self) -> ObjectiveNeeds:
        return self.settings.needs()


@dataclass
class DataSection:
    """Training and held-out prompts."""

    train_path: Optional[str] = None
    """Local jsonl/parquet file or a HF dataset name; None with `synthetic` set."""

    eval_path: Optional[str] = None
    """Held-out prompts (same formats)."""

    eval_holdout: int = 0
    """Without eval_path: carve this many prompts (the file's last ones) out of train_path for held-out
    evaluation; they are never trained on. One of eval_path / eval_holdout is required for file data."""

    prompt_key: str = "prompt"
    """Field holding the prompt: its text (sent as the user message) or a chat message list
    ([{role, content}, ...], roles system/user/assistant, ending with the user's) used as the
    conversation. A dotted path reaches into nested records (`extra.question`)."""

    answer_key: str = "answer"
    """Field holding the verifiable answer (graded by math-verify); a dotted path reaches into nested
    records (`reward_model.ground_truth`)."""

    domain_key: str = "domain"
    """Field holding the domain tag (multi-teacher routing; dotted paths too); missing -> `default_domain`."""

    default_domain: str = "math"
    """Domain of prompts without a tag."""

    synthetic: Optional[str] = None
    """Generate prompts instead: "arithmetic" (addition, domain math), "string" (string reversal, domain
    code) or "mixed" (the two alternating)."""

    synthetic_digits: int = 2
    """Operand digits of the synthetic arithmetic task."""

    synthetic_train_size: int = 2000
    """Synthetic training prompts drawn (those equal to a held-out prompt are dropped)."""

    synthetic_eval_size: int = 64
    """Synthetic held-out prompts."""

    synthetic_seed: Optional[int] = None
    """Seed of the synthetic training and held-out prompts; null = train.seed. A study fixes it so that
    runs with different train.seed (sampling, order) see the same data and are scored on the same prompts."""

    system_prompt: Optional[str] = None
    """Optional system message put before every prompt's conversation. Refused when a prompt's message
    list carries its own system message (one of the two must go)."""

    def __post_init__(self):
        if self.synthetic is None and self.train_path is None:
            raise ValueError("data.train_path is required unless data.synthetic is set")
        if self.synthetic is None and self.eval_path is None and self.eval_holdout < 1:
            raise ValueError("data.eval_path is unset: give held-out prompts (data.eval_path=FILE) or carve "
                             "them out of the training file (data.eval_holdout=64)")
        if self.eval_holdout and (self.eval_path is not None or self.synthetic is not None):
            raise ValueError("data.eval_holdout applies only to file data without data.eval_path; remove it")
        from megatron_opd.data.synthetic import SYNTHETIC_KINDS

        if self.synthetic is not None and self.synthetic not in SYNTHETIC_KINDS:
            raise ValueError(f"data.synthetic={self.synthetic!r}: use one of {SYNTHETIC_KINDS}")
        # File existence is checked where the job runs (trainer start-up, before any model is built),
        # not here: recipes are also validated on submit hosts that do not mount the data.


@dataclass
class LaunchSection:
    """How `launch/submit.py` places the job on a cluster (ignored by local runs)."""

    nodes: int = 1
    """Trainer nodes."""

    gpus_per_node: int = 8
    """GPUs (= trainer processes) per node."""

    time: str = "04:00:00"
    """SLURM time limit."""

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError("launch.nodes and launch.gpus_per_node must be >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases logging of the step metrics (beside metrics.jsonl and TensorBoard)."""

    project: str = ""
    """W&B project (required)."""

    name: Optional[str] = None
    """Run name; null = the name of train.out_dir."""

    entity: Optional[str] = None
    """W&B team or user; null = the logged-in account's default."""

    mode: str = "online"
    """online (needs `wandb login` or WANDB_API_KEY; written, not run here: no W&B server is reachable),
    or offline (a run directory under <out_dir>/wandb/ to `wandb sync` later; tested)."""

    def __post_init__(self):
        if not self.project:
            raise ValueError("metrics.wandb.project is required (metrics.wandb={project: my-project}); "
                             "remove metrics.wandb to log to TensorBoard only")
        if self.mode not in ("online", "offline"):
            raise ValueError(f"metrics.wandb.mode={self.mode!r}: use online or offline (remove metrics.wandb "
                             "to turn W&B off)")


@dataclass
class MetricsSection:
    """Where step metrics go besides metrics.jsonl, TensorBoard and curves.png (always written)."""

    wandb: Optional[WandbConfig] = None
    """Weights & Biases; null (the default) = not used, not imported. A resumed run continues the same
    W&B run (its id is kept in <out_dir>/wandb_run_id)."""


@dataclass
class OPDConfig:
    """A full on-policy distillation run."""

    student: ModelRoleConfig = field(default_factory=ModelRoleConfig)
    """The trainable model (also the vLLM rollout policy)."""

    teachers: List[ModelRoleConfig] = field(default_factory=list)
    """One teacher, or several with `domain` set (multi-teacher)."""

    reference: Optional[ModelRoleConfig] = None
    """Reference for lam != 1 (default: the student's initial weights) or reward correction."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/EP layout shared by all models."""

    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numerics (fp32 on CPU; bf16 / FP8 on GPU)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Student optimizer and LR schedule."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The distillation objective."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """vLLM sampling and refit."""

    data: DataSection = field(default_factory=lambda: DataSection(synthetic="arithmetic"))
    """Prompts."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop settings."""

    launch: LaunchSection = field(default_factory=LaunchSection)
    """Cluster placement (launch/)."""

    metrics: MetricsSection = field(default_factory=MetricsSection)
    """Metrics sinks beyond the run directory's own (W&B)."""

    def __post_init__(self):
        needs, name = self.objective.needs(), self.objective.name
        if self.train.max_staleness and self.rollout.placement != "dedicated":
            raise ValueError("train.max_staleness=1 generates the next batch while this one trains, which "
                             "needs engines on their own ranks: set rollout.placement=dedicated and "
                             "rollout.dedicated_ranks, or train.max_staleness=0")
        if self.rollout.placement == "dedicated" and (needs.teacher_samples or name == "erpd"):
            raise ValueError(f"rollout.placement=dedicated: objective.name={name} runs its own engines "
                             "(teacher samples / ERPD's fixed batch) and is colocated only; use "
                             "rollout.placement=colocated")
        if needs.teacher_samples:
            if len(self.teachers) != 1 and _REQUIRE_TEACHERS.get():
                raise ValueError(f"teachers: objective.name={name} samples from one teacher's engine: give exactly "
                                 f"one teacher (got {len(self.teachers)})")
            if self.teachers and (self.teachers[0].offload or self.teachers[0].domain is not None):
                raise ValueError("teachers[0].offload / domain are not used by objective.name=sft (the teacher "
                                 "only samples, through its engine); remove them")
        elif not needs.teachers and self.teachers:
            raise ValueError(f"teachers: objective.name={name} uses no teacher; remove them (teachers: [])")
        if needs.teachers and not self.teachers and _REQUIRE_TEACHERS.get():
            raise ValueError("teachers: at least one teacher is required (teachers: [{checkpoint: ...}])")
        if len(self.teachers) > 1:
            domains = [t.domain for t in self.teachers]
            if any(d is None for d in domains) or len(set(domains)) != len(domains):
                raise ValueError(
                    "teachers: with several teachers each needs a distinct `domain` "
                    f"(got {domains})"
                )
        for role, m in [("student", self.student), ("reference", self.reference)]:
            if m is not None and m.tokenizer != "same":
                raise ValueError(f"{role}.tokenizer={m.tokenizer!r}: only teachers may have another tokenizer "
                                 f"(the {role} scores the student's own token ids); remove it")
        cross = [i for i, t in enumerate(self.teachers) if t.tokenizer == "cross"]
        if cross and (not needs.teachers or needs.teacher_hidden):
            why = ("the exact KL (estimator full / topk) compares two distributions over one vocabulary; use "
                   "objective.gopd.estimator=sampled" if needs.teacher_hidden else
                   f"objective.name={name} scores no teacher's log-probs of the student's samples")
            raise ValueError(f"teachers[{cross[0]}].tokenizer=cross is not supported here: {why}")
        if self.reference is not None and not needs.reference and _REQUIRE_TEACHERS.get():
            raise ValueError(
                f"reference is set but objective.name={name} with these settings runs no reference (G-OPD: "
                "lam = 1 cancels it; a KL term needs kl_coef > 0); remove it (reference: null)")
        gopd = self.objective.settings if name == "gopd" else None
        if gopd is not None and gopd.reward_correction:
            if gopd.lam == 1.0:
                raise ValueError("objective.gopd.reward_correction has no effect at lam = 1 (the reference "
                                 "cancels); set objective.gopd.lam (e.g. 1.25)")
            if self.reference is None or self.reference.checkpoint is None:
                raise ValueError("objective.gopd.reward_correction=true needs reference.checkpoint = the "
                                 "teacher's pre-RL base")
        if needs.teacher_hidden and self.train.logprob_impl == "logits":
            raise ValueError("train.logprob_impl=logits: objective.gopd.estimator=full/topk computes the KL from "
                             "both models' hidden states and LM heads; use auto or fused")
        if needs.fused_logprobs and self.train.logprob_impl == "logits":
            raise ValueError(f"train.logprob_impl=logits: objective.name={name} reads pi_old's hidden states "
                             "through the fused LM-head path, and its signals compare log-probs that must all "
                             "come from that one path; use auto or fused")
        if needs.outcome_rewards and self.rollout.n < 2:
            raise ValueError(f"objective.name={name} normalises rewards within each prompt's samples: set "
                             "rollout.n >= 2 (e.g. 8)")
        if self.optim.lr_warmup_steps >= self.train.steps:
            raise ValueError(
                f"optim.lr_warmup_steps={self.optim.lr_warmup_steps} must be below "
                f"train.steps={self.train.steps}; lower the warm-up or train longer"
            )
        if self.student.offload:
            raise ValueError("student.offload=true: only frozen roles (teachers[i].offload, reference.offload) "
                             "can be parked in host memory; the student trains every step")
        if self.student.domain is not None:
            raise ValueError("student.domain is a teacher field (multi-teacher routing); remove it")
        budget = self.train.max_tokens_per_micro_batch
        if budget is not None and budget < self.rollout.max_model_len:
            raise ValueError(
                f"train.max_tokens_per_micro_batch={budget} is below rollout.max_model_len="
                f"{self.rollout.max_model_len}: a sequence of that length would fit no micro-batch; raise "
                "the budget to at least max_model_len")

    @property
    def needs_reference(self) -> bool:
        """Whether the objective runs a reference model (G-OPD: lam != 1 or a KL term)."""
        return self.objective.needs().reference


def _resolve_spec_paths(cfg, recipe_dir: Path) -> None:
    """A relative `spec:` in a recipe is relative to that recipe's file, like `base:` (so a recipe works
    from any working directory); on the command line it stays relative to the working directory."""
    roles = [cfg.get("student"), cfg.get("reference"), *(cfg.get("teachers") or [])]
    for role in roles:
        spec = role.get("spec") if role is not None and hasattr(role, "get") else None
        if isinstance(spec, str) and "${" not in spec and not os.path.isabs(spec):
            role["spec"] = str((recipe_dir / spec).resolve())


def _load_yaml_chain(path: Path):
    from omegaconf import OmegaConf

    import yaml
    from omegaconf import DictConfig

    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as exc:  # PyYAML's 30-line report: the file, line and column are what matter
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config file {path}: YAML syntax error{where} ({problem}); fix it there") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"config file {path} holds a {type(cfg).__name__}, not a mapping of sections "
                         "(train:, data:, ...); see configs/recipes/ for the layout")
    _resolve_spec_paths(cfg, path.parent)
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
    return OmegaConf.merge(_load_yaml_chain(base_path.resolve()), cfg)


#: Whether OPDConfig demands a teacher. Only `megatron-opd eval` (which samples the student and scores it
#: with the verifier) lifts it, through load_config(require_teachers=False): a context variable because
#: OmegaConf builds the dataclass (and runs __post_init__) itself.
_REQUIRE_TEACHERS: ContextVar[bool] = ContextVar("require_teachers", default=True)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                require_teachers: bool = True) -> OPDConfig:
    """Recipe YAML (+ its `base:` chain) + `key=value` overrides -> validated OPDConfig.

    Args:
        require_teachers: False for commands that use no teacher (evaluation).

    Raises:
        ValueError: with the offending key path, for unknown keys, wrong types and bad values.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    token = _REQUIRE_TEACHERS.set(require_teachers)
    try:
        return OmegaConf.to_object(merged_config(path, overrides))
    except OmegaConfBaseException as exc:
        raise ValueError(config_error(exc)) from None
    finally:
        _REQUIRE_TEACHERS.reset(token)


def merged_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None):
    """The OmegaConf tree of schema + recipe chain + overrides, interpolations unresolved (load_config
    validates it; launch.submit ships it as one file)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.structured(OPDConfig)
        layers = [_load_yaml_chain(Path(path))] if path is not None else []
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        for layer in layers:
            _refuse_moved_objective_keys(layer)
            merged = OmegaConf.merge(merged, layer)
        return merged
    except OmegaConfBaseException as exc:
        raise ValueError(config_error(exc)) from None


def config_error(exc) -> str:
    """One line for an OmegaConf error: the field first, then what is wrong (OmegaConf's own text puts
    the field on a later line among its internal reference and object types)."""
    what = (getattr(exc, "msg", None) or str(exc)).splitlines()[0].strip()
    key = getattr(exc, "full_key", None)
    return f"config error at {key}: {what}" if key else f"config error: {what}"


def _refuse_moved_objective_keys(layer) -> None:
    """A recipe written for the flat objective section (objective.lam, ...) gets told where each key
    lives now instead of OmegaConf's bare "key not in ObjectiveConfig"."""
    objective = layer.get("objective") if hasattr(layer, "get") else None
    if not hasattr(objective, "keys"):
        return
    for key in objective.keys():
        if key in MOVED_OBJECTIVE_KEYS:
            name = objective.get("name", "gopd")
            raise ValueError(f"objective.{key}: each objective has its own section now; use "
                             f"objective.{MOVED_OBJECTIVE_KEYS[key].replace('<name>', str(name))} "
                             "(README, configuration reference)")


def config_to_dict(cfg: OPDConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


#: What may change when a run resumes (`train.resume=true`): its length, evaluation, checkpoint cadence
#: and logging. Anything else (model, data, objective, optimizer, sampling, layout) would silently turn
#: the continuation into a different experiment, so it is refused unless `train.resume=force`.
RESUMABLE_CHANGES = (
    "train.steps", "train.eval_every", "train.eval_samples", "train.save_every", "train.keep_last",
    "train.resume", "train.out_dir", "data.eval_path", "data.synthetic_eval_size", "launch.time", "metrics",
)


#: The training and engine layout: a checkpoint is resharded to a new one on load (megatron-core's
#: dist_checkpointing), so changing these on resume continues the same run at another size (a cluster
#: shrinks, a job moves from 32 to 16 GPUs). Allowed by `train.resume=true` and said in the log; the
#: data-parallel size, set by the world size, is compared from the checkpoint's recorded layout.
LAYOUT_CHANGES = (
    "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
    "parallel.expert_model_parallel_size", "parallel.expert_tensor_parallel_size", "parallel.backend",
    "parallel.timeout_minutes", "launch.nodes", "launch.gpus_per_node", "rollout.tensor_parallel_size",
    "rollout.placement", "rollout.dedicated_ranks",
)


#: Keys that configs written by earlier versions hold and this one no longer has (resuming such a run is
#: not a config change): rollout.mismatch_probe_size was accepted and never read (the trainer-vs-engine gap
#: is measured on every trained token, free, from the training forward).
RETIRED_KEYS = ("rollout.mismatch_probe_size",)


def config_changes(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every leaf that differs between two config_to_dict() trees, except the
    RESUMABLE_CHANGES."""

    def leaves(tree, prefix=""):
        if isinstance(tree, dict):
            for k, v in tree.items():
                yield from leaves(v, f"{prefix}{k}.")
        elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
            for i, v in enumerate(tree):
                yield from leaves(v, f"{prefix[:-1]}[{i}].")
        else:
            yield prefix[:-1], tree

    a, b = dict(leaves(old)), dict(leaves(new))
    kept = RESUMABLE_CHANGES + RETIRED_KEYS  # a key or every key under it
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if not any(k == r or k.startswith(r + ".") for r in kept) and a.get(k) != b.get(k)]
