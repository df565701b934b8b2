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
from megatron_opd.models.student import OptimConfig
from megatron_opd.parallel import ParallelConfig


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

    def __post_init__(self):
        if self.spec is not None and not Path(self.spec).is_file():
            raise ValueError(f"model spec file {self.spec!r} does not exist (see configs/models/)")


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
    """Refit streams weights in buckets of about this many MiB."""

    mismatch_probe_size: int = 2
    """Responses re-scored each step to report the trainer-vs-vLLM log-prob gap (0 disables)."""

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
    """true: continue from the newest checkpoint in out_dir if one exists, refusing a config that changed
    in anything but the run length, evaluation or logging (RESUMABLE_CHANGES); force: continue even so;
    false: start afresh (an earlier run's checkpoints are moved to checkpoints.previous/)."""

    skip_nonfinite: bool = True
    """Skip (and count) an update whose loss or grad norm is not finite instead of stopping."""

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


@dataclass
class ObjectiveConfig:
    """Which objective trains the student, and its hyper-parameters (see shared/ALGORITHMS.md)."""

    name: str = "gopd"
    """"gopd" (OPD / ExOPD / reward correction / multi-teacher; lam selects) or "reopold"."""

    lam: float = 1.0
    """G-OPD reward scale lambda: 1 = OPD; 1.25 = ExOPD; (0, 1) interpolation. lam != 1 needs a reference."""

    reward_correction: bool = False
    """Reference = the teacher's pre-RL base model (strong-to-weak); `reference.checkpoint` must be it."""

    eps_low: float = 0.2
    """PPO clip below (ratio >= 1 - eps_low)."""

    eps_high: float = 0.28
    """PPO clip above (ratio <= 1 + eps_high)."""

    dual_clip_c: Optional[float] = None
    """Dual clip for negative advantages (e.g. 3.0); None disables."""

    tis_cap: Optional[float] = 5.0
    """Token-level truncated importance sampling cap C against vLLM log-probs; None disables."""

    loss_agg_mode: str = "token-mean"
    """"token-mean", "seq-mean-token-sum" or "seq-mean-token-mean" (global normalisation)."""

    kl_coef: float = 0.0
    """Weight of an explicit KL(student || reference) loss term."""

    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3."""

    entropy_coef: float = 0.0
    """Entropy bonus weight."""

    reward_clip_mixture: Optional[float] = 0.2
    """REOPOLD: mixture weight m of the reward floor log(m / (1 - m)); None disables clipping."""

    entropy_top_beta: Optional[float] = 0.5
    """REOPOLD: keep tokens whose student entropy is in the top beta fraction; None keeps all."""

    switch_step: Optional[int] = None
    """REOPOLD: exploration -> refinement switch step; None = refinement (entropy selection) throughout."""

    def __post_init__(self):
        if self.name not in ("gopd", "reopold"):
            raise ValueError(f"objective.name={self.name!r}: use 'gopd' or 'reopold'")
        if self.lam <= 0:
            raise ValueError(f"objective.lam must be > 0, got {self.lam}")
        if self.loss_agg_mode not in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
            raise ValueError(f"objective.loss_agg_mode={self.loss_agg_mode!r} is not a known mode")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"objective.kl_estimator={self.kl_estimator!r}: use k1, k2 or k3")
        if self.entropy_top_beta is not None and not 0 < self.entropy_top_beta <= 1:
            raise ValueError("objective.entropy_top_beta must be in (0, 1]")
        if self.reward_clip_mixture is not None and not 0 < self.reward_clip_mixture < 1:
            raise ValueError("objective.reward_clip_mixture must be in (0, 1)")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError("objective.eps_low / eps_high must be >= 0")


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
    """Field holding the prompt text."""

    answer_key: str = "answer"
    """Field holding the verifiable answer."""

    domain_key: str = "domain"
    """Field holding the domain tag (multi-teacher routing); missing -> `default_domain`."""

    default_domain: str = "math"
    """Domain of prompts without a tag."""

    synthetic: Optional[str] = None
    """Generate prompts instead: "arithmetic" or "mixed" (arithmetic + string tasks)."""

    synthetic_digits: int = 2
    """Operand digits of the synthetic arithmetic task."""

    synthetic_train_size: int = 2000
    """Synthetic training prompts."""

    synthetic_eval_size: int = 64
    """Synthetic held-out prompts."""

    system_prompt: Optional[str] = None
    """Optional system message for the chat template."""

    def __post_init__(self):
        if self.synthetic is None and self.train_path is None:
            raise ValueError("data.train_path is required unless data.synthetic is set")
        if self.synthetic is None and self.eval_path is None and self.eval_holdout < 1:
            raise ValueError("data.eval_path is unset: give held-out prompts (data.eval_path=FILE) or carve "
                             "them out of the training file (data.eval_holdout=64)")
        if self.eval_holdout and (self.eval_path is not None or self.synthetic is not None):
            raise ValueError("data.eval_holdout applies only to file data without data.eval_path; remove it")
        if self.synthetic is not None and self.synthetic not in ("arithmetic", "mixed"):
            raise ValueError(f"data.synthetic={self.synthetic!r}: use 'arithmetic' or 'mixed'")
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

    def __post_init__(self):
        if not self.teachers and _REQUIRE_TEACHERS.get():
            raise ValueError("teachers: at least one teacher is required (teachers: [{checkpoint: ...}])")
        if len(self.teachers) > 1:
            domains = [t.domain for t in self.teachers]
            if any(d is None for d in domains) or len(set(domains)) != len(domains):
                raise ValueError(
                    "teachers: with several teachers each needs a distinct `domain` "
                    f"(got {domains})"
                )
        if self.objective.lam != 1.0 and self.objective.reward_correction and (
                self.reference is None or self.reference.checkpoint is None):
            raise ValueError(
                "objective.reward_correction=true needs reference.checkpoint = the teacher's pre-RL base"
            )
        if self.objective.name == "gopd" and self.objective.lam == 1.0 and self.objective.reward_correction:
            raise ValueError(
                "objective.reward_correction has no effect at objective.lam=1 (the reference cancels); "
                "set objective.lam (e.g. 1.25)"
            )
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
        """lam = 1 makes the reference cancel: no reference forward pass is run."""
        return self.objective.name == "gopd" and self.objective.lam != 1.0 or self.objective.kl_coef > 0


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

    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    cfg = OmegaConf.load(path)
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
        raise ValueError(f"config error: {exc}") from None
    finally:
        _REQUIRE_TEACHERS.reset(token)


def merged_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None):
    """The OmegaConf tree of schema + recipe chain + overrides, interpolations unresolved (load_config
    validates it; launch.submit ships it as one file)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.structured(OPDConfig)
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml_chain(Path(path)))
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return merged
    except OmegaConfBaseException as exc:
        raise ValueError(f"config error: {exc}") from None


def config_to_dict(cfg: OPDConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


#: What may change when a run resumes (`train.resume=true`): its length, evaluation, checkpoint cadence
#: and logging. Anything else (model, data, objective, optimizer, sampling, layout) would silently turn
#: the continuation into a different experiment, so it is refused unless `train.resume=force`.
RESUMABLE_CHANGES = (
    "train.steps", "train.eval_every", "train.eval_samples", "train.save_every", "train.keep_last",
    "train.resume", "train.out_dir", "data.eval_path", "data.synthetic_eval_size", "launch.time",
)


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
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]
