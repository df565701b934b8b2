"""The OPD trainer end to end on tiny random models: TP=2 / PP=2 runs, resume after kill -9, SIGTERM
mid-step, a changed config on resume, non-finite steps, vocabulary mismatch, crash while saving."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_opd.data.tokenizer import train_tokenizer
from megatron_opd.models.hf_tiny import save_tiny_checkpoint
from mopd_testing import REPO_ROOT, last_json, run_overrides, run_ranks, tiny_spec, wandb_rows

WORKER = Path(__file__).parent / "workers" / "train_run.py"
RECIPE = str(REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml")
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tok = tmp_path_factory.mktemp("tok")
    train_tokenizer(tok)
    student = save_tiny_checkpoint(tiny_spec("tiny_qwen3"), tmp_path_factory.mktemp("student"), seed=0,
                                   tokenizer_dir=tok, init_std=0.1)
    teacher = save_tiny_checkpoint(tiny_spec("tiny_qwen3"), tmp_path_factory.mktemp("teacher"), seed=1,
                                   tokenizer_dir=tok, init_std=0.1)
    return student, teacher


overrides = run_overrides


def metrics(out_dir):
    return [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", [
    # slow (make test's time budget): in make test a TP = 2 trainer runs in the resharded TP2 -> TP1 resume,
    # a PP = 2 trainer step in tests/test_trainer_exact_kl.py, the PP = 2 export of every HF tensor in
    # tests/models/test_hf_mapping.py
    pytest.param(["parallel.tensor_model_parallel_size=2"], marks=pytest.mark.slow),
    pytest.param(["parallel.pipeline_model_parallel_size=2"], marks=pytest.mark.slow)], ids=["tp2", "pp2"])
def test_two_step_run_completes(models, tmp_path, layout):
    out = tmp_path / "run"
    run_ranks(WORKER, 2, "--config", RECIPE, *overrides(models, out, *layout), timeout=500)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["kl/student_teacher"] > 0 and rows[1]["loss"] != 0  # a real teacher signal
    assert rows[2]["mismatch/max_abs"] < 1e-3  # refit kept vLLM == trainer
    assert (out / "checkpoints" / "step_2" / "meta.json").is_file() and (out / "curves.png").is_file()


def _launch(models, out, steps, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, str(WORKER), "--config", RECIPE,
           *overrides(models, out, f"train.steps={steps}", "train.save_every=1", *extra)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(path: Path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-4000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference_run(models, tmp_path_factory):
    """An uninterrupted 3-step run: what every interrupted-and-resumed run must reproduce exactly."""
    ref = tmp_path_factory.mktemp("ref")
    run_ranks(WORKER, 1, "--config", RECIPE, *overrides(models, ref, "train.steps=3"), timeout=400)
    return {r["step"]: r for r in metrics(ref)}


@pytest.mark.slow  # the SIGKILL-at-random-points test (slow) kills at every phase
def test_kill9_then_resume_gives_same_next_step_loss(models, reference_run, tmp_path):
    killed = tmp_path / "killed"
    proc = _launch(models, killed, 3)
    _wait_for(killed / "checkpoints" / "step_1" / "meta.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 mid-run (the engine subprocess too)
    proc.wait()
    run_ranks(WORKER, 1, "--config", RECIPE, *overrides(models, killed, "train.steps=3"), timeout=400)
    a = reference_run
    b = {r["step"]: r for r in metrics(killed)}
    assert sorted(b) == [0, 1, 2, 3], "metrics.jsonl must hold each step once after resume"
    assert b[3]["loss"] == a[3]["loss"] and b[2]["loss"] == a[2]["loss"]


@pytest.mark.slow  # make test's time budget
def test_kill9_of_the_trainer_leaves_no_process_behind(models, tmp_path):
    """kill -9 of the trainer alone (the OOM killer, a node agent) left megatron's checkpoint-writer
    Manager and Python's resource tracker running, orphaned; every helper now dies with it."""
    import psutil

    out = tmp_path / "orphans"
    proc = _launch(models, out, 3)
    try:
        _wait_for(out / "checkpoints" / "step_1" / "meta.json", proc)
        helpers = psutil.Process(proc.pid).children(recursive=True)
        assert len(helpers) >= 2, helpers  # the checkpoint writer, the engine (and their trackers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(helpers, timeout=30)
        assert not alive, [(p.pid, " ".join(p.cmdline()[:4])) for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _cli_train(models, out, *extra, fault=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    if fault:
        env["MEGATRON_OPD_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "megatron_opd.cli", "train", "--config", RECIPE,
                           *overrides(models, out, "train.steps=3", "train.save_every=1", *extra)],
                          env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize("fault, kept, why", [
    ("phase_score#1:SIGTERM", 1, "step 2 abandoned before its update"),
    ("phase_update#1:SIGTERM", 2, "step 2 kept, its refit skipped"),
], ids=["during_score", "during_update"])
def test_sigterm_mid_step_checkpoints_exits_preempted_and_resumes_exactly(models, reference_run, tmp_path,
                                                                         fault, kept, why):
    """A preemption signal is acted on between phases, not only between steps: before the update the
    step is abandoned (the checkpoint holds the state it started from: data position and RNG), after
    it the step is kept. Either way the run exits with PREEMPTED_EXIT_CODE and the resumed run equals
    the uninterrupted one."""
    from megatron_opd.signals import PREEMPTED_EXIT_CODE

    out = tmp_path / "term"
    done = _cli_train(models, out, fault=fault)
    assert done.returncode == PREEMPTED_EXIT_CODE, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"preempted: checkpointed at step {kept} of 3" in done.stdout, why
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{kept}"
    assert [r["step"] for r in metrics(out)] == list(range(kept + 1))
    resumed = _cli_train(models, out)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step_{kept}'}" in resumed.stdout
    got = {r["step"]: r for r in metrics(out)}
    assert sorted(got) == [0, 1, 2, 3]
    assert [got[k]["loss"] for k in (1, 2, 3)] == [reference_run[k]["loss"] for k in (1, 2, 3)]


def test_resume_with_a_changed_config_is_refused_unless_forced(models, tmp_path):
    """Continuing a run with another objective used to go on silently (and overwrite config.yaml)."""
    from megatron_opd.config import config_to_dict, load_config
    from megatron_opd.trainer import OPDTrainer, check_resumable

    out = tmp_path / "changed"
    ckpt = out / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)
    written = config_to_dict(load_config(RECIPE, overrides(models, out)))
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "config": written}))
    t0 = time.time()
    with pytest.raises(ValueError, match=r"train.resume: .*step_1 was written with a different config "
                                         r"\(optim.lr: 0.0001 -> 3e-05\).*train.resume=force"):
        OPDTrainer(load_config(RECIPE, overrides(models, out, "optim.lr=3e-5"))).setup()
    assert time.time() - t0 < 30 and not (out / "config.yaml").exists()  # before any compute or write
    assert check_resumable(ckpt, load_config(RECIPE, overrides(models, out, "train.steps=7", "train.eval_every=1")),
                           dp=1) == []


