"""`megatron-opd erpd` end to end at toy budgets on tiny random models (vLLM rollouts and evaluation,
Megatron stages): stage-1 candidates evaluated with their exact KL to pi_old, the stored signal of
strategies 1 and 2, a summed ensemble of two stage-1 teachers, results JSON and table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_opd.objectives import whiten, whiten_batch
from mopd_testing import REPO_ROOT, run_ranks, tiny_checkpoints

RECIPE = str(REPO_ROOT / "configs" / "recipes" / "erpd_tiny.yaml")
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory, (0, 1))


@pytest.fixture(scope="module")
def student(models):
    return models[0]


def erpd(student, out, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "erpd", "--config", RECIPE,
                           f"student.checkpoint={student}", f"train.out_dir={out}", *overrides],
                          capture_output=True, text=True, timeout=400, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((Path(out) / "erpd_results.json").read_text())


@pytest.mark.parametrize("overrides", [
    ["objective.erpd.stage1.loss=ce", "objective.erpd.stage2.kl_coef=0.01", "train.mini_batches=2"],
    ["objective.erpd.stage1.loss=mse", "objective.erpd.stage2.strategy=2", "objective.erpd.unlearned_step=2"],
    ["objective.erpd.stage1.loss=ce", "objective.erpd.ensemble_with=[mse]", "objective.erpd.ensemble=sum"],
    ["objective.erpd.stage1.loss=ce", "objective.erpd.ensemble_with=[ce]", "objective.erpd.ensemble=sequential"],
], ids=["ce-strategy1-two-mini-batches", "mse-strategy2", "ce+mse-summed-ensemble", "ce,ce-sequential-ensemble"])
def test_erpd_runs_both_stages_and_reports_accuracy_and_kl(student, tmp_path, overrides):
    stdout, r = erpd(student, tmp_path / "run", *overrides)
    for key in ("base_acc", "erpd_stage1_acc", "erpd_stage2_acc", "erpd_stage1_kl", "erpd_stage2_kl"):
        assert f"{key}: " in stdout and r[key] is not None
    (row,) = r["iterations"]
    losses = [t["loss"] for t in row["teachers"]]
    assert losses == ([overrides[0].split("=")[1], overrides[1].split("[")[1].rstrip("]")]
                      if "ensemble" in overrides[-1] else [overrides[0].split("=")[1]])
    assert r["erpd_stage1_acc"] == max(t["acc"] for t in row["teachers"])
    for teacher in row["teachers"]:
        assert [c["step"] for c in teacher["curve"]] == [2, 4]  # candidate_every 2, stage1_steps 4
        kls = [c["kl"] for c in teacher["curve"]]
        # a random tiny student solves nothing (every reward 0): CE still trains (it pushes the implicit
        # reward down), and so does MSE with its default signed target (-1 for a failed sample; with
        # mse_target=reward it starts at its optimum, 0 = R, and never moves): the KL to pi_old grows
        assert 0 < kls[0] < kls[1], (teacher["loss"], kls)
    if "ce" in losses:
        assert row["stage2_kl"] > 0  # the stored signal moved the student
    assert (tmp_path / "run" / "erpd_table.md").read_text().count("\n") == 3
    stage2_updates = [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                      if '"erpd/stage2_loss"' in l]
    assert len(stage2_updates) == 2 * (2 if overrides[-1].endswith("sequential") else 1)  # stage2_steps each


def test_tp2_erpd_equals_tp1(student, tmp_path):
    """The whole pipeline at TP = 2 (vocabulary-parallel KL report, sharded weight sets) against TP = 1:
    the same rollouts (seeded engines), so the same stages and the same KLs up to fp32 summation order."""
    _, one = erpd(student, tmp_path / "tp1", "objective.erpd.stage1.loss=ce")
    out = run_ranks(REPO_ROOT / "megatron_opd" / "cli.py", 2, "erpd", "--config", RECIPE,
                    f"student.checkpoint={student}", f"train.out_dir={tmp_path / 'tp2'}",
                    "objective.erpd.stage1.loss=ce", "parallel.tensor_model_parallel_size=2", timeout=600,
                    module=True)
    two = json.loads((tmp_path / "tp2" / "erpd_results.json").read_text())
    for key in ("erpd_stage1_kl", "erpd_stage2_kl"):
        assert one[key] > 0 and two[key] == pytest.approx(one[key], rel=1e-4), key


def test_strategy_3_distils_pi_old_over_a_weaker_checkpoint(models, tmp_path):
    student, weak = models
    _, r = erpd(student, tmp_path / "run", "objective.erpd.stage2.strategy=3",
                f"objective.erpd.weak_checkpoint={weak}")
    (row,) = r["iterations"]
    assert row["teachers"] == [] and r["erpd_stage1_acc"] is None  # no stage-1 teacher is trained
    assert row["stage2_kl"] > 0  # lp_old - lp_weak of two different random models: a real signal


def test_train_refuses_erpd_and_names_the_command(student, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "train", "--config", RECIPE,
                           f"student.checkpoint={student}"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), cwd=REPO_ROOT)
    assert proc.returncode == 2 and "megatron-opd erpd --config" in proc.stderr


def test_batch_whitening_uses_every_micro_batch_together():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5) * 2 + 1, torch.randn(2, 7) - 3
    ma, mb = (torch.rand(3, 5) > 0.3).float(), (torch.rand(2, 7) > 0.3).float()
    wa, wb = whiten_batch([a, b], [ma, mb])
    values = torch.cat([wa[ma.bool()], wb[mb.bool()]])
    assert abs(values.mean()) < 1e-6 and abs(values.std(unbiased=False) - 1) < 1e-5
    assert (wa[~ma.bool()] == 0).all()
    # one micro-batch: the same as whiten
    torch.testing.assert_close(whiten_batch([a], [ma])[0], whiten(a, ma))


def test_signal_strategies_on_hand_built_log_probs():
    from megatron_opd.objectives.erpd import strategy_signal

    old = torch.tensor([[-1.0, -2.0, -0.5]])
    teacher = torch.tensor([[-0.2, -2.5, -0.5]])
    unlearned = torch.tensor([[-1.5, -1.0, -3.0]])
    weak = torch.tensor([[-4.0, -2.0, -0.1]])
    torch.testing.assert_close(strategy_signal(1, old, teacher=teacher), torch.tensor([[0.8, -0.5, 0.0]]))
    torch.testing.assert_close(strategy_signal(2, old, teacher=teacher, unlearned=unlearned),
                               torch.tensor([[1.3, -1.5, 2.5]]))
    torch.testing.assert_close(strategy_signal(3, old, weak=weak), torch.tensor([[3.0, 0.0, -0.4]]))
    with pytest.raises(ValueError, match="strategy 2 needs"):
        strategy_signal(2, old, teacher=teacher)


def _stage2_losses(out) -> list:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["erpd/stage2_loss"] for r in rows if "erpd/stage2_loss" in r]


@pytest.mark.slow  # two ERPD runs (make test's time budget); the config rules are checked in make test
def test_each_ensemble_member_has_its_own_strategy(student, tmp_path):
    """The paper's best row (an MSE-unlearned signal plus a CE old-policy signal): with
    ensemble_strategies=[2, 1] and a sequential ensemble, the first round distils exactly the signal of the
    MSE member alone under strategy 2 (same stage-2 losses, update by update), and not its strategy-1 signal."""
    mse = ["objective.erpd.stage1.loss=mse", "objective.erpd.unlearned_step=2"]
    _, alone = erpd(student, tmp_path / "alone", *mse, "objective.erpd.stage2.strategy=2")
    _, paired = erpd(student, tmp_path / "paired", *mse, "objective.erpd.ensemble_with=[ce]",
                     "objective.erpd.ensemble=sequential", "objective.erpd.ensemble_strategies=[2,1]")
    assert [t["loss"] for t in paired["iterations"][0]["teachers"]] == ["mse", "ce"]
    first_round = _stage2_losses(tmp_path / "paired")[:2]
    assert first_round == _stage2_losses(tmp_path / "alone")
    _, strategy1 = erpd(student, tmp_path / "strategy1", "objective.erpd.stage1.loss=mse")
    assert first_round != _stage2_losses(tmp_path / "strategy1")


@pytest.mark.parametrize("overrides, message", [
    (["objective.erpd.ensemble_strategies=[2]"], "needs ensemble_with"),
    (["objective.erpd.ensemble_with=[ce]", "objective.erpd.ensemble_strategies=[1]"], "one strategy per member"),
    (["objective.erpd.stage1.loss=ce", "objective.erpd.ensemble_with=[mse]", "objective.erpd.ensemble_strategies=[2,1]",
      "objective.erpd.unlearned_step=2"], "strategy 2 for ce"),
    (["objective.erpd.ensemble_with=[ce]", "objective.erpd.ensemble_strategies=[3,1]"], "use 1 or 2"),
    (["objective.erpd.stage1.loss=mse", "objective.erpd.ensemble_with=[ce]", "objective.erpd.ensemble_strategies=[2,1]"],
     "strategy 2 needs objective.erpd.unlearned_step"),
    (["objective.erpd.ensemble_with=[ce]", "objective.erpd.ensemble_strategies=[1,1]", "objective.erpd.unlearned_step=2"],
     "unlearned_step is used by strategy 2 only"),
    (["objective.erpd.stage1.loss=mse", "objective.erpd.ensemble_with=[ce]", "objective.erpd.ensemble_strategies=[2,1]",
      "objective.erpd.unlearned_step=2", "objective.erpd.stage2.strategy=2"], "replaced by ensemble_strategies"),
], ids=["no-ensemble", "count", "strategy2-not-mse", "strategy3", "no-unlearned-step", "unused-unlearned-step",
        "stage2-strategy-too"])
def test_ensemble_strategies_are_checked_naming_the_field(overrides, message):
    from megatron_opd.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(RECIPE, overrides, require_teachers=False)
    ok = load_config(RECIPE, ["objective.erpd.stage1.loss=mse", "objective.erpd.ensemble_with=[ce]",
                              "objective.erpd.ensemble_strategies=[2,1]", "objective.erpd.unlearned_step=2"],
                     require_teachers=False)
    assert ok.objective.settings.member_strategies == [2, 1]
