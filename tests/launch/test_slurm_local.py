"""launch.submit against a real one-node SLURM on this machine (scripts/slurm_local.sh): the tiny recipe
runs through nemo-run's SlurmExecutor; a preemption signal mid-run checkpoints, the job requeues itself
and the requeued job resumes to the uninterrupted run's result; a crashing trainer is retried a bounded
number of times. Run with `make test-slurm` (installs slurm-wlm and munge with apt if needed)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mopd_testing import REPO_ROOT

pytestmark = [pytest.mark.slurm, pytest.mark.vllm]
RECIPE = "configs/recipes/tiny_opd.yaml"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running local SLURM (stopped afterwards), a cluster YAML for it and the tiny models."""
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("slurm-wlm/munge not installed (make test-slurm installs them)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM's slurmd runs jobs as their owner: needs root")
    root = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "slurm_local.sh"), "start", str(root / "ctl")],
                   check=True, timeout=120)
    clusters = {}
    for name, ranks in (("cluster", 1), ("two_ranks", 2)):  # two_ranks: a trainer rank and an engine rank
        clusters[name] = root / f"{name}.yaml"
        clusters[name].write_text(
            f"account: local\npartition: local\ngpus_per_node: 0\nprocesses_per_node: {ranks}\n"
            f"time: '00:30:00'\njob_dir: {root / 'jobs'}\nruns_dir: {root / 'runs'}\nmax_crash_retries: 1\n"
            "env:\n  OMP_NUM_THREADS: '1'\n")
    env = dict(os.environ, SLURM_CONF=str(root / "ctl" / "slurm.conf"), MOPD_TINY_DIR=str(root / "models"),
               PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, "-m", "megatron_opd.cli", "init-tiny", str(root / "models")], env=env,
                   check=True, capture_output=True, timeout=300)
    try:
        yield {"root": root, **clusters, "env": env}
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
        subprocess.run(["bash", str(REPO_ROOT / "scripts" / "slurm_local.sh"), "stop", str(root / "ctl")],
                       timeout=60)


def submit(slurm, *overrides, cluster: str = "cluster") -> int:
    out = subprocess.run([sys.executable, "-m", "launch.submit", "--recipe", RECIPE, "--cluster",
                          str(slurm[cluster]), *overrides], cwd=REPO_ROOT, env=slurm["env"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = squeue(slurm)
    assert len(jobs) == 1, jobs
    return jobs[0]


def squeue(slurm) -> list[int]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm["env"], capture_output=True, text=True)
    return [int(j) for j in out.stdout.split()]


def job(slurm, job_id: int) -> dict:
    """scontrol's view of the job ({} while the controller does not answer, e.g. under load)."""
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], env=slurm["env"], capture_output=True,
                         text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait(predicate, what: str, timeout: float = 400):
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(1)


def release(slurm, job_id: int) -> None:
    """Start a requeued job now instead of after SLURM's requeue delay. Only once it is back to PENDING
    and its previous instance is cleaned up: started earlier, slurmd kills it ("Job credential revoked")."""
    wait(lambda: job(slurm, job_id).get("JobState") == "PENDING", f"job {job_id} to be pending again")
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm["env"], check=True)


def batch_log(slurm, job_id: int) -> str:
    return "".join(p.read_text() for p in (slurm["root"] / "jobs").rglob(f"sbatch_*_{job_id}.out"))


def losses(run: Path) -> dict:
    return {r["step"]: r.get("loss") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


#: Long enough that the preemption signal lands mid-run (a tiny step takes about a second on an idle
#: machine: with 5 steps the run once finished, and pruned step_1, before the test saw that checkpoint);
#: every checkpoint is kept so the one the test waits for cannot be pruned under it.
RUN = ("train.steps=20", "train.keep_last=25")


@pytest.fixture(scope="module")
def uninterrupted(slurm):
    job_id = submit(slurm, *RUN, "train.out_dir=plain")
    wait(lambda: job(slurm, job_id).get("JobState") == "COMPLETED", f"job {job_id} to complete")
    return slurm["root"] / "runs" / "plain"


def test_tiny_recipe_runs_on_slurm_into_the_clusters_runs_dir(uninterrupted):
    assert sorted(losses(uninterrupted)) == list(range(21))
    assert (uninterrupted / "checkpoints" / "step_20" / "meta.json").is_file()


def test_preemption_checkpoints_requeues_and_resumes_to_the_same_result(slurm, uninterrupted):
    run = slurm["root"] / "runs" / "preempted"
    job_id = submit(slurm, *RUN, "train.out_dir=preempted")
    wait(lambda: (run / "checkpoints" / "step_1" / "meta.json").is_file(), "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", str(job_id)], env=slurm["env"], check=True)  # = --signal=USR1@300
    wait(lambda: job(slurm, job_id).get("Restarts") == "1", f"job {job_id} to requeue itself")
    assert "megatron_opd: preempted, checkpointed at step" in batch_log(slurm, job_id)
    release(slurm, job_id)  # SLURM holds a requeued job for its requeue delay
    wait(lambda: job(slurm, job_id).get("JobState") == "COMPLETED", f"the requeued job {job_id} to complete")
    logs = "".join(p.read_text() for p in (slurm["root"] / "jobs").rglob(f"log-*_{job_id}_1.out"))
    assert f"resuming from {run / 'checkpoints'}/step_" in logs
    assert losses(run) == losses(uninterrupted)  # every step once, the same losses


