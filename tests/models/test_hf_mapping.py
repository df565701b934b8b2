"""HF <-> Megatron mapping: logits parity with transformers and exact export, at several layouts."""

import json
from pathlib import Path

import pytest

from mopd_testing import run_ranks

WORKER = Path(__file__).parent / "workers" / "hf_parity.py"


@pytest.mark.parametrize(
    "nproc,layout",
    [(1, []), (2, ["--tp", "2"]), (2, ["--pp", "2"])],
    ids=["tp1", "tp2", "pp2"],
)
def test_dense_logits_equal_transformers(tiny_dense_ckpt, nproc, layout):
    out = run_ranks(WORKER, nproc, "--ckpt", str(tiny_dense_ckpt), "--mode", "logits", "--atol", "1e-4", *layout)
    assert "max_abs_err" in out


def test_tied_embeddings_pp2_logits_and_export(tiny_tied_ckpt):
    run_ranks(WORKER, 2, "--ckpt", str(tiny_tied_ckpt), "--pp", "2", "--mode", "logits")
    out = run_ranks(WORKER, 2, "--ckpt", str(tiny_tied_ckpt), "--pp", "2", "--mode", "export")
    assert '"exported"' in out


@pytest.mark.parametrize("nproc,layout", [(2, ["--ep", "2"]), (2, ["--tp", "2"])], ids=["ep2", "tp2"])
def test_moe_logits_equal_transformers(tiny_moe_ckpt, nproc, layout):
    out = run_ranks(WORKER, nproc, "--ckpt", str(tiny_moe_ckpt), "--mode", "logits", *layout)
    assert "max_abs_err" in out


@pytest.mark.parametrize(
    "ckpt,nproc,layout",
    [("dense", 2, ["--tp", "2"]), ("dense", 2, ["--pp", "2"]), ("moe", 2, ["--ep", "2"])],
    ids=["dense-tp2", "dense-pp2", "moe-ep2"],
)
def test_export_reproduces_every_hf_tensor(tiny_dense_ckpt, tiny_moe_ckpt, ckpt, nproc, layout):
    """Bit-exact HF tensors, moved in a bounded number of collectives per bucket (flat buffers: one TP
    all-gather, one EP broadcast per owner, one send per stage and receiver), not one per parameter."""
    path = tiny_dense_ckpt if ckpt == "dense" else tiny_moe_ckpt
    out = run_ranks(WORKER, nproc, "--ckpt", str(path), "--mode", "export", *layout)
    assert '"exported"' in out
    counts = json.loads(next(line for line in out.splitlines() if "collectives_per_rank" in line))
    per_bucket = {"dense-tp2": 1, "dense-pp2": 2, "moe-ep2": 2}[ckpt + "-" + layout[0][2:] + layout[1]]
    assert counts["buckets"] < counts["parameters"]
    assert max(counts["collectives_per_rank"]) <= per_bucket * counts["buckets"], counts


@pytest.mark.slow
def test_moe_tp2_ep2_export_four_ranks(tiny_moe_ckpt):
    run_ranks(WORKER, 4, "--ckpt", str(tiny_moe_ckpt), "--tp", "2", "--ep", "2", "--mode", "export")


def test_transformer_engine_names_map_to_the_local_spec():
    """TE's layer spec fuses the norms into the next linear (`layer_norm_weight`) and its grouped-GEMM
    experts name expert j's weight `weight{j}` (megatron/core/extensions/transformer_engine.py); each
    maps to the local-spec name the HF rules are written for. (A TE model itself needs CUDA + TE.)"""
    from megatron_opd.models.hf_mapping import canonical_name

    te_to_local = {
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.3.input_layernorm.weight",
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight": "decoder.layers.3.pre_mlp_layernorm.weight",
        "decoder.layers.0.mlp.experts.linear_fc1.weight7": "decoder.layers.0.mlp.experts.local_experts.7.linear_fc1.weight",
        "decoder.layers.0.mlp.experts.linear_fc2.weight12": "decoder.layers.0.mlp.experts.local_experts.12.linear_fc2.weight",
    }
    for te, local in te_to_local.items():
        assert canonical_name(te) == local
    for unchanged in ["decoder.layers.3.self_attention.linear_qkv.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                      "decoder.layers.0.mlp.experts.local_experts.7.linear_fc1.weight",
                      "decoder.layers.0.mlp.router.weight", "output_layer.weight"]:
        assert canonical_name(unchanged) == unchanged


def test_a_damaged_hf_checkpoint_is_named_with_its_role(tiny_dense_ckpt, tmp_path):
    """NaN weights surfaced only after vLLM started ("rollout_logprobs contains NaN"); a truncated file as
    a 19-line SafetensorError naming neither file nor role; a Megatron checkpoint with no converter hint."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_opd.models.hf_mapping import HFCheckpoint

    bad = tmp_path / "nan"
    shutil.copytree(tiny_dense_ckpt, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    ckpt = HFCheckpoint(bad, role="teachers[1].checkpoint")
    ckpt.get("model.layers.0.mlp.up_proj.weight")  # the others load
    with pytest.raises(ValueError, match=rf"teachers\[1\].checkpoint: tensor {name} in .*nan/model.safetensors "
                                         r"has 1 NaN or inf value\(s\): the checkpoint is damaged"):
        ckpt.get(name)

    cut = tmp_path / "cut"
    shutil.copytree(tiny_dense_ckpt, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"student.checkpoint: .*cut/model.safetensors is not a readable safetensors "
                                         r"file \(.*\): the file is damaged or truncated"):
        HFCheckpoint(cut, role="student.checkpoint")

    run = tmp_path / "run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"student.checkpoint: no \*.safetensors files in .*run: it is a "
                                                r"Megatron checkpoint or run; convert it with `python -m "
                                                r"tools.convert_megatron_to_hf --megatron .*run --out <dir>`"):
        HFCheckpoint(run, role="student.checkpoint")
    with pytest.raises(FileNotFoundError, match=r"teachers\[0\].checkpoint: HF checkpoint directory /nonexistent"):
        HFCheckpoint("/nonexistent", role="teachers[0].checkpoint")