def test_resume_at_another_layout_is_said_and_force_lists_what_changed(models, tmp_path):
    """A layout change (TP / PP / EP, the data-parallel size the world sets) continues the same run:
    allowed by train.resume=true and said; train.resume=force lists every other change it accepts; a
    distributed-optimizer checkpoint (sharded for its layout) is refused at another one, forced or not."""
    from megatron_opd.config import config_to_dict, load_config
    from megatron_opd.trainer import check_resumable

    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step_1"
    ckpt.mkdir(parents=True)

    def written(*extra):
        cfg = config_to_dict(load_config(RECIPE, overrides(models, out, "parallel.tensor_model_parallel_size=2",
                                                           *extra)))
        (ckpt / "meta.json").write_text(json.dumps({"step": 1, "config": cfg, "layout": {"tp": 2, "dp": 1}}))

    written()
    assert check_resumable(ckpt, load_config(RECIPE, overrides(models, out)), dp=2) == [
        "resuming at a new layout (parallel.tensor_model_parallel_size: 2 -> 1; data-parallel size: 1 -> 2): "
        "the checkpoint is resharded on load"]
    forced = load_config(RECIPE, overrides(models, out, "train.resume=force", "optim.lr=3e-5",
                                           "parallel.tensor_model_parallel_size=2"))
    assert check_resumable(ckpt, forced, dp=1) == [
        "train.resume=force: continuing with a changed config (optim.lr: 0.0001 -> 3e-05)"]
    written("optim.use_distributed_optimizer=true")
    for resume in ("true", "force"):
        with pytest.raises(ValueError, match=r"holds distributed-optimizer state sharded for the layout that wrote "
                                             r"it, which cannot be resumed at another \(parallel.tensor_model_"
                                             r"parallel_size: 2 -> 1\); resume at the checkpoint's layout"):
            check_resumable(ckpt, load_config(RECIPE, overrides(models, out, f"train.resume={resume}",
                                                                "optim.use_distributed_optimizer=true")), dp=1)


