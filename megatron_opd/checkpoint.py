"""Student checkpoints: Megatron dist_checkpointing (model + optimizer, layout-independent), plus the
scheduler, RNG states, data position, step and the config that wrote it (meta.json), and the model's
spec and tokenizer files, so `tools.convert_megatron_to_hf` turns a training checkpoint into an HF
directory with no other input.

Atomic: a checkpoint is written to `step_<n>.tmp/` and renamed to `step_<n>/` only once every rank has
finished and the metadata is on disk; `latest` is replaced atomically afterwards. A crash while saving
leaves at most a `.tmp` directory, which is ignored and cleaned up; the previous checkpoint is never
touched until the new one is complete (keep-last-k deletes only after the rename).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd import platform
from megatron_opd.faults import maybe_fail

_LATEST = "latest"
SPEC_FILE = "megatron_opd_spec.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "accelerator": platform.accelerator_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    platform.set_accelerator_rng_state(state.get("accelerator"))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _unwrap(model):
    return getattr(model, "module", model)  # DDP wrapper -> GPTModel (its keys carry no "module.")


#: How megatron's DistributedOptimizer lays its sharded state out in a checkpoint: each rank writes its
#: own flat buffer shards in parallel (no gather), resumable at the same TP / PP layout with any DP size.
#: (megatron-core 0.16.1's default, "fully_sharded_model_space", needs `flattened_range`, which its
#: dist_checkpointing no longer supports.)
DISTRIBUTED_OPTIMIZER_FORMAT = "dp_reshardable"


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    model_sd = _unwrap(model).sharded_state_dict()
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    metadata = ({"distrib_optim_sharding_type": DISTRIBUTED_OPTIMIZER_FORMAT}
                if any(isinstance(o, DistributedOptimizer) for o in inner) else None)
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)}


def _distributed_torch_adams(optimizer, loaded: Optional[dict] = None):
    """(torch Adam, its loaded state dict or None) of every DistributedOptimizer over torch.optim.Adam."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded] if len(inner) == 1 else [loaded[i] if loaded else None for i in range(len(inner))]
    for o, state in zip(inner, states):
        if isinstance(o, DistributedOptimizer) and isinstance(getattr(o, "optimizer", None), torch.optim.Adam):
            yield o.optimizer, state


# Workarounds, both for megatron-core 0.16.1's DistributedOptimizer over torch.optim.Adam (no Apex or
# TE fused Adam, as on CPU), which keeps torch's per-parameter Adam 'step' in its param groups:
# 1. Its `state_dict()`, which loading calls first, reads 'step' from every parameter's state, which
#    is empty before the first step (its `init_state_fn` creates only the moments), and asserts. Before
#    a load every empty state gets a step and zero moments, which the load overwrites...
# 2. ... except the step: the per-parameter copy it restores is the one it was handed (it saves the
#    step in the param groups), and the step tensor it sets is one object shared by every parameter,
#    which torch's Adam increments in place once per parameter. After a load, every parameter's state
#    gets its own step tensor holding the checkpoint's step.
def _give_empty_adam_state_a_step(optimizer) -> None:
    for opt, _ in _distributed_torch_adams(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                if not opt.state[p]:
                    opt.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p.data),
                                        exp_avg_sq=torch.zeros_like(p.data))


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    for opt, state in _distributed_torch_adams(optimizer, loaded):
        steps = {g["step"] for g in state["optimizer"]["param_groups"] if g.get("step") is not None}
        if len(steps) != 1:
            raise ValueError(f"checkpoint holds optimizer steps {sorted(steps)}: expected one")
        step = steps.pop()
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["step"] = torch.tensor(float(step))


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint at `path` cannot be resumed from (None: it is complete). A complete checkpoint
    has a readable meta.json, written last, whose manifest (every other file and its size) matches the
    directory; checkpoints written before manifests existed are judged by their meta.json alone."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return "no meta.json"
    try:
        manifest = json.loads(meta_path.read_text()).get("manifest")
    except (OSError, ValueError) as exc:
        return f"unreadable meta.json ({exc})"
    for name, size in (manifest or {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def latest_checkpoint(root: str | Path, report=None) -> Optional[Path]:
    """The newest complete checkpoint under `root` (`checkpoint_problem`), or None. Newer ones that are
    damaged are passed over, each named to `report` (e.g. print) with what is wrong with it."""
    root = Path(root)
    # every step_N directory, newest first (a save in progress is step_N.tmp; `latest` is only a hint:
    # a crash between the rename and its update leaves it one behind)
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name.split("_")[1].isdigit()),
                        key=lambda p: int(p.name.split("_")[1]), reverse=True)
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if report is not None:
            report(f"checkpoint {path} is incomplete ({problem}): passed over and kept as it is")
    return None


