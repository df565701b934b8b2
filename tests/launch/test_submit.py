"""launch.submit: rendered sbatch of every cluster recipe (dry run), and validation before submission."""

import io
import sys
from pathlib import Path

import pytest

from launch.cluster import ClusterConfig
from launch.submit import check_layout, main, render_sbatch
from megatron_opd.config import load_config
from mopd_testing import REPO_ROOT

CLUSTER = str(REPO_ROOT / "configs" / "clusters" / "example_slurm.yaml")
RECIPES = ["exopd_30b_a3b_to_4b", "exopd_rc_30b_a3b_to_4b", "exopd_30b_a3b_to_1p7b", "opd_30b_a3b_to_4b",
           "multi_teacher_4b", "reopold_30b_a3b_to_4b"]


def _render(recipe, capsys):
    sys.stdin = io.StringIO()
    assert main(["--recipe", str(REPO_ROOT / "configs" / "recipes" / f"{recipe}.yaml"), "--cluster", CLUSTER,
                 "--dryrun"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", RECIPES)
def test_dryrun_renders_sbatch_and_torchrun(recipe, capsys):
    cfg = load_config(REPO_ROOT / "configs" / "recipes" / f"{recipe}.yaml")
    text = _render(recipe, capsys)
    for line in ("#SBATCH --account=my_account", "#SBATCH --partition=batch", f"#SBATCH --nodes={cfg.launch.nodes}",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", f"#SBATCH --time={cfg.launch.time}",
                 "#SBATCH --requeue", "#SBATCH --signal=USR1@300"):
        assert line in text, line
    srun = [l for l in text.splitlines() if l.startswith("srun") and "torchrun" in l]
    assert len(srun) == 1
    assert f"--nnodes {cfg.launch.nodes}" in srun[0] and "--nproc-per-node 8" in srun[0]
    assert f"-m megatron_opd.cli train --config configs/recipes/{recipe}.yaml" in srun[0]
    # an absolute run directory from the cluster's runs_dir: a resubmission resumes
    assert srun[0].rstrip().endswith(f"train.out_dir=/workspace/megatron_opd/runs/{Path(cfg.train.out_dir).name}")
    # preemption: torchrun forwards SIGUSR1 and waits; the exit trap requeues on PREEMPTED, retries crashes
    for line in ("export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                 "export PET_SHUTDOWN_TIMEOUT=280", 'if [ -f "$mopd_preempted" ]; then',
                 f"mopd_preempted=/workspace/megatron_opd/runs/{Path(cfg.train.out_dir).name}/PREEMPTED",
                 'scontrol requeue "$SLURM_JOB_ID"', "trap mopd_on_exit EXIT",
                 f"srun --nodes={cfg.launch.nodes} --ntasks-per-node=1 --container-image /lustre/megatron_opd/images/megatron_opd-0.1.0.sqsh"):
        assert line in text, line
    assert text.index("trap mopd_on_exit EXIT") < text.index("megatron_opd.cli check-env") < text.index("srun --output")
    assert "--container-image /lustre/megatron_opd/images/megatron_opd-0.1.0.sqsh" in srun[0]
    assert "/tmp/mopd_dryrun_" not in text  # the real job_dir is shown, nothing was written there


def test_dryruns_write_nothing_into_the_checkout(capsys):
    """Rendering used to write nemo-run role configs into ./configs (two such files were committed)."""
    def files():
        return sorted([*REPO_ROOT.glob("*"), *(REPO_ROOT / "configs").rglob("*")])

    before = files()
    for recipe in RECIPES:
        _render(recipe, capsys)
    assert files() == before


def test_separate_rollout_mode_is_gone():
    """`rollout.mode: separate` never reached its servers (the trainer built its own engine): removed,
    and refused as an unknown key rather than accepted and ignored."""
    for key in ("rollout.mode=separate", "launch.rollout_nodes=2"):
        with pytest.raises(ValueError, match="config error"):
            load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml", [key])


@pytest.mark.parametrize("text, message", [
    ("partition: batch\n", r"missing required cluster field\(s\) \['account'\]"),
    ("account: a\npartition: b\nmounts: ['/nocolon']\n", "host_path:container_path"),
    ("account: a\npartition: b\nshutdown_timeout_s: 400\n",
     r"shutdown_timeout_s=400 must be below the preempt_signal lead time"),
    ("account: a\npartition: b\ngpus_per_node: 0\n", "needs cluster.processes_per_node"),
], ids=["missing_account", "bad_mount", "grace_above_signal_lead", "cpu_nodes_without_processes"])
def test_bad_cluster_yaml_is_one_message(tmp_path, text, message):
    bad = tmp_path / "c.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
        ClusterConfig.from_yaml(bad)


def test_gpu_count_must_fit_layout():
    cfg = load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml", ["launch.nodes=1"])
    with pytest.raises(ValueError, match=r"world size 8 is not divisible by ETP x EP x PP = 1 x 8 x 2 = 16"):
        check_layout(cfg, 8)  # megatron-core needs 16 GPUs for ETP1 x EP8 x PP2
    assert check_layout(load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml"), 8) == 32
    cfg = load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml", ["launch.nodes=1"])
    with pytest.raises(ValueError, match=r"not divisible by TP x PP = 4 x 2 = 8"):
        check_layout(cfg, 6)
    with pytest.raises(ValueError, match="exceeds gpus_per_node"):
        check_layout(load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml",
                                 ["parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=1"]), 4)


def test_relative_out_dir_without_runs_dir_is_refused(tmp_path):
    """A relative train.out_dir used to land inside each job's directory: a resubmission could not resume."""
    from launch.submit import run_dir

    cluster = tmp_path / "c.yaml"
    cluster.write_text("account: a\npartition: b\n")
    cfg = load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml")
    with pytest.raises(ValueError, match="train.out_dir='runs/.*' is relative.*Set cluster.runs_dir"):
        run_dir(cfg, ClusterConfig.from_yaml(cluster))
    cluster.write_text("account: a\npartition: b\nruns_dir: /shared/runs\n")
    assert run_dir(cfg, ClusterConfig.from_yaml(cluster)) == f"/shared/runs/{Path(cfg.train.out_dir).name}"


@pytest.mark.vllm
def test_local_run_keeps_overrides_with_spaces_and_reports_a_failed_job(tmp_path):
    """Through nemo-run's LocalExecutor: an override with spaces and brackets used to reach the job with
    literal quotes (YAML error inside the job) while launch.submit exited 0."""
    import json
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", MOPD_TINY_DIR=str(tmp_path / "tiny"),
               PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, "-m", "megatron_opd.cli", "init-tiny", str(tmp_path / "tiny")], env=env,
                   check=True, capture_output=True, timeout=300)

    def submit(*overrides):
        return subprocess.run([sys.executable, "-m", "launch.submit", "--recipe", "configs/recipes/tiny_opd.yaml",
                               "launch.gpus_per_node=1", "train.steps=1", *overrides], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=600)

    ok = submit(f"teachers=[{{checkpoint: {tmp_path / 'tiny' / 'teacher'}}}]", f"train.out_dir={tmp_path / 'run'}")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]
    bad = submit("teachers=[{checkpoint: /nonexistent/teacher}]", f"train.out_dir={tmp_path / 'bad'}")
    # the rank's one line, not torchrun's ChildFailedError report, and exit 2 as `megatron-opd train` says it
    assert bad.returncode == 2, bad.stderr[-3000:]
    said = bad.stderr.strip().splitlines()[-1]
    assert said.startswith("launch.submit: error: ") and "/nonexistent/teacher" in said and "(logs: " in said
    assert "ChildFailedError" not in bad.stderr


