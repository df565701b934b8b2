"""The embedded demo end to end at toy budgets (SFT -> teacher eval -> OPD and ExOPD runs with vLLM ->
results JSON + plot), its model cache, and its config validation."""

import json
import subprocess
import sys

import pytest

from megatron_opd.demo import DemoConfig, gap_closed
from mopd_testing import REPO_ROOT

TOY = ["teacher_sft_steps=3", "student_sft_steps=3", "opd_steps=2", "sft_batch_size=8",
       "opd_overrides=train.prompts_per_step=4,data.synthetic_eval_size=4,train.eval_samples=1,"
       "rollout.max_new_tokens=8,train.micro_batch_size=4"]


def _demo(out_dir, *overrides):
    proc = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "demo", "--out-dir", str(out_dir),
                           *TOY, *overrides], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_demo_runs_end_to_end_and_reuses_its_model_cache(tmp_path):
    out, bars = _demo(tmp_path)
    results = json.loads((tmp_path / "demo_results.json").read_text())
    for key in ("teacher_acc", "student_acc_before", "student_acc_after_opd", "student_acc_after_exopd",
                "student_acc_after_grpo"):
        assert 0.0 <= results[key] <= 1.0
    assert results["gap_closed_opd"] == gap_closed(results["teacher_acc"], results["student_acc_before"],
                                                   results["student_acc_after_opd"])
    # the closing table on the console, no command lines (they open each stage's log)
    table = out[out.index("[demo] held-out accuracy (avg@k)"):].splitlines()
    assert table[1].split() == ["teacher", f"{results['teacher_acc']:.3f}"]
    assert table[3].split()[-1] == f"{results['student_acc_after_opd']:.3f}"
    assert table[-1].startswith(f"[demo] outputs: {tmp_path / 'demo_results.json'}")
    assert "$ " not in out and "megatron_opd.cli train" not in out
    assert (tmp_path / "opd.log").read_text().startswith(f"$ {sys.executable} -m megatron_opd.cli train")
    # one progress bar per stage: the SFT builds, the teacher's evaluation, each run (step / total)
    for bar in ("[demo] sft demo-teacher", "[demo] sft demo-student", "[demo] teacher held-out eval",
                "[demo] opd: 100%", "[demo] exopd: 100%", "[demo] grpo: 100%"):
        assert bar in bars, bar
    assert " 2/2 " in bars[bars.rindex("[demo] opd"):]
    assert (tmp_path / "demo.png").stat().st_size > 0
    for run in ("opd", "exopd", "grpo"):
        assert (tmp_path / run / "metrics.jsonl").is_file()
    assert "name: grpo" in (tmp_path / "grpo" / "config.yaml").read_text()  # the RL baseline, no teacher

    weights = tmp_path / "cache" / "student_base" / "model.safetensors"
    built = weights.stat().st_mtime_ns
    # Same recipe: both models come from the cache. A changed student recipe rebuilds only the student.
    again, bars = _demo(tmp_path, "student_error_rate=0.3", "--verbose")
    assert "sft demo-teacher" not in bars and "sft demo-student" in bars
    assert f"[demo] $ {sys.executable} -m megatron_opd.cli train" in again  # --verbose: the command lines
    assert weights.stat().st_mtime_ns != built
    stamp = json.loads((tmp_path / "cache" / "student_base" / "demo_build.json").read_text())
    assert stamp["error_rate"] == 0.3


def test_gap_closed_by_hand():
    assert gap_closed(0.9, 0.2, 0.76) == 0.8  # (0.76 - 0.2) / (0.9 - 0.2)
    assert gap_closed(0.9, 0.2, 0.1) == pytest.approx(-0.1429)  # a run that got worse closes a negative share
    assert gap_closed(0.5, 0.5, 0.7) is None and gap_closed(0.4, 0.5, 0.7) is None  # no gap to close


def test_demo_config_errors_name_the_field():
    with pytest.raises(ValueError, match="demo.student_error_rate=1.5"):
        DemoConfig(student_error_rate=1.5)
    with pytest.raises(ValueError, match="demo.opd_steps"):
        DemoConfig(opd_steps=0)
    with pytest.raises(ValueError, match="key=value with key in"):
        DemoConfig.from_overrides(["student_width=3"])
    assert DemoConfig.from_overrides(["opd_steps=7", "opd_overrides=a=1,b=2"]).opd_overrides == ("a=1", "b=2")