@pytest.mark.parametrize("first, then, nproc", [
    (["parallel.tensor_model_parallel_size=2"], [], (2, 1)),
    pytest.param([], [], (1, 2), marks=pytest.mark.slow),
], ids=["tp2_to_tp1", "dp1_to_dp2"])
def test_resharded_resume_continues_as_the_uninterrupted_run_at_the_new_layout(models, reference_run, tmp_path,
                                                                             first, then, nproc):
    """Step 1 at one layout, then steps 2-3 at another: the next losses equal an uninterrupted run at the
    new layout (the weights after step 1 differ between layouts by fp32 round-off only)."""
    def run(out, n, steps, *extra):
        return run_ranks(WORKER, n, "--config", RECIPE, *overrides(models, out, f"train.steps={steps}", *extra),
                         timeout=500)

    run(tmp_path / "moved", nproc[0], 1, *first)
    said = run(tmp_path / "moved", nproc[1], 3, *then)
    change = ("parallel.tensor_model_parallel_size: 2 -> 1" if first else "data-parallel size: 1 -> 2")
    assert f"resuming at a new layout ({change}): the checkpoint is resharded on load" in said
    if nproc[1] == 1:  # the new layout is the module's uninterrupted single-process run
        ref = reference_run
    else:
        run(tmp_path / "uninterrupted", nproc[1], 3, *then)
        ref = {r["step"]: r for r in metrics(tmp_path / "uninterrupted")}
    moved = {r["step"]: r for r in metrics(tmp_path / "moved")}
    assert sorted(moved) == [0, 1, 2, 3]
    for step in (2, 3):
        assert moved[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5, abs=1e-7), step


def test_nonfinite_loss_skips_step_and_counts(models, tmp_path):
    out = tmp_path / "nan"
    text = run_ranks(WORKER, 1, "--config", RECIPE, "--inject-nan-step", "1",
                     *overrides(models, out, "train.steps=3"), timeout=400)
    result = last_json(text, "step")
    assert (result["step"], result["skipped_steps"]) == (3, 1)
    rows = {r["step"]: r for r in metrics(out)}
    assert rows[2]["skipped_steps"] == 1 and rows[1]["skipped_steps"] == 0


def test_colocated_step_phase_order(models, tmp_path):
    """One colocated step runs rollout -> sleep -> score (each offloaded frozen model brought in and
    parked again around its own forward) -> update -> wake -> refit, and ends with the engine awake.
    On CPU sleep/wake/offload do no memory work, but the same calls run in this order."""
    student, teacher = models
    text = run_ranks(WORKER, 1, "--config", RECIPE, "--record-calls", *overrides(
        models, tmp_path / "phases", "train.steps=1", "objective.gopd.lam=1.25",
        f"teachers=[{{checkpoint: {teacher}, offload: true}}]",
        "reference={offload: true}"), timeout=400)  # no checkpoint: the student's base runs as reference
    result = last_json(text, "step")
    import yaml

    resolved = yaml.safe_load((tmp_path / "phases" / "config.yaml").read_text())
    assert resolved["reference"] == {"checkpoint": str(student), "spec": None, "domain": None, "offload": True,
                                     "tokenizer": "same"}
    # what the step did, recorded at the engine's, platform's and models' own entry points
    assert result["calls"] == [
        "generate", "engine.sleep",
        "onload:teachers[0]", "forward:teachers[0]", "offload:teachers[0]",
        "onload:reference", "forward:reference", "offload:reference",
        "train:student",
        "engine.wake_up['weights']", "engine.begin_refit", "engine.end_refit(complete=True)",
        "engine.wake_up['kv_cache']"], result["calls"]
    assert result["phases"] == ["rollout", "sleep", "score", "onload:teachers[0]", "offload:teachers[0]",
                                "onload:reference", "offload:reference", "update", "wake", "refit"]
    assert result["engine_asleep"] == []