def _manifest(path: Path) -> dict[str, int]:
    """Every file under `path` but meta.json, with its size."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != "meta.json"}


def save_checkpoint(
    root: str | Path,
    step: int,
    model,
    optimizer,
    scheduler,
    extra: Optional[dict[str, Any]] = None,
    keep_last: int = 2,
    spec=None,
    tokenizer_dir: Optional[str | Path] = None,
    write_extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Collective: save the student at `step` under `root/step_<step>/`, atomically.

    Args:
        extra: JSON-serialisable run state (data position, counters, config) stored in meta.json.
        write_extra: called by rank 0 with the directory being written, to add files of its own (the
            batches generated ahead of their update); they are in the manifest like the rest.
        spec / tokenizer_dir: the model's ModelSpec and the HF directory whose tokenizer files are copied
            beside the weights (for export without extra arguments).
    """
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of an interrupted save of the same step
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
    maybe_fail("checkpoint_files_written")
    _barrier()
    if _rank() == 0:
        if spec is not None:
            write_spec(tmp, spec)
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), tmp)
        if write_extra is not None:
            write_extra(tmp)
        meta = {"step": step, "scheduler": scheduler.state_dict() if scheduler else None,
                **(extra or {}), "manifest": _manifest(tmp)}
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1, default=_json_default))
        if final.exists():
            if checkpoint_problem(final) is None:  # re-saving a step (e.g. SIGTERM right after a periodic save)
                shutil.rmtree(final)
            else:  # a damaged one the run passed over: kept for inspection, never overwritten
                os.replace(final, _unused(root / f"damaged_{final.name}"))
        os.replace(tmp, final)
        maybe_fail("checkpoint_renamed")
        _write_atomic(root / _LATEST, final.name)
        _prune(root, keep_last, step)
    _barrier()
    return final


def _unused(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... : the first that does not exist."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def start_writer_helpers() -> None:
    """Start megatron's checkpoint-writer helper process now, shielded from preemption signals.

    Workaround, isolated here: megatron-core 0.16 creates a multiprocessing Manager (a separate process)
    at the first save (`filesystem_async._get_write_results_queue`). Under SLURM the preemption signal
    reaches every process of the job step, and that Manager, with default handlers, dies before the
    trainer's preemption checkpoint is written (BrokenPipeError, found on the local SLURM). Created early
    inside `shielded_children`, it never receives SIGTERM/SIGUSR1; started here (megatron's own call,
    `ctx.Manager().Queue()`, takes no initializer) it also dies with the trainer when that is killed
    with SIGKILL, instead of outliving it (`signals.die_with_parent`).
    """
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_opd.signals import die_with_parent, shielded_children

    global _WRITER_MANAGER
    if filesystem_async._results_queue is not None:
        return
    with shielded_children():
        _WRITER_MANAGER = SyncManager(ctx=mp.get_context("spawn"))
        _WRITER_MANAGER.start(initializer=die_with_parent)
        filesystem_async._results_queue = _WRITER_MANAGER.Queue()


_WRITER_MANAGER = None
"""The Manager behind megatron's write-results queue (kept referenced: it shuts down when collected)."""


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Collective: restore model, optimizer, scheduler and this rank's RNG; return meta.json."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    _give_empty_adam_state_a_step(optimizer)
    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(path))
    _unwrap(model).load_state_dict(state["model"])
    with torch.no_grad():  # the distributed optimizer copies into views of the (fp32) model parameters
        optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer, state["optimizer"])
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    from megatron_opd.parallel import current_layout

    rng_file = path / f"rng_rank{_rank()}.pt"
    # at another layout rank N's RNG belonged to another shard's rank: the new layout keeps its own seeds
    if rng_file.is_file() and meta.get("layout", current_layout()) == current_layout():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


def read_meta(path: str | Path) -> dict:
    """meta.json of a complete checkpoint (cheap: no tensors)."""
    return json.loads((Path(path) / "meta.json").read_text())


def write_spec(out: Path, spec) -> None:
    import dataclasses

    (Path(out) / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2))


def read_spec(path: Path):
    from megatron_opd.models.spec import ModelSpec

    f = Path(path) / SPEC_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a megatron_opd Megatron checkpoint (no {SPEC_FILE}); "
                                "pass --spec configs/models/<model>.yaml")
    return ModelSpec.from_dict(json.loads(f.read_text()), source=str(f))


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


#: What a run writes into its `train.out_dir` (besides files other tools add there).
RUN_ARTIFACTS = ("checkpoints", "checkpoints.previous", "metrics.jsonl", "config.yaml", "curves.png",
                 "tensorboard", "PREEMPTED", "wandb", "wandb_run_id")
PREVIOUS_RUNS = "previous_runs"


def set_aside_earlier_run(out_dir: str | Path) -> Optional[Path]:
    """A fresh run (nothing resumed) into a directory holding an earlier run's outputs moves all of them
    (checkpoints, metrics, config, curves, TensorBoard events) into `<out_dir>/previous_runs/<N>/`, N the
    next free number: nothing of an earlier run is overwritten, mixed with the new one or ever deleted.
    Returns where they went (None: nothing to set aside, or not rank 0)."""
    out_dir = Path(out_dir)
    found = [out_dir / name for name in RUN_ARTIFACTS if (out_dir / name).exists()]
    if _rank() != 0 or not found:
        return None
    root = out_dir / PREVIOUS_RUNS
    root.mkdir(exist_ok=True)
    n = 1 + max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0)
    aside = root / str(n)
    aside.mkdir()
    for path in found:
        os.replace(path, aside / path.name)
    return aside


def _prune(root: Path, keep_last: int, newest: int) -> None:
    """Keep the `keep_last` newest checkpoints up to `newest` (the one just written, which `latest`
    names); never delete it or anything after it."""
    done = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
         and int(p.name.split("_")[1]) <= newest),
        key=lambda p: int(p.name.split("_")[1]),
    )
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")
