"""Submit a megatron_opd recipe to SLURM (or run it locally) through nemo-run.

    python -m launch.submit --recipe configs/recipes/exopd_30b_a3b_to_4b.yaml \
        --cluster configs/clusters/example_slurm.yaml --dryrun [key=value ...]

Without --cluster the job runs on this machine with nemo-run's LocalExecutor (torchrun). Everything is
validated (recipe, cluster, GPU count vs. parallel layout) before anything is written or submitted.
Rollout engines are colocated with the trainer (one per data-parallel replica); there is no separate
rollout job.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Optional

from launch.cluster import ClusterConfig

REPO = Path(__file__).resolve().parents[1]


def check_layout(cfg, gpus_per_node: int) -> int:
    """The trainer's GPUs must hold the layout by megatron-core's rules (`parallel.validate_layout`)
    and TP must stay inside a node. Returns the GPU count."""
    from megatron_opd.parallel import validate_layout

    p = cfg.parallel
    world = cfg.launch.nodes * gpus_per_node
    if p.tensor_model_parallel_size > gpus_per_node:
        raise ValueError(f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} exceeds "
                         f"gpus_per_node={gpus_per_node}: keep TP inside a node (NVLink)")
    try:
        validate_layout(p, world)
    except ValueError as exc:
        raise ValueError(f"launch.nodes x gpus_per_node = {cfg.launch.nodes} x {gpus_per_node}: {exc}") from None
    return world


def train_command(recipe: str, overrides: list[str]) -> list[str]:
    return ["-m", "megatron_opd.cli", "train", "--config", recipe, *overrides]


def build_executor(cfg, cluster: Optional[ClusterConfig]):
    """The trainer's executor: torchrun on this machine, or a SLURM job through nemo-run."""
    import nemo_run as run

    if cluster is None:
        return run.LocalExecutor(ntasks_per_node=cfg.launch.gpus_per_node, launcher="torchrun")
    ex = run.SlurmExecutor(
        account=cluster.account, partition=cluster.partition, nodes=cfg.launch.nodes,
        # One task per node: torchrun spawns one trainer rank per GPU.
        ntasks_per_node=1, gpus_per_node=cluster.gpus_per_node,
        time=cfg.launch.time or cluster.time, container_image=cluster.container_image,
        container_mounts=list(cluster.mounts), env_vars=dict(cluster.env),
        job_name_prefix=cluster.job_name_prefix, signal=cluster.preempt_signal,
        additional_parameters={"requeue": True},
        tunnel=run.LocalTunnel(job_dir=cluster.job_dir),
    )
    ex.launcher = "torchrun"
    ex.torchrun_nproc_per_node = cluster.gpus_per_node
    return ex


def render_sbatch(cfg, cluster: ClusterConfig, recipe: str, overrides: list[str]) -> str:
    """The sbatch script nemo-run would submit. Nothing is submitted, and nothing is written to the
    cluster's job_dir: nemo-run packages code into its job directory even for a dry run, so we render
    against a temporary directory and put the real job_dir back into the text."""
    import dataclasses
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix="mopd_dryrun_")
    try:
        text = _render(cfg, dataclasses.replace(cluster, job_dir=scratch), recipe, overrides)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return text.replace(scratch, cluster.job_dir.rstrip("/"))


def _render(cfg, cluster: ClusterConfig, recipe: str, overrides: list[str]) -> str:
    import nemo_run as run
    from nemo_run.run.torchx_backend.packaging import package
    from nemo_run.run.torchx_backend.schedulers.slurm import create_scheduler

    executor = build_executor(cfg, cluster)
    cmd = train_command(recipe, overrides)
    train_script = run.Script(path=cmd[1], args=cmd[2:], entrypoint="python", m=True)
    name = Path(recipe).stem
    executor.assign("dryrun", cluster.job_dir, name, name)
    app = package(name, train_script, executor)
    info = create_scheduler(session_name="mopd")._submit_dryrun(app, executor)
    return info.request.materialize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--cluster", default=None, help="cluster YAML; omit to run locally")
    ap.add_argument("--dryrun", action="store_true", help="print the sbatch script, submit nothing")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from megatron_opd.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    cluster = ClusterConfig.from_yaml(args.cluster) if args.cluster else None
    check_layout(cfg, cluster.gpus_per_node if cluster else cfg.launch.gpus_per_node)
    if cluster is not None and args.dryrun:
        sys.stdin = io.StringIO()  # nemo-run may prompt; a dry run must never block
        print(render_sbatch(cfg, cluster, args.recipe, args.overrides))
        return 0
    import nemo_run as run

    trainer = build_executor(cfg, cluster)
    script = run.Script(path="megatron_opd.cli", args=train_command(args.recipe, args.overrides)[2:],
                        entrypoint="python", m=True)
    with run.Experiment(f"mopd-{Path(args.recipe).stem}", executor=trainer) as exp:
        exp.add(script, executor=trainer, name="train")
        if args.dryrun:
            exp.dryrun()
        else:
            exp.run(detach=cluster is not None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
