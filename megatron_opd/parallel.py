"""Process groups for megatron_opd: one place that turns a `ParallelConfig` into torch.distributed
and megatron-core parallel state (gloo on CPU, nccl on GPU).

Student, teacher and reference share one layout, so one set of groups serves all three models.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass
class ParallelConfig:
    """Parallel layout shared by the student, teacher and reference models."""

    tensor_model_parallel_size: int = 1
    """TP: splits attention heads, MLP columns and the vocabulary across ranks."""

    pipeline_model_parallel_size: int = 1
    """PP: splits the layers into consecutive stages."""

    expert_model_parallel_size: int = 1
    """EP: splits MoE experts across ranks (MoE models only; a dense model ignores it)."""

    expert_tensor_parallel_size: Optional[int] = None
    """ETP: splits each expert's weights across ranks; None = TP (megatron-core's default). MoE
    recipes use 1 (as NeMo-RL and slime do for Qwen3-30B-A3B): megatron-core needs the world size to be
    a multiple of ETP x EP x PP as well as of TP x PP."""

    backend: str = "auto"
    """torch.distributed backend: "auto" (nccl with CUDA, gloo without), "gloo" or "nccl"."""

    timeout_minutes: int = 30
    """Collective timeout; a hung rank fails after this instead of blocking the job forever."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.expert_tensor_parallel_size is not None and self.expert_tensor_parallel_size < 1:
            raise ValueError("parallel.expert_tensor_parallel_size must be >= 1 or null (= TP)")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"parallel.backend={self.backend!r}: use 'auto', 'gloo' or 'nccl'")
        from megatron_opd import platform

        platform.check_backend(self.backend)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def etp(self) -> int:
        """The effective expert-tensor-parallel size (TP when unset, as in megatron-core)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for a world size; raises if megatron-core would refuse the layout."""
        return validate_layout(self, world_size).dp


@dataclass(frozen=True)
class Layout:
    """A layout megatron-core accepts for one world size (see `validate_layout`)."""

    world: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    expert_dp: int


def validate_layout(config: ParallelConfig, world_size: int) -> Layout:
    """Apply megatron-core's own rules (`initialize_model_parallel`, its `RankGenerator`) to a layout
    for `world_size` ranks, without any process group. One check shared by the trainer,
    `launch.submit` and `tools.estimate_memory`, so a job megatron-core would refuse at start-up is
    refused before it is queued. The message names the product that does not divide and the fix.
    """
    tp, pp, ep, etp = (config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
                       config.expert_model_parallel_size, config.etp)
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} = {tp * pp} "
            "(parallel.tensor_model_parallel_size x parallel.pipeline_model_parallel_size); change the "
            "number of processes/GPUs or the parallel sizes"
        )
    if world_size % (etp * ep * pp):
        hint = (" (expert_tensor_parallel_size is unset, so ETP = TP)"
                if config.expert_tensor_parallel_size is None else "")
        raise ValueError(
            f"world size {world_size} is not divisible by ETP x EP x PP = {etp} x {ep} x {pp} = "
            f"{etp * ep * pp}{hint}: megatron-core refuses this layout. Set "
            "parallel.expert_tensor_parallel_size=1 (as NeMo-RL and slime do for Qwen3-30B-A3B), lower "
            "parallel.expert_model_parallel_size, or use a multiple of that many GPUs"
        )
    dp, expert_dp = world_size // (tp * pp), world_size // (etp * ep * pp)
    # megatron-core's own rank arithmetic: both generators must agree on the pipeline groups.
    from megatron.core.parallel_state import RankGenerator

    order = "tp-cp-ep-dp-pp"
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order=order)
    expert = RankGenerator(tp=etp, ep=ep, dp=expert_dp, pp=pp, cp=1, order=order)
    if dense.get_ranks("pp") != expert.get_ranks("pp"):
        raise ValueError(f"layout TP{tp} PP{pp} EP{ep} ETP{etp} on {world_size} ranks gives different "
                         "pipeline groups for dense and expert layers; megatron-core refuses it")
    return Layout(world=world_size, tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, expert_dp=expert_dp)


def resolve_backend(backend: str = "auto") -> str:
    from megatron_opd import platform

    return platform.default_backend() if backend == "auto" else backend


def initialize(config: ParallelConfig, seed: int = 1234, world_size: Optional[int] = None) -> None:
    """Initialise torch.distributed (from torchrun's env vars, or a 1-process group) and megatron's
    model-parallel state and RNG. Safe to call when torch.distributed is already initialised.
    `world_size`: the trainer's ranks when the job's last ranks run engines only (rollout.placement:
    dedicated): ranks 0 .. world_size-1 form torch.distributed's world, the others never join it."""
    from megatron.core import parallel_state, tensor_parallel

    from megatron_opd import platform

    platform.activate_platform()
    if not dist.is_initialized():
        backend = resolve_backend(config.backend)
        timeout = datetime.timedelta(minutes=config.timeout_minutes)
        if backend == "nccl":
            platform.bind_local_device()
        if "RANK" not in os.environ:
            # A single process without torchrun: an in-memory store, so no TCP port can collide
            # with another job on the machine.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        elif world_size is not None and world_size != launched_world_size():
            dist.init_process_group(backend=backend, timeout=timeout, rank=launched_rank(),
                                    world_size=world_size)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    config.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.etp,
        distributed_timeout_minutes=config.timeout_minutes,
        # On CPU the "default" groups are already gloo; extra gloo copies would only cost sockets.
        create_gloo_process_groups=platform.needs_extra_gloo_groups(),
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


def launched_world_size() -> int:
    """The number of ranks this job was launched with (torchrun's WORLD_SIZE; 1 without torchrun),
    known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current_layout() -> dict[str, int]:
    """The initialized layout's sizes (recorded in every checkpoint: a resume at another layout is said)."""
    from megatron.core import parallel_state as ps

    return {"world": dist.get_world_size() if dist.is_initialized() else 1,
            "tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size()}


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def launched_rank() -> int:
    """This process's global rank as launched (torchrun's RANK; 0 without torchrun), known before any
    process group exists."""
    return int(os.environ.get("RANK", "0"))
