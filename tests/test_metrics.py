"""MetricsLogger's sinks: W&B only when asked for, validated, and resumed into the same W&B run."""

import time

import pytest

from megatron_opd.config import WandbConfig, load_config
from megatron_opd.metrics import MetricsLogger
from mopd_testing import REPO_ROOT, wandb_rows

RECIPE = REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml"


def test_wandb_is_absent_unless_asked_for_and_validated(tmp_path):
    assert load_config(RECIPE).metrics.wandb is None
    logger = MetricsLogger(tmp_path / "plain")
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["metrics.jsonl", "tensorboard"]
    with pytest.raises(ValueError, match=r"metrics.wandb.project is required"):
        load_config(RECIPE, ["metrics.wandb={mode: offline}"])
    with pytest.raises(ValueError, match=r"metrics.wandb.mode='disabled': use online or offline"):
        load_config(RECIPE, ["metrics.wandb={project: p, mode: disabled}"])


def test_offline_wandb_run_holds_the_step_metrics_and_a_resume_continues_it(tmp_path):
    cfg = WandbConfig(project="mopd-test", mode="offline")
    first = MetricsLogger(tmp_path, wandb=cfg, resume_step=-1, run_config={"train": {"steps": 3}})
    first.log(1, {"loss": 0.5, "kl": float("nan")})  # non-finite values are left out, as in TensorBoard
    first.log(2, {"loss": 0.25})
    first.close()
    time.sleep(1.1)  # W&B names an offline run's directory by the second it starts and the run id
    resumed = MetricsLogger(tmp_path, wandb=cfg, resume_step=2)
    resumed.log(3, {"loss": 0.125})
    resumed.close()
    run_id = (tmp_path / "wandb_run_id").read_text()
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2
    rows = [{k: v for k, v in row.items() if not k.startswith("_") or k == "_step"}
            for row in wandb_rows(tmp_path, 3)]
    assert rows == [{"_step": 1, "loss": 0.5}, {"_step": 2, "loss": 0.25}, {"_step": 3, "loss": 0.125}]
    fresh = MetricsLogger(tmp_path / "other", wandb=cfg, resume_step=-1)
    fresh.close()
    assert (tmp_path / "other" / "wandb_run_id").read_text() != run_id
