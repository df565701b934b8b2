"""Refit: stream the sharded Megatron student's weights into the live vLLM engines after each step.

Collective over all trainer ranks. Every engine's owner rank (rollout/placement.py: with the default
placement, every rank) receives its replica's full HF-named tensors from `hf_mapping.export_hf_tensors`
— TP shards all-gathered, experts collected over EP, pipeline stages sent to the receivers of their
pipeline group — one tensor at a time, and packs them into the engine's two transport slots
(rollout/transport.py): while the engine's workers load bucket k from one slot (vLLM's layer-wise
in-place reload; each worker shards the full tensors for its own engine-TP rank), the trainer packs
bucket k+1 into the other. No file is written and no full copy of the model is staged: besides the
engine's own weights a refit holds two slots and the tensor being exported. Bucket boundaries fall
between Megatron parameters, so fused groups (q/k/v, gate/up) always arrive whole.

Failures, on every engine:
1. before the first byte moves, each owner checks the full manifest (names and shapes the exporter
   will produce) against what its engine's model consumes; every rank learns every verdict;
2. each tensor is checked against the manifest as it is packed; after every bucket all ranks agree
   (one all-reduced flag) whether any rank failed, so a failure stops every rank at the same bucket
   instead of leaving the others blocked in the export's collectives;
3. each owner checks that every manifest tensor was sent (completeness), ranks agree again.
On any failure every rank raises RefitError naming the failed rank and cause. An engine whose refit
did not complete holds a mix of old and new layers, so it refuses to generate or score
(`RolloutEngine.weights_complete`) until a complete refit succeeds; the trainer's weights are intact
and can be sent again. A failure inside the export's own collectives (a rank that dies) reaches the
others through the collective timeout (`parallel.timeout_minutes`).

GPU modes (written, not run on a GPU): colocated engines sleep during training and wake for the
refit; the slots are device memory handed over as CUDA IPC handles.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.faults import maybe_fail
from megatron_opd.models.hf_mapping import bucket_bytes_of, bucket_plan, export_hf_tensors, hf_tensor_shapes
from megatron_opd.rollout.transport import SlotWriter, slot_bytes


class RefitError(ValueError):
    """The weights do not match the engine's model; nothing was loaded."""


@dataclass
class RefitStats:
    seconds: float = 0.0
    load_seconds: float = 0.0  # the trainer waiting for the engine's loads (vLLM's reload, its CPU repacking)
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