def test_a_crashing_trainer_is_retried_a_bounded_number_of_times(slurm):
    run = slurm["root"] / "runs" / "crash"
    job_id = submit(slurm, "train.steps=50", "train.out_dir=crash")

    def kill_trainer():
        wait(lambda: (run / "metrics.jsonl").is_file(), "the trainer to start")
        subprocess.run(["pkill", "-9", "-f", "train.out_dir=/.*/crash"], check=False)

    kill_trainer()
    wait(lambda: job(slurm, job_id).get("Restarts") == "1", f"job {job_id} to be retried once")
    (run / "metrics.jsonl").unlink()
    release(slurm, job_id)
    kill_trainer()
    wait(lambda: job(slurm, job_id).get("JobState") == "FAILED", f"job {job_id} to fail for good")
    text = batch_log(slurm, job_id)
    assert "the trainer failed (exit" in text and "after 1 restart(s) (cluster.max_crash_retries=1); logs:" in text
    assert job(slurm, job_id).get("Restarts") == "1"


def test_a_wrong_environment_fails_in_seconds_without_retries(slurm):
    """The batch script checks the stack's versions on every node before torchrun (a fake pin here)."""
    env = dict(slurm["env"], MEGATRON_OPD_REQUIRE="megatron-core==9.9.9")  # sbatch exports it to the job
    out = subprocess.run([sys.executable, "-m", "launch.submit", "--recipe", RECIPE, "--cluster",
                          str(slurm["cluster"]), "train.out_dir=wrong_env"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = squeue(slurm)[0]
    t0 = time.time()
    wait(lambda: job(slurm, job_id).get("JobState") == "FAILED", f"job {job_id} to fail", timeout=120)
    assert time.time() - t0 < 60 and job(slurm, job_id).get("Restarts") == "0"
    text = batch_log(slurm, job_id)
    assert "megatron-core: installed 0.16.1, required 9.9.9" in text and "not retried" in text
    assert not (slurm["root"] / "runs" / "wrong_env").exists()  # no trainer ever started


#: One trainer rank and one dedicated engine rank in one SLURM job, one-step-off.
ONE_STEP_OFF = ("rollout.placement=dedicated", "rollout.dedicated_ranks=1", "rollout.engines_per_replica=null",
                "train.max_staleness=1")


def test_a_job_with_an_engine_rank_preempts_requeues_and_resumes_to_the_same_result(slurm):
    """rollout.placement=dedicated under SLURM: the job's second rank runs the engine only; USR1 reaches
    both ranks, the trainer checkpoints (with the batch the engine generated ahead), the job requeues and
    the resumed run's losses equal the uninterrupted job's."""
    plain, run = slurm["root"] / "runs" / "async_plain", slurm["root"] / "runs" / "async_preempted"
    job_id = submit(slurm, *RUN, *ONE_STEP_OFF, "train.out_dir=async_plain", cluster="two_ranks")
    wait(lambda: job(slurm, job_id).get("JobState") == "COMPLETED", f"job {job_id} to complete")
    job_id = submit(slurm, *RUN, *ONE_STEP_OFF, "train.out_dir=async_preempted", cluster="two_ranks")
    wait(lambda: (run / "checkpoints" / "step_1" / "meta.json").is_file(), "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", str(job_id)], env=slurm["env"], check=True)
    wait(lambda: job(slurm, job_id).get("Restarts") == "1", f"job {job_id} to requeue itself")
    assert "megatron_opd: preempted, checkpointed at step" in batch_log(slurm, job_id)
    step = int((run / "PREEMPTED").read_text())  # removed when the resumed run starts
    assert (run / "checkpoints" / f"step_{step}" / "in_flight.pt").is_file()  # the batch generated ahead
    release(slurm, job_id)
    wait(lambda: job(slurm, job_id).get("JobState") == "COMPLETED", f"the requeued job {job_id} to complete")
    assert losses(run) == losses(plain)
    assert sorted(losses(plain)) == list(range(21))
