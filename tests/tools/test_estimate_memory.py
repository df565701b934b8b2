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


def test_dedicated_placement_prices_the_trainer_and_the_engine_gpus_apart():
    """A trainer GPU holds no engine; an engine GPU holds the whole student (Qwen3-4B: its parameters x
    2 bytes in bf16) and, in the rest of vLLM's budget, the KV cache; a budget below the weights is refused."""
    from megatron_opd.models.spec import ModelSpec
    from tools.estimate_memory import estimate_recipe

    recipe = str(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml")
    dedicated = ["rollout.placement=dedicated", "rollout.engines_per_replica=null", "launch.nodes=5",
                 "rollout.dedicated_ranks=8", "rollout.dtype=bfloat16"]
    colocated = estimate_recipe(recipe)
    est = estimate_recipe(recipe, [*dedicated, "rollout.gpu_memory_utilization=0.9"], gpu_gib=80.0)
    assert est["engine_awake"] == 0.0 and colocated["engine_awake"] > 0
    assert est["train_phase"] == pytest.approx(colocated["train_phase"])  # the same 32 trainer GPUs
    from megatron_opd.config import load_config

    student = ModelSpec.from_yaml(load_config(recipe).student.spec)
    assert est["engine_gpu_weights"] == pytest.approx(student.num_parameters() * 2 / 2**30)
    assert est["engine_gpu"] == pytest.approx(72.0)
    assert est["engine_gpu_kv_cache"] == pytest.approx(72.0 - est["engine_gpu_weights"])
    with pytest.raises(ValueError, match="rollout.gpu_memory_utilization=0.05 gives vLLM 4.0 GiB"):
        estimate_recipe(recipe, [*dedicated, "rollout.gpu_memory_utilization=0.05"], gpu_gib=80.0)
