"""Refit: stream the sharded Megatron student's weights into the live vLLM engine after each step.

Collective over all trainer ranks: TP shards are gathered, experts collected across EP ranks and PP
stages sent to global rank 0 (megatron_opd.models.hf_mapping.export_hf_weights), renamed to HF names
by the one shared mapping, and handed to the engine in buckets of about `bucket_mb` MiB. Bucket
boundaries fall between Megatron parameters, so fused groups (q/k/v, gate/up) always arrive whole.

Nothing half-loaded: before the first byte moves, the full manifest (names and shapes the exporter
will produce) is checked against what the engine's model consumes, and every bucket is checked
against that manifest before it is handed over. Afterwards the prefix cache is reset (see
RolloutEngine.reset_prefix_cache).

GPU modes (structured here, exercised only on GPU clusters):
- colocated: the engine sleeps during training (`engine.sleep()` frees weights + KV cache) and wakes
  for the refit; buckets are GPU tensors handed over in-process (CUDA IPC in multi-process engines).
- separate: dedicated rollout nodes (launch/ heterogeneous job); rank 0 streams buckets over a
  NCCL group shared with the rollout workers (vLLM's weight-transfer engine).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.models.hf_mapping import export_hf_weights, hf_tensor_shapes


class RefitError(ValueError):
    """The weights do not match the engine's model; nothing was loaded."""


@dataclass
class RefitStats:
    seconds: float = 0.0
    load_seconds: float = 0.0  # inside the engine's load (vLLM reload_weights, incl. its CPU repacking)
    bytes: int = 0
    buckets: int = 0


def check_manifest(produced: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Raise RefitError naming missing / extra / mis-shaped tensors."""
    missing = sorted(set(expected) - set(produced))
    extra = sorted(set(produced) - set(expected))
    shapes = sorted(n for n in set(produced) & set(expected) if tuple(produced[n]) != tuple(expected[n]))
    problems = []
    if missing:
        problems.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    if shapes:
        problems.append("mis-shaped " + ", ".join(f"{n} {tuple(produced[n])} != {tuple(expected[n])}"
                                                   for n in shapes[:4]))
    if problems:
        raise RefitError("refit refused, nothing loaded: " + "; ".join(problems))


def update_weights(engine, named_tensors: list[tuple[str, torch.Tensor]], reset_cache: bool = True) -> None:
    """Load a complete set of HF-named tensors into `engine`, all or nothing."""
    produced = {n: tuple(t.shape) for n, t in named_tensors}
    if len(produced) != len(named_tensors):
        raise RefitError("refit refused, nothing loaded: duplicate tensor names")
    check_manifest(produced, engine.expected_tensors())
    dtype = getattr(torch, engine.cfg.dtype)
    engine.load_weights([(n, t.to(dtype)) for n, t in named_tensors])
    if reset_cache:
        engine.reset_prefix_cache()


def refit(engine, model, spec, bucket_mb: int = 256, reset_cache: bool = True) -> RefitStats:
    """Collective: push `model`'s current weights into `engine` (which lives on global rank 0 only;
    pass None elsewhere). Returns timing and volume on rank 0."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    t0 = time.perf_counter()
    manifest = hf_tensor_shapes(spec)
    # Rank 0 decides; everyone learns the verdict before any collective of the export starts, so a
    # refused refit raises on every rank instead of leaving the others blocked in an all-gather.
    verdict = [None]
    if rank == 0:
        if engine is None:
            raise RefitError("refit: global rank 0 must own the rollout engine")
        try:
            check_manifest(manifest, engine.expected_tensors())
        except RefitError as exc:
            verdict = [str(exc)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise RefitError(verdict[0])

    stats = RefitStats()
    dtype = getattr(torch, engine.cfg.dtype) if engine is not None else None
    for bucket in export_hf_weights(model, spec, bucket_bytes=bucket_mb * 2**20, dtype=dtype):
        for name, t in bucket:  # cheap per-bucket re-check against the manifest
            if manifest.get(name) != tuple(t.shape):
                raise RefitError(f"refit: exporter produced {name} {tuple(t.shape)}, expected "
                                 f"{manifest.get(name)}")
        t_load = time.perf_counter()
        engine.load_weights(bucket)
        stats.load_seconds += time.perf_counter() - t_load
        stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        stats.buckets += 1
    if engine is not None and reset_cache:
        engine.reset_prefix_cache()
    stats.seconds = time.perf_counter() - t0
    return stats
