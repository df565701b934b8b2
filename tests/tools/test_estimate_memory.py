"""tools.estimate_memory against the peak memory measured on two train phases of different shape."""

import json
import os
import subprocess
import sys

import pytest

from mopd_testing import REPO_ROOT

WORKER = REPO_ROOT / "tests" / "tools" / "workers" / "peak_memory.py"


@pytest.mark.parametrize("shape", [
    ["--hidden", "512", "--layers", "4", "--vocab", "16384", "--seq", "256", "--batch", "2"],  # weights
    ["--hidden", "256", "--layers", "2", "--vocab", "4096", "--seq", "1024", "--batch", "2"],  # attention
    # bf16 mixed precision: bf16 weights and activations, fp32 gradients, fp32 main parameters + Adam
    ["--hidden", "512", "--layers", "4", "--vocab", "16384", "--seq", "256", "--batch", "2", "--dtype", "bfloat16"],
], ids=["weight_bound", "attention_bound", "weight_bound_bf16"])
def test_train_phase_estimate_within_25_percent_of_measured_peak(shape):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, str(WORKER), *shape], capture_output=True, text=True, env=env,
                         timeout=600, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    r = json.loads([l for l in out.stdout.splitlines() if l.startswith('{"measured_gib"')][-1])
    ratio = r["predicted_gib"] / r["measured_gib"]
    print(f"predicted {r['predicted_gib']:.3f} GiB / measured {r['measured_gib']:.3f} GiB = {ratio:.2f}")
    assert 0.75 <= ratio <= 1.25, r