def test_lr_schedule_counts_mini_batches_and_extends_on_resume(models, tmp_path):
    """Linear decay over train.steps x mini_batches optimizer updates; a finished 2-step run extended to
    4 steps continues the decay over the new length instead of training at min_lr (the old schedule
    length used to come back from the checkpoint)."""
    out = tmp_path / "sched"
    schedule = ["optim.lr=1.0e-4", "optim.lr_decay_style=linear", "train.mini_batches=2",
                "metrics.wandb={project: mopd-test, mode: offline}"]  # and W&B, resumed into the same run
    run_ranks(WORKER, 1, "--config", RECIPE, *overrides(models, out, "train.steps=2", *schedule), timeout=400)
    text = run_ranks(WORKER, 1, "--config", RECIPE, *overrides(models, out, "train.steps=4", *schedule),
                     timeout=400)
    assert f"resuming from {out / 'checkpoints' / 'step_2'} (step 2 of 4)" in text
    lr = {r["step"]: r["lr"] for r in metrics(out) if "lr" in r}
    # lr after step k = 1e-4 x (1 - 2k / (2 x steps)): two updates per step
    assert lr[1] == pytest.approx(0.5e-4) and lr[2] == pytest.approx(0.0, abs=1e-12)  # 2-step run
    assert lr[3] == pytest.approx(0.25e-4) and lr[4] == pytest.approx(0.0, abs=1e-12)  # extended to 4

    # W&B (offline): both parts of the run log into one W&B run, every step's metrics as metrics.jsonl has them
    run_id = (out / "wandb_run_id").read_text()
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2
    logged = {row["_step"]: row for row in wandb_rows(out, 5)}
    assert sorted(logged) == [r["step"] for r in metrics(out)] == [0, 1, 2, 3, 4]
    for r in metrics(out):
        assert all(logged[r["step"]][k] == pytest.approx(v) for k, v in r.items()
                   if k != "step" and isinstance(v, float) and math.isfinite(v))


