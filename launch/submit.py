"""Submit a megatron_opd recipe to SLURM (or run it locally) through nemo-run.

    python -m launch.submit --recipe configs/recipes/exopd_30b_a3b_to_4b.yaml \
        --cluster configs/clusters/example_slurm.yaml --dryrun [key=value ...]

Without --cluster the job runs on this machine with nemo-run's LocalExecutor (torchrun). Everything is
validated (recipe, cluster, GPU count vs. parallel layout) before anything is written or submitted.
Rollout engines are colocated with the trainer (one per data-parallel replica); there is no separate
rollout job.

On SLURM, preemption works like this (tested against a one-node SLURM, tests/launch/test_slurm_local.py):
`--signal=USR1@300` reaches torchrun on every node; torchrun forwards it to the trainer ranks
(PET_SIGNALS_TO_HANDLE) and waits `cluster.shutdown_timeout_s` for them; the trainer checkpoints, writes
<out_dir>/PREEMPTED and exits; the batch script's exit trap sees that file and runs
`scontrol requeue $SLURM_JOB_ID`; the requeued job resumes from the checkpoint (the run directory is
absolute: `cluster.runs_dir`). A trainer failure is requeued at most `cluster.max_crash_retries` times.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from launch.cluster import ClusterConfig
from megatron_opd.signals import PREEMPTED_MARKER

REPO = Path(__file__).resolve().parents[1]


def check_layout(cfg, gpus_per_node: int) -> int:
    """The trainer's GPUs must hold the layout by megatron-core's rules (`parallel.validate_layout`)
    and TP must stay inside a node. Returns the GPU count."""
    from megatron_opd.parallel import validate_layout

    from megatron_opd.rollout.dedicated import trainer_world

    p = cfg.parallel
    world = cfg.launch.nodes * gpus_per_node
    trainers = trainer_world(cfg, world)  # rollout.placement=dedicated: the job's last GPUs run engines only
    if p.tensor_model_parallel_size > gpus_per_node:
        raise ValueError(f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} exceeds "
                         f"gpus_per_node={gpus_per_node}: keep TP inside a node (NVLink)")
    where = f"launch.nodes x gpus_per_node = {cfg.launch.nodes} x {gpus_per_node}"
    if trainers != world:
        where += f", minus rollout.dedicated_ranks={world - trainers}: {trainers} trainer GPUs"
    try:
        validate_layout(p, trainers)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    from megatron_opd.models.spec import ModelSpec
    from megatron_opd.rollout.placement import plan_for_config

    if trainers == world:  # colocated engines are placed on the trainer's GPUs
        plan_for_config(cfg, world, gpus_per_node, ModelSpec.from_yaml(cfg.student.spec) if cfg.student.spec else None)
    from megatron_opd.trainer import check_batch_split

    check_batch_split(cfg, trainers // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size))
    return world


def train_command(recipe: str, overrides: list[str], objective: str = "gopd") -> list[str]:
    """The job's command: `megatron-opd erpd` for the ERPD pipeline, `megatron-opd train` otherwise."""
    command = "erpd" if objective == "erpd" else "train"
    return ["-m", "megatron_opd.cli", command, "--config", recipe, *overrides]


def job_recipe(recipe: str) -> str:
    """The recipe's path as the job sees it: relative to the repository, which the job runs from (the
    packaged code in a container, the checkout itself otherwise)."""
    path = Path(recipe).resolve()
    if not path.is_relative_to(REPO):
        raise ValueError(f"--recipe {recipe} is outside the repository ({REPO}): the job only sees the "
                         "repository's files; put the recipe under configs/")
    return str(path.relative_to(REPO))


def run_dir(cfg, cluster: ClusterConfig) -> str:
    """The run's absolute directory as the job sees it: the same for every (re)submission of a recipe,
    so the next job resumes where the last one stopped."""
    out = Path(cfg.train.out_dir)
    if out.is_absolute():
        return str(out)
    if cluster.runs_dir is None:
        raise ValueError(f"train.out_dir={cfg.train.out_dir!r} is relative: on a cluster it would land in "
                         "each job's own directory and a resubmission could not resume. Set cluster.runs_dir "
                         "(an absolute shared path) or an absolute train.out_dir")
    return str(Path(cluster.runs_dir) / out.name)


