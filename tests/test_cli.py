"""The command line a new user meets first, run as README's quick start shows it: init-tiny, train the
tiny recipe, resume it, export it to HF, evaluate it; and user errors as one message."""

import json
import os
import re
import subprocess
import sys

import pytest

from mopd_testing import REPO_ROOT

pytestmark = pytest.mark.vllm


def quick_start_commands() -> list[str]:
    """The commands of README's quick-start block (the one that runs `init-tiny`), comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)
    block = next(b for b in blocks if "init-tiny" in b)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_quick_start_runs_as_written(tmp_path):
    """From a fresh clone: each command of the quick start works as written (in a scratch working
    directory that sees the checkout's configs/, so nothing is written into the checkout)."""
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("MOPD_TINY_DIR", None)
    commands = quick_start_commands()
    init, train, extend, export, evaluate = commands
    assert "init-tiny" in init and "train" in train and "train.steps=4" in extend
    assert "tools.convert_megatron_to_hf" in export and " eval " in evaluate

    def run(command, expect=0):
        argv = command.split()
        argv = ([sys.executable, "-m", "megatron_opd.cli", *argv[1:]] if argv[0] == ".venv/bin/megatron-opd"
                else [sys.executable, *argv[1:]])
        out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == expect, f"{command}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    run(init)
    for role in ("student", "teacher"):
        assert (tmp_path / "runs" / "tiny_models" / role / "config.json").is_file()
    out = run(train)
    text = out.stdout + out.stderr
    assert "done: step 2 of 2" in text and "outputs: runs/tiny_opd/metrics.jsonl" in text
    # harmless library noise is filtered once at start-up (megatron_opd/quiet.py): was 60+ lines
    other = [l for l in text.splitlines() if l.strip() and not l.startswith(("opd:", "done:", "outputs:"))]
    assert len(other) < 15, "\n".join(other)
    run_dir = tmp_path / "runs" / "tiny_opd"
    assert [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]

    # a changed config is refused on resume (one message, before any compute)
    refused = run(train + " optim.lr=0.5", expect=2)
    assert refused.stderr.startswith("megatron-opd: error: train.resume: ") and "optim.lr" in refused.stderr

    out = run(extend)
    assert "resuming from runs/tiny_opd/checkpoints/step_2 (step 2 of 4)" in out.stdout
    assert "done: step 4 of 4" in out.stdout
    out = run(export)  # no --spec / --tokenizer: the checkpoint carries both
    assert "from runs/tiny_opd/checkpoints/step_4" in out.stdout
    hf = tmp_path / export.split("--out")[1].split()[0]
    assert (hf / "model.safetensors").is_file() and (hf / "tokenizer.json").is_file()
    out = run(evaluate)
    result = json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1])
    assert 0.0 <= result["eval/accuracy"] <= 1.0 and result["eval/response_length"] > 0


def test_a_config_error_is_one_message_without_traceback():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "megatron_opd.cli", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)

    out = cli("train", "--config", "configs/recipes/tiny_opd.yaml", "train.steps=0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[0] == "megatron-opd: error: train.steps must be >= 1, got 0"
    debug = cli("--debug", "train", "--config", "configs/recipes/tiny_opd.yaml", "train.steps=0")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
