"""Refit transport: two ping-pong buffers shared between the trainer and its engine's workers.

The trainer packs one bucket of HF-named tensors into a buffer slot while the engine loads the other
slot's bucket; the engine sees the slot through a *handle*, not bytes: the buffer is pickled with
torch.multiprocessing's reductions (`ForkingPickler`), which gives a shared-memory file name for a CPU
tensor and a CUDA IPC handle for a GPU tensor, and the worker unpickles it into a view of the same
memory. The only platform difference, how a shareable buffer is allocated, is `platform.shared_buffer`.

A bucket's layout in its slot is a list of `TensorSlot` records (name, dtype, shape, byte offset):
plain data, so it crosses vLLM's msgpack RPC as is.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch

#: Byte alignment of every tensor in a slot (covers every dtype's element size and SIMD loads).
ALIGN = 256


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor of a bucket lies in its slot."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the slot

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def as_tuple(self) -> tuple:
        return (self.name, self.dtype, list(self.shape), self.offset)

    @classmethod
    def from_tuple(cls, t) -> "TensorSlot":
        name, dtype, shape, offset = t
        return cls(name, dtype, tuple(shape), int(offset))


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def slot_bytes(buckets: list[list[int]]) -> int:
    """Capacity one slot needs for the largest bucket (each bucket given as its tensors' byte sizes)."""
    return max((sum(aligned(b) for b in bucket) for bucket in buckets), default=ALIGN)


class SlotWriter:
    """Packs tensors, one at a time, into a uint8 slot; `layout` is what the receiver needs."""

    def __init__(self, slot: torch.Tensor):
        self.slot = slot  # [capacity] uint8
        self.offset = 0
        self.layout: list[TensorSlot] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()  # a strided `t` is copied as it is: one pass, no temporary
        if self.offset + n > self.slot.numel():
            raise ValueError(f"refit bucket overflows its transport slot ({self.slot.numel()} bytes) at {name}")
        self.slot[self.offset:self.offset + n].view(t.dtype).view(t.shape).copy_(t)
        self.layout.append(TensorSlot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), self.offset))
        self.offset = aligned(self.offset + n)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layout)


def slot_views(slot: torch.Tensor, layout) -> list[tuple[str, torch.Tensor]]:
    """The named tensors a layout describes, as views of `slot` (no copy)."""
    out = []
    for s in map(lambda x: x if isinstance(x, TensorSlot) else TensorSlot.from_tuple(x), layout):
        out.append((s.name, slot[s.offset:s.offset + s.nbytes].view(getattr(torch, s.dtype)).view(s.shape)))
    return out


def share_handle(buffer: torch.Tensor) -> bytes:
    """A handle another process turns back into a view of `buffer` (`open_handle`): the pickled
    torch.multiprocessing reduction (a shared-memory file for CPU tensors, a CUDA IPC handle for GPU)."""
    from multiprocessing.reduction import ForkingPickler

    return bytes(ForkingPickler.dumps(buffer))


def open_handle(handle: bytes) -> torch.Tensor:
    return pickle.loads(handle)
