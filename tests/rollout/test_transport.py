"""Refit transport slots (rollout/transport.py): tensors packed into a slot come back bit-exact as
views, in another process too (the handle, not the bytes, crosses the process boundary)."""

import subprocess
import sys

import pytest
import torch

from megatron_opd.rollout.transport import ALIGN, SlotWriter, open_handle, share_handle, slot_bytes, slot_views


def test_packed_tensors_come_back_exact_as_aligned_views():
    tensors = [("a", torch.randn(3, 5)), ("b", torch.randn(7).to(torch.bfloat16)),
               ("c", torch.arange(11, dtype=torch.int64)), ("d", torch.randn(2, 3, 4).transpose(0, 2))]  # non-contiguous
    slot = torch.zeros(slot_bytes([[t.numel() * t.element_size() for _, t in tensors]]), dtype=torch.uint8)
    writer = SlotWriter(slot)
    for name, t in tensors:
        writer.add(name, t)
    assert all(s.offset % ALIGN == 0 for s in writer.layout)
    back = slot_views(slot, [s.as_tuple() for s in writer.layout])  # through the RPC's plain tuples
    for (name, t), (name2, v) in zip(tensors, back):
        assert name == name2 and v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
        assert v.untyped_storage().data_ptr() == slot.untyped_storage().data_ptr()  # a view, no copy
    assert writer.nbytes == sum(t.numel() * t.element_size() for _, t in tensors)


def test_a_bucket_larger_than_its_slot_is_refused():
    writer = SlotWriter(torch.zeros(ALIGN, dtype=torch.uint8))
    writer.add("small", torch.zeros(8))
    with pytest.raises(ValueError, match="overflows its transport slot .* at big"):
        writer.add("big", torch.zeros(1000))


def test_another_process_sees_and_writes_the_same_memory():
    from megatron_opd import platform

    buf = platform.shared_buffer(4096)
    buf[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    child = ("import sys, torch; from megatron_opd.rollout.transport import open_handle; "
             "t = open_handle(sys.stdin.buffer.read()); print(t[:4].tolist()); t[4:8] = 9")
    out = subprocess.run([sys.executable, "-c", child], input=share_handle(buf), capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "[1, 2, 3, 4]"
    assert buf[4:8].tolist() == [9, 9, 9, 9]
    assert torch.equal(open_handle(share_handle(buf)), buf)  # same process too
