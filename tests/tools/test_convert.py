"""Conversion tools: HF -> Megatron -> HF round trips at several layouts, logits equal transformers;
memory estimator against hand-computed numbers; bad input refused before anything is written."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_opd.models.hf_mapping import HFCheckpoint
from megatron_opd.models.hf_tiny import save_tiny_checkpoint
from mopd_testing import REPO_ROOT, tiny_spec
from tools.estimate_memory import estimate_memory, local_params


def torchrun(nproc, module, *args, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO_ROOT))
    if ok and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return save_tiny_checkpoint(tiny_spec("tiny_qwen3"), tmp_path_factory.mktemp("d"), init_std=0.1)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return save_tiny_checkpoint(tiny_spec("tiny_qwen3_moe"), tmp_path_factory.mktemp("m"), init_std=0.1)


@pytest.mark.parametrize("kind,to_layout,back_layout", [
    ("dense", ["--tp", "2"], ["--pp", "2"]),
    ("moe", ["--ep", "2"], ["--tp", "2"]),
], ids=["dense-tp2-to-pp2", "moe-ep2-to-tp2"])
def test_roundtrip_is_exact_and_verified(dense, moe, tmp_path, kind, to_layout, back_layout):
    src = dense if kind == "dense" else moe
    meg, back = tmp_path / "meg", tmp_path / "hf"
    out = torchrun(2, "tools.convert_hf_to_megatron", "--hf", str(src), "--out", str(meg), "--verify", *to_layout)
    assert "verify: max |logits - transformers|" in out.stdout
    out = torchrun(2, "tools.convert_megatron_to_hf", "--megatron", str(meg), "--out", str(back), "--verify",
                   *back_layout)
    assert "verify" in out.stdout
    a, b = HFCheckpoint(src), HFCheckpoint(back)
    assert set(a.keys()) == set(b.keys())
    for name in a.keys():
        assert torch.equal(a.get(name), b.get(name)), name


def test_unknown_architecture_refused_before_writing(tmp_path):
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (bad / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    proc = torchrun(1, "tools.convert_hf_to_megatron", "--hf", str(bad), "--out", str(out), ok=False)
    assert proc.returncode != 0 and "not supported" in proc.stderr + proc.stdout
    assert not out.exists()


def test_layout_not_fitting_refused_before_writing(dense, tmp_path):
    out = tmp_path / "out"
    proc = torchrun(1, "tools.convert_hf_to_megatron", "--hf", str(dense), "--out", str(out), "--pp", "3", ok=False)
    assert "pipeline_model_parallel_size=3" in proc.stderr + proc.stdout and not out.exists()


def test_inspect_checkpoint(dense):
    from tools.inspect_checkpoint import inspect

    info = inspect(dense)
    assert info["format"] == "hf-safetensors" and info["num_tensors"] == len(HFCheckpoint(dense).keys())
    assert info["spec"]["architecture"] == "qwen3"


def test_estimate_memory_hand_computed():
    from megatron_opd.models.hf_tiny import build_hf_model

    spec = tiny_spec("tiny_qwen3")  # dense, fp32 here
    # the parameter count from transformers' own model of this config, not from the estimator's ModelSpec
    P = sum(p.numel() for p in build_hf_model(spec).parameters())
    assert spec.num_parameters() == P
    est = estimate_memory(spec, [spec], tp=2, pp=2, ep=1, dtype="float32", micro_batch=2, seq_len=16,
                          engine_gib=3.0)
    gib = 2**30
    assert est["student_weights"] == pytest.approx(P / 4 * 4 / gib)
    assert est["gradients"] == pytest.approx(P / 4 * 4 / gib)
    assert est["optimizer"] == pytest.approx(P / 4 * 8 / gib)  # fp32 model: Adam m, v only
    sharded = estimate_memory(spec, [spec], tp=2, pp=2, ep=1, dtype="bfloat16", dp=4, distributed_optimizer=True)
    assert sharded["optimizer"] == pytest.approx(P / 4 * 12 / 4 / gib)  # fp32 main + m + v, over 4 DP ranks
    assert sharded["gradients"] == pytest.approx(P / 4 * 4 / gib)  # the gradient buffer stays whole
    assert est["frozen_models"] == pytest.approx(P / 4 * 4 / gib)
    assert est["activations"] == pytest.approx(2 * 16 * 64 * (4 / 2) * 34 * 4 / 2 / gib)
    # forward chunk + its gradient: all 2 x 16 tokens fit one chunk of the 512 / 2 = 256-column slice
    assert est["logprob_chunk"] == pytest.approx(2 * (2 * 16) * 256 * 4 / gib)
    assert est["attention_scores"] == 0.0  # flash attention keeps no scores
    assert est["logits"] == pytest.approx(2 * 16 * 256 * (4 + 4) / gib)  # fp32 logits [b, s, V/tp] + grad
    state = P / 4 * (4 + 4 + 8) / gib
    assert est["train_phase"] == pytest.approx(state + est["frozen_models"] + est["activations"]
                                               + est["logits"] + est["logprob_chunk"])
    assert est["rollout_phase"] == pytest.approx(state + est["frozen_models"] + 3.0)  # engine awake
    assert est["total"] == max(est["train_phase"], est["rollout_phase"])
    # unfused attention: scores + softmax [b, heads/tp, s, s] fp32 for every layer of the stage (4 / 2),
    # or for one layer with selective recompute; an offloaded teacher is absent while the engine is awake
    heads = spec.num_attention_heads
    unfused = estimate_memory(spec, [spec], tp=2, pp=2, ep=1, dtype="float32", micro_batch=2, seq_len=16,
                              attention="unfused", frozen_offloaded=[True], engine_gib=3.0)
    assert unfused["attention_scores"] == pytest.approx(2 * 2 * (heads / 2) * 16**2 * 4 * 2 / gib)
    assert unfused["rollout_phase"] == pytest.approx(state + 3.0)
    selective = estimate_memory(spec, [spec], tp=2, pp=2, ep=1, dtype="float32", micro_batch=2, seq_len=16,
                                attention="unfused", recompute="selective")
    assert selective["attention_scores"] == pytest.approx(unfused["attention_scores"] / 2)
    moe = tiny_spec("tiny_qwen3_moe")
    experts = moe.num_layers * moe.num_experts * 3 * moe.hidden_size * moe.moe_ffn_hidden_size
    assert local_params(moe, 1, 1, 2) == pytest.approx(moe.num_parameters() - experts / 2)


def test_recipe_memory_comments_match_the_estimator():
    """A sync check, not evidence: each cluster recipe's stated per-GPU memory is what the estimator says
    today (a changed estimator must regenerate them). The estimator's evidence is the measured peak,
    within 25 %, in tests/tools/test_estimate_memory.py, and the hand-computed terms above."""
    import re

    from tools.estimate_memory import estimate_recipe

    checked = 0
    for recipe in sorted((REPO_ROOT / "configs" / "recipes").glob("*.yaml")):
        m = re.search(r"^# Estimated per-GPU memory: ([\d.]+) GiB", recipe.read_text(), re.M)
        if "30b" in recipe.name or "4b" in recipe.name:
            assert m, f"{recipe.name}: cluster recipes state the estimator's per-GPU memory"
        if m:
            est = estimate_recipe(str(recipe))
            assert float(m.group(1)) == round(est["total"], 1), recipe.name
            assert float(m.group(1)) <= 80, f"{recipe.name} does not fit an 80 GiB H100"
            engine = re.search(r"^# GPU ([\d.]+) GiB \(vLLM's budget", recipe.read_text(), re.M)
            assert (engine is None) == ("engine_gpu" not in est), f"{recipe.name}: state the engine GPU's memory"
            if engine:  # dedicated engine ranks: the second kind of GPU
                assert float(engine.group(1)) == round(est["engine_gpu"], 1) <= 80, recipe.name
            checked += 1
    assert checked == 8
