"""Refit: stream the sharded Megatron student's weights into the live vLLM engines after each step.

Collective over all trainer ranks. Each data-parallel replica owns one engine, on its leader (TP rank
0 of pipeline stage 0, `hf_mapping.is_replica_leader`); the replica's TP shards are gathered, experts
collected across EP ranks and PP stages sent to the leader (`hf_mapping.export_hf_weights`), renamed
to HF names by the one shared mapping, in buckets of about `bucket_mb` MiB. Bucket boundaries fall
between Megatron parameters, so fused groups (q/k/v, gate/up) always arrive whole.

All or nothing, on every engine:
1. before the first byte moves, each leader checks the full manifest (names and shapes the exporter
   will produce) against what its engine's model consumes; every rank learns every verdict;
2. buckets are checked against the manifest and *staged* in the engine (memory in-process, /dev/shm
   files for a subprocess engine); after every bucket all ranks agree (one all-reduced flag) whether
   any rank failed, so a failure stops every rank at the same bucket instead of leaving the others
   blocked in the export's collectives;
3. each leader checks that every manifest tensor was staged (completeness), ranks agree again;
4. only then every engine commits (one `reload_weights` of the complete set) and resets its prefix
   cache (see RolloutEngine.reset_prefix_cache). On any failure the staging is dropped, every engine
   keeps its previous weights, and every rank raises RefitError naming the failed rank and cause.
A failure inside the export's own collectives (a rank that dies) reaches the others through the
collective timeout (`parallel.timeout_minutes`).

GPU modes (written, not run on a GPU): colocated engines sleep during training and wake for the
refit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.faults import maybe_fail
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
    """Load a complete set of HF-named tensors into `engine` (one process), all or nothing."""
    produced = {n: tuple(t.shape) for n, t in named_tensors}
    if len(produced) != len(named_tensors):
        raise RefitError("refit refused, nothing loaded: duplicate tensor names")
    check_manifest(produced, engine.expected_tensors())
    dtype = getattr(torch, engine.cfg.dtype)
    engine.begin_refit()
    engine.stage([(n, t.to(dtype)) for n, t in named_tensors])
    engine.commit_refit()
    if reset_cache:
        engine.reset_prefix_cache()


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


def refit(engine, model, spec, bucket_mb: float = 256, reset_cache: bool = True) -> RefitStats:
    """Collective: push `model`'s current weights into every replica's engine. `engine` is this
    replica's engine on its leader rank, None on every other rank. Returns timing and volume."""
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

    dtype = getattr(torch, engine.cfg.dtype) if engine is not None else None
    staged: dict[str, tuple] = {}
    if engine is not None:
        engine.begin_refit()
    try:
        for bucket in export_hf_weights(model, spec, bucket_bytes=int(bucket_mb * 2**20), dtype=dtype):
            if error is None:
                try:
                    maybe_fail("refit_bucket")  # fault-injection point (tests), any rank
                    if engine is not None:
                        for name, t in bucket:  # cheap per-bucket re-check against the manifest
                            if manifest.get(name) != tuple(t.shape) or name in staged:
                                raise RefitError(f"exporter produced {name} {tuple(t.shape)}, expected "
                                                 f"{manifest.get(name)} once")
                        t_load = time.perf_counter()
                        engine.stage(bucket)
                        stats.load_seconds += time.perf_counter() - t_load
                        staged.update((n, tuple(t.shape)) for n, t in bucket)
                        stats.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                        stats.buckets += 1
                except Exception as exc:  # any failure: every rank stops at this bucket
                    error = f"{type(exc).__name__}: {exc}"
            _agree(error)
        if engine is not None and error is None:
            missing = sorted(set(manifest) - set(staged))
            if missing:
                error = f"incomplete refit, not committed: {len(missing)} tensor(s) never sent, e.g. {missing[:4]}"
        _agree(error)
    except BaseException:
        if engine is not None:
            engine.abort_refit()
        raise
    if engine is not None:
        t_load = time.perf_counter()
        engine.commit_refit()
        stats.load_seconds += time.perf_counter() - t_load
        if reset_cache:
            engine.reset_prefix_cache()
    stats.seconds = time.perf_counter() - t0
    return stats