def test_user_errors_are_one_line_before_any_job(tmp_path):
    """A layout the world cannot split and a YAML syntax error: exit 2 with one line, before torchrun
    (under torchrun the first would end in a 44-line ChildFailedError report)."""
    import subprocess

    def submit(recipe, *overrides):
        return subprocess.run([sys.executable, "-m", "launch.submit", "--recipe", str(recipe), *overrides],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    split = submit("configs/recipes/tiny_opd.yaml", "launch.gpus_per_node=2", "train.prompts_per_step=3")
    assert split.returncode == 2 and split.stderr.strip().splitlines() == [
        "launch.submit: error: train.prompts_per_step=3 does not split over 2 data-parallel replicas; use a "
        "multiple of the data-parallel size (world size / (TP x PP))"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: " + str(REPO_ROOT / "configs/recipes/tiny_opd.yaml") + "\ntrain:\n  steps: [1, 2\n")
    syntax = submit(bad)
    assert syntax.returncode == 2 and syntax.stderr.strip().splitlines() == [
        f"launch.submit: error: config file {bad}: YAML syntax error at line 4, column 1 (did not find expected "
        "',' or ']'); fix it there"]


def test_dedicated_engine_gpus_are_taken_from_the_end_of_the_job():
    """rollout.placement=dedicated: the training layout must fit the GPUs left after the engine ranks."""
    recipe = REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml"
    dedicated = ["rollout.placement=dedicated", "rollout.engines_per_replica=null", "launch.nodes=5"]
    assert check_layout(load_config(recipe, [*dedicated, "rollout.dedicated_ranks=8"]), 8) == 40
    with pytest.raises(ValueError, match=r"minus rollout.dedicated_ranks=4: 36 trainer GPUs: world size 36 is not "
                                         r"divisible by TP x PP = 4 x 2 = 8"):
        check_layout(load_config(recipe, [*dedicated, "rollout.dedicated_ranks=4"]), 8)