def update_weights(engine, named_tensors: list[tuple[str, torch.Tensor]], reset_cache: bool = True,
                   bucket_mb: float = 256) -> RefitStats:
    """Load a complete set of HF-named tensors into `engine` (one process) through its transport slots."""
    produced = {n: tuple(t.shape) for n, t in named_tensors}
    if len(produced) != len(named_tensors):
        raise RefitError("refit refused, nothing loaded: duplicate tensor names")
    check_manifest(produced, engine.expected_tensors())
    dtype = getattr(torch, engine.cfg.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    buckets, bucket, size = [], [], 0
    for name, t in named_tensors:  # cut like the exporter: after the tensor that reaches bucket_mb
        bucket.append((name, t))
        size += t.numel() * elem
        if size >= bucket_mb * 2**20:
            buckets.append(bucket)
            bucket, size = [], 0
    buckets += [bucket] if bucket else []
    stats = RefitStats()
    t0 = time.perf_counter()
    engine.begin_refit(slot_bytes([[t.numel() * elem for _, t in b] for b in buckets]), buckets=len(buckets))
    try:
        for k, bucket in enumerate(buckets):
            writer = SlotWriter(engine.slot(k))
            for name, t in bucket:
                writer.add(name, t.to(dtype))
            engine.load_bucket(k, writer.layout)
            stats.bytes += writer.nbytes
            stats.buckets += 1
    except BaseException:
        engine.end_refit(complete=False)
        raise
    engine.end_refit(complete=True)
    if reset_cache:
        engine.reset_prefix_cache()
    stats.seconds = time.perf_counter() - t0
    return stats


def _agree(error: Optional[str]) -> None:
    """Collective: raise RefitError on every rank if any rank has an error (one all-reduced flag;
    the messages are gathered only on failure)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        if error is not None:
            raise RefitError(error)
        return
    from megatron_opd.platform import collective_device

    flag = torch.tensor([0.0 if error is None else 1.0], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0.0:
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((r, e) for r, e in enumerate(errors) if e is not None)
    raise RefitError(f"refit failed on rank {first[0]}: {first[1]}; every engine keeps its previous weights")


def refit(engine, model, spec, bucket_mb: float = 256, dtype: Optional[torch.dtype] = None,
          receivers: Optional[set[int]] = None, reset_cache: bool = True) -> RefitStats:
    """Collective: push `model`'s current weights into every engine. `engine` is the engine this rank
    owns, None on ranks that own none; `receivers` are the owner ranks of every engine of the job (None:
    each replica's leader); `dtype` the engines' dtype (the same on every rank: bucket boundaries
    depend on it). Returns timing and volume."""
    t0 = time.perf_counter()
    stats = RefitStats()
    manifest = hf_tensor_shapes(spec)
    error = None
    if engine is not None:
        try:
            check_manifest(manifest, engine.expected_tensors())
        except RefitError as exc:
            error = str(exc)
    _agree(error)  # a refused refit raises everywhere before any export collective starts

    if dtype is None:
        dtype = getattr(torch, engine.cfg.dtype) if engine is not None else next(model.parameters()).dtype
    elem = torch.empty((), dtype=dtype).element_size()
    pp = _pipeline_size()
    sent: dict[str, tuple] = {}
    writer = None
    bucket_index = 0
    if engine is not None:
        plan = bucket_plan(spec, pp, int(bucket_mb * 2**20), elem)
        try:
            engine.begin_refit(slot_bytes([[b for _, b in bucket_bytes_of(spec, bucket, elem)] for bucket in plan]),
                               buckets=len(plan))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    _agree(error)
    try:
        for _, item in export_hf_tensors(model, spec, bucket_bytes=int(bucket_mb * 2**20), dtype=dtype,
                                         receivers=receivers):
            if item is not None:  # one tensor for this rank's engine
                if error is None:
                    try:
                        name, t = item
                        if manifest.get(name) != tuple(t.shape) or name in sent:
                            raise RefitError(f"exporter produced {name} {tuple(t.shape)}, expected "
                                             f"{manifest.get(name)} once")
                        if writer is None:
                            t_wait = time.perf_counter()
                            writer = SlotWriter(engine.slot(bucket_index))
                            stats.load_seconds += time.perf_counter() - t_wait
                        writer.add(name, t)
                        sent[name] = tuple(t.shape)
                    except Exception as exc:
                        error = f"{type(exc).__name__}: {exc}"
                continue
            if error is None:  # the end of a bucket: hand it over, then every rank agrees
                try:
                    maybe_fail("refit_bucket")  # fault-injection point (tests), any rank
                    if engine is not None and writer is not None:
                        t_load = time.perf_counter()  # an in-process engine loads right here
                        engine.load_bucket(bucket_index, writer.layout)
                        stats.load_seconds += time.perf_counter() - t_load
                        stats.bytes += writer.nbytes
                        stats.buckets += 1
                except Exception as exc:  # any failure: every rank stops at this bucket
                    error = f"{type(exc).__name__}: {exc}"
            writer = None
            bucket_index += 1
            _agree(error)
        if engine is not None and error is None:
            missing = sorted(set(manifest) - set(sent))
            if missing:
                error = f"incomplete refit: {len(missing)} tensor(s) never sent, e.g. {missing[:4]}"
        _agree(error)
    except BaseException:
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.end_refit(complete=False)
        raise
    if engine is not None:
        t_wait = time.perf_counter()
        engine.end_refit(complete=True)
        stats.load_seconds += time.perf_counter() - t_wait
        if reset_cache:
            engine.reset_prefix_cache()
    stats.seconds = time.perf_counter() - t0
    return stats


def _pipeline_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
