"""Platform adaptation: the only place that knows whether megatron-core runs on CPU or GPU."""

from typing import Optional

import torch


def activate_platform() -> bool:
    """Apply the CPU compatibility layer when CUDA is absent. Returns True on CPU."""
    if torch.cuda.is_available():
        return False
    from megatron_opd.platform import cpu

    return cpu.activate()


def device() -> torch.device:
    """The device model tensors live on for this process."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def on_gpu() -> bool:
    return torch.cuda.is_available()
