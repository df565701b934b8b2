"""The command line a new user meets first: init-tiny, then the tiny recipe with no overrides."""

import json
import os
import subprocess
import sys

import pytest

from mopd_testing import REPO_ROOT

pytestmark = pytest.mark.vllm


def test_init_tiny_then_the_tiny_recipe_runs_as_written(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MOPD_TINY_DIR=str(tmp_path / "tiny"))

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "megatron_opd.cli", *args], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    text = cli("init-tiny", str(tmp_path / "tiny"))
    assert f"MOPD_TINY_DIR={tmp_path / 'tiny'} megatron-opd train --config configs/recipes/tiny_opd.yaml" in text
    for role in ("student", "teacher"):
        assert (tmp_path / "tiny" / role / "config.json").is_file()
        assert list((tmp_path / "tiny" / role).glob("tokenizer*"))
    text = cli("train", "--config", "configs/recipes/tiny_opd.yaml", "train.steps=1",
               f"train.out_dir={tmp_path / 'run'}")
    assert "done: step 1 of 1" in text and f"outputs: {tmp_path / 'run'}/metrics.jsonl" in text
    # harmless library noise is filtered once at start-up (megatron_opd/quiet.py): was 60+ lines
    other = [l for l in text.splitlines() if l.strip() and not l.startswith(("opd:", "done:", "outputs:"))]
    assert len(other) < 15, "\n".join(other)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["loss"] != 0


def test_a_config_error_is_one_message_without_traceback():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "megatron_opd.cli", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)

    out = cli("train", "--config", "configs/recipes/tiny_opd.yaml", "train.steps=0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[0] == "megatron-opd: error: train.steps must be >= 1, got 0"
    debug = cli("--debug", "train", "--config", "configs/recipes/tiny_opd.yaml", "train.steps=0")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