def requeue_lines(out_dir: str, cluster: ClusterConfig, log_glob: str, nodes: int) -> str:
    """Batch-script lines (nemo-run's setup_lines): the stack's versions are checked on every node first
    (a wrong image fails in seconds, never retried); torchrun forwards the preemption signal to the
    trainer and waits for its checkpoint; on exit the job requeues itself if the trainer was preempted,
    or after a failure while crash retries remain."""
    retries = cluster.max_crash_retries
    where = (["--container-image", cluster.container_image, *(["--container-mounts", ",".join(cluster.mounts)]
                                                              if cluster.mounts else [])]
             if cluster.container_image else ["--chdir", str(REPO)])
    check = shlex.join(["srun", f"--nodes={nodes}", "--ntasks-per-node=1", *where,
                        "python", "-m", "megatron_opd.cli", "check-env"])
    return f"""
# megatron_opd (launch/submit.py): preemption -> checkpoint -> requeue; a failure -> at most {retries} requeue(s)
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export PET_SHUTDOWN_TIMEOUT={cluster.shutdown_timeout_s}
mopd_preempted={shlex.quote(f"{out_dir}/{PREEMPTED_MARKER}")}
rm -f "$mopd_preempted"
mopd_on_exit() {{
    local rc=$?
    set +e
    if [ -f "$mopd_preempted" ]; then
        echo "megatron_opd: preempted, checkpointed at step $(cat "$mopd_preempted"); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    if [ "$rc" -ne 0 ] && [ -z "${{mopd_env_failed:-}}" ]; then
        if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {retries} ]; then
            echo "megatron_opd: the trainer failed (exit $rc); requeue $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of {retries}"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
        echo "megatron_opd: the trainer failed (exit $rc) after ${{SLURM_RESTART_COUNT:-0}} restart(s) (cluster.max_crash_retries={retries}); logs: {log_glob}" >&2
    fi
    exit $rc
}}
trap mopd_on_exit EXIT
if ! {check}; then
    mopd_env_failed=1
    echo "megatron_opd: the job's environment does not match the pins (see above); not retried" >&2
    exit 3
fi
"""


def build_executor(cfg, cluster: Optional[ClusterConfig], out_dir: Optional[str] = None):
    """The trainer's executor: torchrun on this machine, or a SLURM job through nemo-run."""
    import nemo_run as run

    # The job uses this Python environment (torchrun included) even when it is not activated.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    if cluster is None:
        return run.LocalExecutor(ntasks_per_node=cfg.launch.gpus_per_node, launcher="torchrun",
                                 env_vars={"PATH": path})
    env = dict(cluster.env)
    extra = {}
    if cluster.container_image is None:
        # No container: the job runs this checkout in place (a shared filesystem) with the submitting
        # Python environment, instead of a `git archive HEAD` copy.
        extra = dict(packager=run.Packager(), srun_args=["--chdir", str(REPO)])
        env["PATH"] = path
    ex = run.SlurmExecutor(
        account=cluster.account, partition=cluster.partition, nodes=cfg.launch.nodes,
        # One task per node: torchrun spawns the node's trainer ranks.
        ntasks_per_node=1, gpus_per_node=cluster.gpus_per_node or None,
        time=cfg.launch.time or cluster.time, container_image=cluster.container_image,
        container_mounts=list(cluster.mounts), env_vars=env,
        job_name_prefix=cluster.job_name_prefix, signal=cluster.preempt_signal,
        additional_parameters={"requeue": True},
        # nemo-run writes the experiment (sbatch script, code) under <base_dir>/experiments and sbatch
        # reads it under the tunnel's job_dir: the same directory (see main's base_dir).
        tunnel=run.LocalTunnel(job_dir=f"{cluster.job_dir.rstrip('/')}/experiments"), **extra,
    )
    ex.launcher = "torchrun"
    ex.torchrun_nproc_per_node = cluster.ranks_per_node
    if out_dir is not None:
        ex.setup_lines = requeue_lines(out_dir, cluster, f"{cluster.job_dir}/experiments/.../log-*.out",
                                       nodes=cfg.launch.nodes)
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

    out_dir = run_dir(cfg, cluster)
    executor = build_executor(cfg, cluster, out_dir)
    cmd = train_command(job_recipe(recipe), [*overrides, f"train.out_dir={out_dir}"], cfg.objective.name)
    train_script = run.Script(path=cmd[1], args=cmd[2:], entrypoint="python", m=True)
    name = Path(recipe).stem
    executor.assign("dryrun", cluster.job_dir, name, name)
    app = package(name, train_script, executor)
    info = create_scheduler(session_name="mopd")._submit_dryrun(app, executor)
    return info.request.materialize()


