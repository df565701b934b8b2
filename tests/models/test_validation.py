"""Bad model/layout/checkpoint input fails before any compute, naming the field."""

import json
import shutil

import pytest

from megatron_opd.models.hf_mapping import HFCheckpoint, check_checkpoint_matches
from megatron_opd.models.spec import ModelSpec
from megatron_opd.parallel import ParallelConfig

from mopd_testing import tiny_spec


def test_heads_not_divisible_by_tp():
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3.*num_attention_heads"):
        tiny_spec("tiny_qwen3").validate_parallel(tp=3, pp=1, ep=1)


def test_layers_not_divisible_by_pp():
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=3.*num_layers"):
        tiny_spec("tiny_qwen3").validate_parallel(tp=1, pp=3, ep=1)


def test_experts_not_divisible_by_ep():
    with pytest.raises(ValueError, match="expert_model_parallel_size=3.*num_experts"):
        tiny_spec("tiny_qwen3_moe").validate_parallel(tp=1, pp=1, ep=3)


def test_dense_model_ignores_ep_so_it_can_share_the_moe_teacher_layout():
    tiny_spec("tiny_qwen3").validate_parallel(tp=1, pp=1, ep=2)


def test_world_size_must_fit_layout():
    with pytest.raises(ValueError, match="world size 3"):
        ParallelConfig(tensor_model_parallel_size=2).data_parallel_size(3)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="architecture.*not supported"):
        ModelSpec.from_hf_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 8})
    with pytest.raises(ValueError, match="architecture='llama' is not supported"):
        ModelSpec(**{**tiny_spec("tiny_qwen3").__dict__, "architecture": "llama"})


def test_unknown_spec_field(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\narchitecture: qwen3\nhiden_size: 3\n")
    with pytest.raises(ValueError, match="hiden_size"):
        ModelSpec.from_yaml(p)


def test_checkpoint_vocab_disagrees_with_spec(tiny_dense_ckpt):
    spec = tiny_spec("tiny_qwen3", vocab_size=640)
    with pytest.raises(ValueError, match="vocab_size=512.*vocab_size=640"):
        check_checkpoint_matches(spec, HFCheckpoint(tiny_dense_ckpt))


def test_checkpoint_tensor_shape_disagrees(tiny_dense_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dense_ckpt, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight has shape"):
        check_checkpoint_matches(tiny_spec("tiny_qwen3"), HFCheckpoint(bad))


def test_checkpoint_missing_tensor(tiny_dense_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dense_ckpt, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_norm.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="missing tensors.*k_norm"):
        check_checkpoint_matches(tiny_spec("tiny_qwen3"), HFCheckpoint(bad))


def test_spec_roundtrips_through_hf_config():
    for name in ("tiny_qwen3", "tiny_qwen3_moe", "qwen3_4b", "qwen3_30b_a3b"):
        spec = tiny_spec(name)
        back = ModelSpec.from_hf_config(spec.to_hf_config(), name=spec.name)
        assert back == spec, name


def test_production_specs_fit_recipe_layouts():
    # The 30B teacher at TP=4/EP=8 and the 4B student at TP=4, the layouts our recipes use.
    tiny_spec("qwen3_30b_a3b").validate_parallel(tp=4, pp=1, ep=8)
    tiny_spec("qwen3_4b").validate_parallel(tp=4, pp=2, ep=1)


def test_gpu_without_transformer_engine_warns_once_with_the_attention_cost(monkeypatch, caplog):
    """The GPU answer of `platform.on_gpu` on this CPU machine: the local spec's unfused attention is
    named with its per-layer cost (Qwen3-4B, 20k tokens, TP 4: 2 x 8 heads x 20480^2 x 2 bytes)."""
    import logging

    from megatron_opd import platform
    from megatron_opd.models import builder
    from megatron_opd.models.spec import ModelSpec
    from megatron_opd.parallel import ParallelConfig
    from mopd_testing import REPO_ROOT

    spec = ModelSpec.from_yaml(REPO_ROOT / "configs" / "models" / "qwen3_4b.yaml")
    spec = ModelSpec(**{**spec.__dict__, "max_position_embeddings": 20480})
    monkeypatch.setattr(platform, "on_gpu", lambda: True)
    monkeypatch.setattr(builder, "_WARNED", set())
    precision = builder.PrecisionConfig(params_dtype="bfloat16")
    assert not precision.transformer_engine  # no TE installed here
    with caplog.at_level(logging.WARNING, logger="megatron_opd.models.builder"):
        builder.warn_unfused_attention(spec, ParallelConfig(tensor_model_parallel_size=4), precision)
        builder.warn_unfused_attention(spec, ParallelConfig(tensor_model_parallel_size=4), precision)
    assert len(caplog.records) == 1
    assert "12.5 GiB of scores per layer" in caplog.text and "precision.recompute=selective" in caplog.text
