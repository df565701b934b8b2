"""The trainable student: Megatron DDP wrapper, Megatron optimizer and LR scheduler.

Teacher and reference never pass through here, so they hold no grad buffers or optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class OptimConfig:
    """Megatron optimizer and learning-rate schedule of the student."""

    lr: float = 1e-5
    """Peak learning rate (the papers use 1e-5 for 1.7B-4B students)."""

    min_lr: float = 0.0
    """Floor of the decay schedule."""

    lr_warmup_steps: int = 0
    """Linear warm-up steps."""

    lr_decay_style: str = "constant"
    """"constant", "linear" or "cosine" decay to min_lr over the run."""

    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.999
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    use_distributed_optimizer: bool = False
    """megatron's DistributedOptimizer: the fp32 main parameters and Adam state are sharded over the
    data-parallel replicas (each DP rank holds 1/DP of them), gradients are reduce-scattered instead of
    all-reduced and the updated parameters all-gathered after the step. Checkpoints go through
    dist_checkpointing like the plain optimizer's. Worth it whenever DP > 1 (at DP = 1 it equals the
    plain optimizer)."""

    overlap_grad_reduce: bool = False
    """Start each gradient bucket's reduction while the backward is still running (megatron DDP)."""

    overlap_param_gather: bool = False
    """With the distributed optimizer: all-gather the updated parameters bucket by bucket during the
    next forward instead of right after the step."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(
                f"optim.lr_decay_style={self.lr_decay_style!r}: use constant, linear or cosine"
            )
        if self.lr_warmup_steps < 0:
            raise ValueError("optim.lr_warmup_steps must be >= 0")
        if self.clip_grad < 0:
            raise ValueError("optim.clip_grad must be >= 0 (0 disables clipping)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be in [0, 1)")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("optim.overlap_param_gather needs optim.use_distributed_optimizer=true (the plain "
                             "optimizer has no parameter gather to overlap)")


def wrap_ddp(model: torch.nn.Module, config: Optional[OptimConfig] = None):
    """Wrap the student in megatron's DistributedDataParallel: fp32 gradient buffers (and fp32 gradient
    reduction) whatever the parameters' dtype; sharded for the distributed optimizer if asked."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_opd.models.forward import prepare_for_training

    config = config or OptimConfig()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=config.overlap_grad_reduce,
        use_distributed_optimizer=config.use_distributed_optimizer,
        overlap_param_gather=config.overlap_param_gather,
    )
    wrapped = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    wrapped.spec = model.spec
    prepare_for_training(wrapped)
    return wrapped


def gather_updated_params(model) -> None:
    """With `optim.overlap_param_gather`, megatron all-gathers the distributed optimizer's updated
    parameter shards during the *next* forward; the refit and the checkpoint read the student's
    parameters before that, so they are gathered now (synchronously; the next forward then finds them
    gathered). Without it the optimizer step has already gathered them: nothing to do."""
    if getattr(model, "ddp_config", None) is not None and model.ddp_config.overlap_param_gather:
        model.start_param_sync(force_sync=True)


def build_optimizer(model, config: OptimConfig, total_steps: int, updates_per_step: int = 1):
    """Megatron optimizer (AdamW, fp32 master weights when the model is bf16) and its scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    mc = model.config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=config.lr,
        min_lr=config.min_lr,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_eps=config.adam_eps,
        clip_grad=config.clip_grad,
        bf16=mc.bf16,
        fp16=mc.fp16,
        params_dtype=mc.params_dtype,
        use_distributed_optimizer=config.use_distributed_optimizer,
        overlap_param_gather=config.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, [model], use_gloo_process_groups=False)
    # The scheduler counts optimizer updates: `updates_per_step` of them per training step
    # (train.mini_batches), so warm-up and decay are given in training steps and scaled here.
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if config.lr_warmup_steps else config.lr,
        max_lr=config.lr,
        min_lr=config.min_lr,
        lr_warmup_steps=config.lr_warmup_steps * updates_per_step,
        lr_decay_steps=max(total_steps * updates_per_step, 1),
        lr_decay_style=config.lr_decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=max(total_steps * updates_per_step, 1),
        wd_incr_style="constant",
        # On resume the checkpoint restores the position (num_steps) only; the schedule's shape comes
        # from this run's config, so extending train.steps continues the decay over the new length
        # (megatron-core would otherwise reload the old length, and an extended run trains at min_lr).
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this rank holds: Adam's moments and, for bf16/fp16 parameters, the
    fp32 main copies (with the distributed optimizer, this rank's shard of each)."""
    total = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        for state in torch_opt.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        for group in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            for params in getattr(inner, group, None) or []:
                total += sum(p.numel() * p.element_size() for p in params)
    return total
