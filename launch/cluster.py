"""Cluster description (configs/clusters/*.yaml) -> validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml


@dataclass
class ClusterConfig:
    """A SLURM cluster as nemo-run needs it."""

    account: str
    """SLURM account (--account)."""

    partition: str
    """SLURM partition (--partition)."""

    gpus_per_node: int = 8
    """GPUs per node; also the number of trainer processes per node. 0: CPU-only nodes (no GPU request;
    the trainer runs `processes_per_node` ranks), e.g. the local test cluster."""

    processes_per_node: Optional[int] = None
    """Trainer processes per node (default: gpus_per_node; required with gpus_per_node: 0)."""

    container_image: Optional[str] = None
    """Container image (pyxis/enroot), e.g. an NVIDIA NeMo/PyTorch image with this project installed."""

    mounts: list = field(default_factory=list)
    """Container mounts "host:container" (checkpoints, data, this repository)."""

    time: str = "04:00:00"
    """Default time limit (the recipe's launch.time overrides it)."""

    env: dict = field(default_factory=dict)
    """Environment variables for every task (e.g. HF_HOME, NCCL settings)."""

    job_dir: str = "/tmp/megatron_opd_jobs"
    """Where nemo-run writes sbatch scripts and logs (must be on a shared filesystem)."""

    runs_dir: Optional[str] = None
    """Absolute directory (shared filesystem, as the job sees it) for run directories: a recipe with a
    relative train.out_dir runs in `<runs_dir>/<out_dir>`, so a resubmission of the recipe resumes.
    Required unless every submitted recipe sets an absolute train.out_dir."""

    max_crash_retries: int = 1
    """A job whose trainer fails (not preempted) is requeued at most this many times, then fails with its
    log path. Preemptions (the trainer checkpointed and wrote <out_dir>/PREEMPTED) always requeue."""

    shutdown_timeout_s: int = 280
    """After a preemption signal torchrun waits this long for the trainer ranks to checkpoint and exit
    before SIGKILL: keep it below preempt_signal's lead time (USR1@300 -> 300 s)."""

    job_name_prefix: str = "mopd-"
    """Prefix of SLURM job names."""

    preempt_signal: str = "USR1@300"
    """--signal: SIGUSR1 300 s before the time limit, so the trainer checkpoints and exits cleanly."""

    def __post_init__(self):
        for name in ("account", "partition"):
            if not getattr(self, name):
                raise ValueError(f"cluster.{name} is required (the SLURM --{name})")
        if self.gpus_per_node < 0:
            raise ValueError("cluster.gpus_per_node must be >= 0 (0: CPU-only nodes)")
        if self.gpus_per_node == 0 and not self.processes_per_node:
            raise ValueError("cluster.gpus_per_node: 0 (CPU-only nodes) needs cluster.processes_per_node")
        if self.processes_per_node is not None and self.processes_per_node < 1:
            raise ValueError("cluster.processes_per_node must be >= 1")
        if self.runs_dir is not None and not Path(self.runs_dir).is_absolute():
            raise ValueError(f"cluster.runs_dir={self.runs_dir!r} must be absolute (a path every node sees)")
        if self.max_crash_retries < 0:
            raise ValueError("cluster.max_crash_retries must be >= 0")
        lead = int(self.preempt_signal.split("@")[1]) if "@" in self.preempt_signal else None
        if lead is not None and self.shutdown_timeout_s >= lead:
            raise ValueError(f"cluster.shutdown_timeout_s={self.shutdown_timeout_s} must be below the "
                             f"preempt_signal lead time ({self.preempt_signal}: {lead} s)")
        for m in self.mounts:
            if ":" not in str(m):
                raise ValueError(f"cluster.mounts entry {m!r} must be 'host_path:container_path'")

    @property
    def ranks_per_node(self) -> int:
        """Trainer processes per node."""
        return self.processes_per_node or self.gpus_per_node

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ClusterConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cluster file {path} does not exist (see configs/clusters/)")
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown cluster field(s) {unknown}; known: {sorted(known)}")
        missing = [f for f in ("account", "partition") if f not in data]
        if missing:
            raise ValueError(f"{path}: missing required cluster field(s) {missing}")
        return cls(**data)
