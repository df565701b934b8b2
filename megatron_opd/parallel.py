"""Process groups for megatron_opd: one place that turns a `ParallelConfig` into torch.distributed
and megatron-core parallel state (gloo on CPU, nccl on GPU).

Student, teacher and reference share one layout, so one set of groups serves all three models.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ParallelConfig:
    """Parallel layout shared by the student, teacher and reference models."""

    tensor_model_parallel_size: int = 1
    """TP: splits attention heads, MLP columns and the vocabulary across ranks."""

    pipeline_model_parallel_size: int = 1
    """PP: splits the layers into consecutive stages."""

    expert_model_parallel_size: int = 1
    """EP: splits MoE experts across the data-parallel ranks of a TP group (MoE models only)."""

    backend: str = "auto"
    """torch.distributed backend: "auto" (nccl with CUDA, gloo without), "gloo" or "nccl"."""

    timeout_minutes: int = 30
    """Collective timeout; a hung rank fails after this instead of blocking the job forever."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"parallel.backend={self.backend!r}: use 'auto', 'gloo' or 'nccl'")
        if self.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("parallel.backend='nccl' needs CUDA; use 'auto' or 'gloo' on CPU")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for a world size, validating that the layout fits it."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor x pipeline parallel size "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size}; "
                "change the number of processes or the parallel sizes"
            )
        dp = world_size // mp
        ep = self.expert_model_parallel_size
        if ep > 1 and (dp * self.tensor_model_parallel_size) % ep:
            raise ValueError(
                f"parallel.expert_model_parallel_size={ep} must divide data-parallel x tensor-parallel "
                f"size ({dp} x {self.tensor_model_parallel_size}) for world size {world_size}"
            )
        return dp


def resolve_backend(backend: str = "auto") -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def initialize(config: ParallelConfig, seed: int = 1234) -> None:
    """Initialise torch.distributed (from torchrun's env vars, or a 1-process group) and megatron's
    model-parallel state and RNG. Safe to call when torch.distributed is already initialised."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_opd.platform import activate_platform

    activate_platform()
    if not dist.is_initialized():
        backend = resolve_backend(config.backend)
        timeout = datetime.timedelta(minutes=config.timeout_minutes)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" not in os.environ:
            # A single process without torchrun: an in-memory store, so no TCP port can collide
            # with another job on the machine.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    config.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        distributed_timeout_minutes=config.timeout_minutes,
        # On CPU the "default" groups are already gloo; extra gloo copies would only cost sockets.
        create_gloo_process_groups=torch.cuda.is_available(),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron parallel state and the default process group, in that order."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0

