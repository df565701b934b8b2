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
    """GPUs per node; also the number of trainer processes per node."""

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

    job_name_prefix: str = "mopd-"
    """Prefix of SLURM job names."""

    preempt_signal: str = "USR1@300"
    """--signal: SIGUSR1 300 s before the time limit, so the trainer checkpoints and exits cleanly."""

    def __post_init__(self):
        for name in ("account", "partition"):
            if not getattr(self, name):
                raise ValueError(f"cluster.{name} is required (the SLURM --{name})")
        if self.gpus_per_node < 1:
            raise ValueError("cluster.gpus_per_node must be >= 1")
        for m in self.mounts:
            if ":" not in str(m):
                raise ValueError(f"cluster.mounts entry {m!r} must be 'host_path:container_path'")

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
