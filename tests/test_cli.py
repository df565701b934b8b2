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
        return out.stdout

    text = cli("init-tiny", str(tmp_path / "tiny"))
    assert f"MOPD_TINY_DIR={tmp_path / 'tiny'} megatron-opd train --config configs/recipes/tiny_opd.yaml" in text
    for role in ("student", "teacher"):
        assert (tmp_path / "tiny" / role / "config.json").is_file()
        assert list((tmp_path / "tiny" / role).glob("tokenizer*"))
    cli("train", "--config", "configs/recipes/tiny_opd.yaml", "train.steps=1", f"train.out_dir={tmp_path / 'run'}")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["loss"] != 0