def test_fresh_run_into_an_earlier_runs_directory_keeps_its_own_checkpoint(models, tmp_path):
    """train.resume=false into a directory holding higher steps: pruning used to keep the highest step
    numbers and delete the checkpoint just written while `latest` named it (the demo did this)."""
    from megatron_opd.checkpoint import latest_checkpoint

    out = tmp_path / "again"
    run_ranks(WORKER, 1, "--config", RECIPE, *overrides(models, out, "train.steps=2", "train.keep_last=1"),
              timeout=400)
    text = run_ranks(WORKER, 1, "--config", RECIPE, *overrides(
        models, out, "train.steps=1", "train.keep_last=1", "train.resume=false"), timeout=400)
    assert "moved to" in text and latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step_1"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_1"]
    earlier = out / "previous_runs" / "1"  # the earlier run, kept aside whole
    assert (earlier / "checkpoints" / "step_2" / "meta.json").is_file()
    assert [json.loads(l)["step"] for l in (earlier / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_fresh_runs_set_every_earlier_run_aside_numbered_and_never_delete_one(tmp_path):
    """Two fresh runs after a first one: each earlier run's outputs move whole to previous_runs/<N>/
    (the second fresh run used to delete the first one's `checkpoints.previous`, and every fresh run
    overwrote metrics.jsonl, config.yaml and curves.png and mixed TensorBoard events)."""
    from megatron_opd.checkpoint import set_aside_earlier_run

    out = tmp_path / "run"

    def fake_run(tag):
        (out / "checkpoints" / "step_1").mkdir(parents=True)
        (out / "checkpoints" / "step_1" / "meta.json").write_text(tag)
        (out / "tensorboard").mkdir()
        (out / "tensorboard" / "events").write_text(tag)
        for name in ("metrics.jsonl", "config.yaml", "curves.png"):
            (out / name).write_text(tag)
        (out / "notes.txt").write_text("the user's own file")

    assert set_aside_earlier_run(out) is None  # nothing there yet
    fake_run("first")
    assert set_aside_earlier_run(out) == out / "previous_runs" / "1"
    fake_run("second")
    assert set_aside_earlier_run(out) == out / "previous_runs" / "2"
    for n, tag in ((1, "first"), (2, "second")):
        kept = out / "previous_runs" / str(n)
        assert all((kept / f).read_text() == tag for f in ("metrics.jsonl", "config.yaml", "curves.png",
                                                           "tensorboard/events", "checkpoints/step_1/meta.json"))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "previous_runs"]


def test_reward_correction_without_a_reference_checkpoint_is_refused():
    """It needs the teacher's pre-RL base; falling back to the student's weights would be silently wrong."""
    from megatron_opd.config import load_config

    for ref in ["reference=null", "reference={offload: true}"]:
        with pytest.raises(ValueError, match="reward_correction=true needs reference.checkpoint"):
            load_config(RECIPE, ["objective.gopd.lam=1.25", "objective.gopd.reward_correction=true", ref,
                                 "teachers=[{checkpoint: null}]"])


def test_mini_batches_must_divide_a_replicas_micro_batches():
    from megatron_opd.config import load_config
    from megatron_opd.trainer import check_batch_split

    cfg = load_config(RECIPE, ["train.mini_batches=3", "teachers=[{checkpoint: null}]"])
    with pytest.raises(ValueError, match=r"train.mini_batches=3 does not divide the 2 micro-batches"):
        check_batch_split(cfg, dp=1)
    check_batch_split(load_config(RECIPE, ["train.mini_batches=2", "teachers=[{checkpoint: null}]"]), dp=1)


@pytest.mark.slow  # the SIGKILL-at-random-points test kills inside saves too
def test_crash_while_saving_keeps_previous_checkpoint(models, tmp_path):
    out = tmp_path / "crash"
    with pytest.raises(AssertionError, match="injected crash while saving"):
        run_ranks(WORKER, 1, "--config", RECIPE, "--crash-save-step", "2",
                  *overrides(models, out, "train.steps=3"), timeout=400)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_1"
    assert (ckpts / "step_1" / "meta.json").is_file() and not (ckpts / "step_2").exists()
    # the previous checkpoint still loads and training continues from it
    run_ranks(WORKER, 1, "--config", RECIPE, *overrides(models, out, "train.steps=2"), timeout=400)
    assert (ckpts / "step_2" / "meta.json").is_file() and not (ckpts / "step_2.tmp").exists()


@pytest.mark.slow  # tests/test_checkpoint.py checks the rule itself
def test_a_damaged_newest_checkpoint_is_passed_over_and_kept(models, tmp_path):
    """A checkpoint whose shard, common state or RNG file is gone (or truncated) after it was written is
    found by its manifest: the run resumes from the newest complete one, saying which it passed over and
    why, and the damaged one is kept aside (damaged_step_N), not overwritten by the new step's save."""
    from megatron_opd.checkpoint import checkpoint_problem, latest_checkpoint

    out = tmp_path / "damaged"
    run_ranks(WORKER, 1, "--config", RECIPE, *overrides(models, out, "train.steps=2"), timeout=400)
    ckpts = out / "checkpoints"
    manifest = json.loads((ckpts / "step_2" / "meta.json").read_text())["manifest"]
    assert "rng_rank0.pt" in manifest and any(n.endswith(".distcp") for n in manifest)
    assert checkpoint_problem(ckpts / "step_2") is None
    shard = next(n for n in manifest if n.endswith(".distcp"))
    (ckpts / "step_2" / shard).unlink()
    said = []
    assert latest_checkpoint(ckpts, report=said.append) == ckpts / "step_1"
    assert said == [f"checkpoint {ckpts / 'step_2'} is incomplete ({shard} is missing): passed over and kept as it is"]
    text = run_ranks(WORKER, 1, "--config", RECIPE, *overrides(models, out, "train.steps=3"), timeout=400)
    assert said[0] in text and f"resuming from {ckpts / 'step_1'}" in text
    assert checkpoint_problem(ckpts / "step_3") is None and checkpoint_problem(ckpts / "step_2") is None
    assert (ckpts / "damaged_step_2" / "meta.json").is_file()  # the damaged one, as it was


def test_teacher_with_different_vocabulary_is_refused_at_startup(models, tmp_path):
    from megatron_opd.config import load_config
    from megatron_opd.trainer import OPDTrainer

    other = save_tiny_checkpoint(tiny_spec("tiny_qwen3", vocab_size=640), tmp_path / "t640", seed=2,
                                 tokenizer_dir=models[0], init_std=0.1)
    cfg = load_config(RECIPE, [f"student.checkpoint={models[0]}", f"teachers=[{{checkpoint: {other}}}]",
                               f"train.out_dir={tmp_path / 'v'}"])
    t0 = time.time()
    with pytest.raises(ValueError, match=r"teachers\[0\].*vocab_size=640.*student.*512"):
        OPDTrainer(cfg).setup()
    assert time.time() - t0 < 30 and not (tmp_path / "v").exists()  # refused before any compute


def test_warmup_longer_than_run_is_a_config_error(models, tmp_path):
    from megatron_opd.config import load_config

    with pytest.raises(ValueError, match="optim.lr_warmup_steps=5 must be below train.steps=2"):
        load_config(RECIPE, overrides(models, tmp_path, "optim.lr_warmup_steps=5"))


def _retokenized_copy(src_ckpt: Path, dst: Path, edit) -> Path:
    """The checkpoint `src_ckpt` with its tokenizer replaced by `edit(tokenizer_dir)`'s output."""
    import shutil

    shutil.copytree(src_ckpt, dst)
    for f in dst.glob("tokenizer*"):
        f.unlink()
    edit(dst)
    return dst


def test_teacher_with_same_size_but_different_token_map_is_refused(models, tmp_path):
    """Same vocab_size (512), different token -> id map: refused before any process group, naming
    the role and the first differing token."""
    from megatron_opd.config import load_config
    from megatron_opd.trainer import OPDTrainer

    other = _retokenized_copy(models[1], tmp_path / "t", lambda d: train_tokenizer(
        d, texts=["Reverse the string zyxw. Sort 9 8 7 and say the answer is 42."] * 50 + ["Compute 12+34."] * 50))
    cfg = load_config(RECIPE, [f"student.checkpoint={models[0]}", f"teachers=[{{checkpoint: {other}}}]",
                               f"train.out_dir={tmp_path / 'v'}"])
    t0 = time.time()
    with pytest.raises(ValueError, match=r"teachers\[0\] .* different tokenizer from the student.*token '.+' is id"):
        OPDTrainer(cfg).setup()
    assert time.time() - t0 < 30 and not (tmp_path / "v").exists()


def test_reference_with_different_chat_special_token_is_refused(models, tmp_path):
    from transformers import AutoTokenizer

    from megatron_opd.trainer import check_tokenizers

    def other_eos(d):
        tok = AutoTokenizer.from_pretrained(str(models[0]))
        tok.eos_token = "<|endoftext|>"
        tok.save_pretrained(str(d))

    ref = _retokenized_copy(models[0], tmp_path / "r", other_eos)
    with pytest.raises(ValueError, match=r"reference .* special token eos_token='<\|endoftext\|>' but the "
                                         r"student has '<\|im_end\|>'"):
        check_tokenizers(models[0], [("teachers[0]", models[1]), ("reference", ref)])
    check_tokenizers(models[0], [("teachers[0]", models[1])])  # identical tokenizers pass


#: Where a SIGKILL can land, by phase (faults.py names the points; a kill inside a phase leaves the same
#: files on disk as one at its start, so the points that matter are the phases and every stage of a save).
KILL_POINTS = {
    "rollout": ["phase_rollout", "phase_sleep"],
    "scoring": ["phase_score"],
    "update": ["phase_update"],
    "refit": ["phase_wake", "phase_refit", "refit_bucket"],
    "checkpoint": ["step_logged", "checkpoint_files_written", "checkpoint_renamed"],
}


def _checkpoint_state(ckpt: Path) -> dict:
    """Every tensor of a dist_checkpointing checkpoint (model and optimizer moments, read with torch's
    own DCP reader, not megatron_opd's), its common state (optimizer steps) and meta.json's scheduler,
    data position and counters."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = ckpt.parent / f"{ckpt.name}.flat.pt"
    dcp_to_torch_save(str(ckpt), str(flat))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.pop("config")  # names its own out_dir
    return {"tensors": torch.load(flat, weights_only=False), "meta": meta,
            "common": torch.load(ckpt / "common.pt", weights_only=False)}


def _assert_identical(a, b, path="state"):
    import torch

    if isinstance(a, dict):
        assert sorted(a) == sorted(b), f"{path}: keys differ"
        for k in a:
            _assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path}: max |diff| {(a.float() - b.float()).abs().max().item()}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_ends_bit_identical(models, tmp_path):
    """SIGKILL at >= 6 random points spread over rollout, scoring, update, refit and checkpoint writing,
    each time resumed from what was on disk: the final student weights, optimizer state, scheduler and
    data position equal an uninterrupted run's bit for bit, and metrics.jsonl holds each step once with
    the same losses."""
    import random

    steps, seed = 8, 20261124
    rng = random.Random(seed)
    points = [rng.choice(group) for group in KILL_POINTS.values()]
    points += rng.sample([p for group in KILL_POINTS.values() for p in group], 2)
    rng.shuffle(points)
    kills = [f"{p}#{rng.randint(0, 1)}:SIGKILL" for p in points]  # <= 1 step of progress each: all land

    ref = tmp_path / "ref"
    run_ranks(WORKER, 1, "--config", RECIPE, *overrides(models, ref, f"train.steps={steps}",
                                                        "train.save_every=1"), timeout=600)
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, str(WORKER), "--config", RECIPE,
           *overrides(models, out, f"train.steps={steps}", "train.save_every=1")]

    def launch(fault=None) -> tuple[int, str]:
        # Its own session, output to a file, and the whole group killed afterwards: a SIGKILLed trainer
        # leaves megatron's checkpoint-writer Manager process behind (it would hold a pipe open).
        log = tmp_path / f"launch_{len(list(tmp_path.glob('launch_*.log')))}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, env={**env, **({"MEGATRON_OPD_FAULT": fault} if fault else {})},
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=600)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        return code, log.read_text()[-3000:]

    for fault in kills:
        code, text = launch(fault)
        assert code == -signal.SIGKILL, (
            f"seed {seed}, {fault}: expected the process to die by SIGKILL, got exit {code}\n{text}")
    code, text = launch()
    assert code == 0, text

    final = out / "checkpoints" / f"step_{steps}"
    _assert_identical(_checkpoint_state(ref / "checkpoints" / f"step_{steps}"), _checkpoint_state(final))
    a, b = metrics(ref), metrics(out)
    assert [r["step"] for r in b] == list(range(steps + 1)), f"seed {seed}, kills {kills}"
    assert [r.get("loss") for r in b] == [r.get("loss") for r in a]


@pytest.mark.parametrize("objective", [
    ["--config", str(REPO_ROOT / "configs" / "recipes" / "grpo_tiny.yaml")],
    ["objective.name=reopold", "objective.gopd=null", "objective.reopold.switch_step=1",
     "objective.reopold.exploration=mask_below_floor"],
    ["objective.gopd.estimator=full"],
    ["objective.name=sft", "objective.gopd=null", "objective.sft.correct_only=false"],
], ids=["grpo", "reopold-exploration-then-refinement", "gopd-exact-kl", "sft-on-teacher-samples"])
def test_each_objective_trains_through_the_real_loop(models, tmp_path, objective):
    """Two steps with vLLM rollouts and refit: the loop provides what each objective asks for."""
    student, _ = models
    out = tmp_path / "run"
    if objective[0] == "--config":  # a recipe of its own (GRPO: no teacher)
        args = [*objective, f"student.checkpoint={student}", f"train.out_dir={out}"]
    else:
        args = ["--config", RECIPE, *overrides(models, out, *objective)]
    run_ranks(WORKER, 1, *args, timeout=400)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["loss"] == r["loss"] for r in rows[1:])  # finite, present
    name = objective[-1]
    if "grpo" in name:
        assert rows[1]["score/teacher_sequences"] == 0  # no teacher ran
        assert "advantage/mean" in rows[1] and "kl/student_teacher" not in rows[1]
    elif "reopold" in name:
        assert [r["reopold/phase"] for r in rows[1:]] == [0.0, 1.0]  # exploration, then refinement
        assert rows[2]["reopold/fraction_kept"] == pytest.approx(0.5, abs=0.1)  # top-50 % by entropy
    elif "sft" in name:
        # the batch is the teacher's (its engine's log-probs): a forward-KL estimate, no mismatch probe
        assert rows[1]["kl/teacher_student"] > 0 and rows[1]["score/teacher_sequences"] == 0
        assert "mismatch/max_abs" not in rows[1]
        return
    else:
        assert rows[1]["kl/student_teacher_exact"] > 0
    assert rows[2]["mismatch/max_abs"] < 1e-3
