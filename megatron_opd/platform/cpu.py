"""CUDA -> CPU compatibility layer for megatron-core.

megatron-core assumes a GPU in a few dozen places (`torch.cuda.current_device()` as an allocation
device, `device="cuda"` literals in the optimizer / grad clipping / schedules, the CUDA RNG tracker,
`tensor.type() == "torch.cuda.FloatTensor"` checks). On a machine without CUDA we neutralise exactly
those assumptions here, once, so that the rest of megatron_opd never knows it runs on CPU.

Everything is gated on `torch.cuda.is_available()` being False and on the megatron-core version this
layer was written against: a different version fails loudly instead of half-working, because each
patch below names a specific call site of that version.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

#: The megatron-core releases whose CUDA call sites this layer was checked against.
SUPPORTED_MCORE_VERSIONS = ("0.16.1",)

_ACTIVE = False


def is_active() -> bool:
    """True once `activate()` patched megatron-core for CPU."""
    return _ACTIVE


def _cpu_device_of(device):
    """Map any CUDA device spec (str, torch.device or ordinal) to the CPU device."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device="cuda"` / `.cuda()` / `tensor.type()` inside megatron-core calls.

    megatron-core hard-codes CUDA in factory calls of its optimizer, grad clipping, grad scaler,
    schedules and checkpointing. A torch-function mode catches all of them without editing
    megatron's source. It is entered only around those megatron entry points (see `cuda_to_cpu`),
    not around model forward passes, so the hot path pays nothing for it.
    """

    _TYPE_NAMES = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Optimizer code checks `param.type() == 'torch.cuda.FloatTensor'`.
            name = func(*args)
            return self._TYPE_NAMES.get(name, name)
        if func is torch.Tensor.to:
            args = tuple(_cpu_device_of(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu_device_of(kwargs["device"])
        return func(*args, **kwargs)


class _TorchForSchedules(types.ModuleType):
    """`torch` as megatron-core's pipeline schedules see it: every attribute is torch's, except `zeros`,
    whose only CUDA use there is `torch.zeros([], dtype=torch.int, device="cuda")`."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device_of(kwargs["device"])
        return torch.zeros(*args, **kwargs)


def cuda_to_cpu():
    """Context manager: inside it, megatron-core's CUDA device literals resolve to the CPU.

    A no-op (null context) when CUDA is available.
    """
    import contextlib

    return _CudaToCpuMode() if _ACTIVE else contextlib.nullcontext()


def _wrap_in_mode(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    wrapper.__megatron_opd_cpu_wrapped__ = True
    return wrapper


def _patch_attr(owner, name, wrap=_wrap_in_mode):
    fn = getattr(owner, name)
    if getattr(fn, "__megatron_opd_cpu_wrapped__", False):
        return
    setattr(owner, name, wrap(fn))


def activate() -> bool:
    """Patch megatron-core for CPU execution when CUDA is absent. Idempotent.

    Returns:
        True if the CPU layer is active (no CUDA), False on a CUDA machine (nothing patched).

    Raises:
        RuntimeError: if the installed megatron-core is not a version this layer was written for.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available():
        return False

    import megatron.core

    version = megatron.core.__version__
    if version not in SUPPORTED_MCORE_VERSIONS:
        raise RuntimeError(
            f"megatron_opd's CPU compatibility layer was written for megatron-core "
            f"{SUPPORTED_MCORE_VERSIONS}, but {version} is installed. Install megatron-core==0.16.1 "
            f"(pinned in setup.py) or re-check the patched call sites in {__file__}."
        )

    # 1. Allocation device: dozens of `device=torch.cuda.current_device()` sites.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None

    # 2. RNG: megatron's model-parallel RNG tracker stores and swaps CUDA generator states. On CPU
    #    the tracked states are CPU generator states. Never route torch.cuda.manual_seed through
    #    torch.manual_seed: the latter calls the former (infinite recursion).
    from megatron.core.tensor_parallel import random as mp_random

    def _get_rng_state(*args, clone: bool = False, **kwargs):
        return torch.get_rng_state()

    def _set_rng_state(new_state, *args, **kwargs):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = _get_rng_state
    mp_random._set_cuda_rng_state = _set_rng_state
    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None

    # 3. The causal mask helper allocates on "cuda"; attention on CPU takes explicit masks, but
    #    some paths still call it.
    from megatron.core.transformer import utils as tf_utils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tf_utils.get_default_causal_mask = get_default_causal_mask
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = get_default_causal_mask  # imported by name there

    # 4. MoE router: moe_utils only binds `te_general_gemm` when Transformer Engine imports, then
    #    tests it for None -> NameError without TE. None selects the plain matmul path.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # 5. Entry points with `device="cuda"` literals / `.cuda()` / `.type()` checks: run them inside
    #    the rewriting mode. These are called once per step, not per layer.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer as mc_optimizer, grad_scaler
    from megatron.core.pipeline_parallel import schedules

    for owner, names in (
        (mc_optimizer.MegatronOptimizer, ("__init__",)),
        (mc_optimizer.MixedPrecisionOptimizer, ("__init__",)),
        (mc_optimizer.Float16OptimizerWithFloat16Params, ("__init__", "load_state_dict")),
        (mc_optimizer.FP32Optimizer, ("__init__", "step", "load_state_dict")),
        (mc_optimizer.ChainedOptimizer, ("step", "load_state_dict")),
        (grad_scaler.ConstantGradScaler, ("__init__",)),
        (grad_scaler.DynamicGradScaler, ("__init__", "load_state_dict")),
        # optim.use_distributed_optimizer: `.type() == 'torch.cuda.FloatTensor'` checks when the main
        # parameter groups are built, `device=torch.cuda.current_device()` / `.cuda()` in its state I/O.
        (distrib_optimizer.DistributedOptimizer, ("__init__", "load_state_dict", "get_parameter_state_dp_zero")),
    ):
        for name in names:
            if name in vars(owner):
                _patch_attr(owner, name)
    # Tied embeddings under PP: the last stage's output-layer copy is synced with `.cuda()` tensors.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _patch_attr(LanguageModule, "setup_embeddings_and_output_layer")
    for name in ("clip_grad_by_total_norm_fp32", "get_grad_norm_fp32", "count_zeros_fp32"):
        _patch_attr(clip_grads, name)
    # The optimizer module imported these by name.
    for name in ("clip_grad_by_total_norm_fp32", "get_grad_norm_fp32", "count_zeros_fp32"):
        if hasattr(mc_optimizer, name):
            setattr(mc_optimizer, name, getattr(clip_grads, name))
    # 6. The schedules allocate one token counter per call with `device="cuda"`. Wrapping the whole
    #    schedule in the rewriting mode (as for the entry points above) would route every op of every
    #    forward and backward through a Python hook; instead the schedules module sees a `torch` whose
    #    `zeros` maps CUDA devices to the CPU (benchmarks/bench_cpu_layer.py measures the difference).
    if not isinstance(schedules.torch, _TorchForSchedules):
        schedules.torch = _TorchForSchedules("torch")

    _ACTIVE = True
    logger.info("megatron-core %s patched for CPU execution (no CUDA device)", version)
    return True