def write_merged_config(recipe: str, overrides: list[str]) -> str:
    """The recipe (its `base:` chain) with the overrides merged in, as one YAML file in the temp dir."""
    import tempfile

    from omegaconf import OmegaConf

    from megatron_opd.config import merged_config

    fd, path = tempfile.mkstemp(prefix=f"mopd_{Path(recipe).stem}_", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(f"# {recipe} {' '.join(shlex.quote(o) for o in overrides)}\n")
        f.write(OmegaConf.to_yaml(merged_config(recipe, overrides)))
    return path


def refuse_uncommitted() -> None:
    """nemo-run ships `git archive HEAD` into the container: uncommitted edits would be dropped silently."""
    import subprocess

    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    if dirty:
        shown = ", ".join(line[3:] for line in dirty[:5]) + (" ..." if len(dirty) > 5 else "")
        raise ValueError(f"uncommitted changes ({shown}): the job runs `git archive HEAD`, which would drop "
                         "them; commit or stash them first")


def main(argv=None) -> int:
    from megatron_opd.cli import USER_ERRORS
    from megatron_opd.quiet import quiet_libraries

    quiet_libraries()
    try:
        return _submit(argv)
    except USER_ERRORS as exc:  # one line, before any job starts (as `megatron-opd train` says it)
        print(f"launch.submit: error: {exc}", file=sys.stderr)
        return 2


def rank_error(log_dir: Path) -> Optional[str]:
    """The one-line user error a trainer rank printed (`megatron-opd: error: ...`) in a job's logs."""
    for log in sorted(p for p in Path(log_dir).rglob("*.log") if p.stat().st_size < 50_000_000):
        for line in log.read_text(errors="replace").splitlines():
            if "megatron-opd: error: " in line:
                return line[line.index("megatron-opd: error: ") + len("megatron-opd: error: "):]
    return None


def _submit(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--cluster", default=None, help="cluster YAML; omit to run locally")
    ap.add_argument("--dryrun", action="store_true", help="print the sbatch script, submit nothing")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from megatron_opd.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    cluster = ClusterConfig.from_yaml(args.cluster) if args.cluster else None
    check_layout(cfg, cluster.ranks_per_node if cluster else cfg.launch.gpus_per_node)
    if cluster is not None and args.dryrun:
        sys.stdin = io.StringIO()  # nemo-run may prompt; a dry run must never block
        print(render_sbatch(cfg, cluster, args.recipe, args.overrides))
        return 0
    import nemo_run as run

    overrides = list(args.overrides)
    out_dir = None
    if cluster is not None:
        out_dir = run_dir(cfg, cluster)
        overrides.append(f"train.out_dir={out_dir}")
        if cluster.container_image is not None:
            refuse_uncommitted()
    trainer = build_executor(cfg, cluster, out_dir)
    if cluster is not None:
        script_args = train_command(job_recipe(args.recipe), overrides, cfg.objective.name)[2:]
    else:
        # nemo-run's torchrun component shell-quotes every argument (right for an sbatch script), but the
        # local scheduler runs the command without a shell, so an override such as
        # "teachers=[{checkpoint: x}]" would arrive with literal quotes. Locally the recipe and its
        # overrides travel as one merged YAML file instead (interpolations kept, resolved by the job).
        local_config = write_merged_config(args.recipe, overrides)
        script_args = train_command(local_config, [], cfg.objective.name)[2:]
    script = run.Script(path="megatron_opd.cli", args=script_args, entrypoint="python", m=True)
    # The experiment lives in the cluster's job_dir, which is where the SLURM job reads its sbatch script
    # and code (nemo-run's default ~/.nemo_run is not shared with the nodes).
    base = {"base_dir": cluster.job_dir} if cluster is not None else {}
    try:
        with run.Experiment(f"mopd-{Path(args.recipe).stem}", executor=trainer, **base) as exp:
            exp.add(script, executor=trainer, name="train")
            if args.dryrun:
                exp.dryrun()
            else:
                exp.run(detach=cluster is not None)
    finally:
        if cluster is None:
            os.unlink(local_config)
    if cluster is None and not args.dryrun:
        state = exp.status(return_dict=True) or {}
        failed = [name for name, task in state.items() if str(task.get("status", "")).upper() != "SUCCEEDED"]
        if failed:
            said = rank_error(Path(exp._exp_dir))
            if said is not None:  # a user error the trainer found (torchrun's own report hides it)
                print(f"launch.submit: error: {said} (logs: {exp._exp_dir})", file=sys.stderr)
                return 2
            print(f"launch.submit: the local job {failed[0]} did not succeed ({state[failed[0]].get('status')}); "
                  f"logs: {exp._exp_dir}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
