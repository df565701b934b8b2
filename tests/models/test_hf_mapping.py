"""HF <-> Megatron mapping: logits parity with transformers and exact export, at several layouts."""

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
    path = tiny_dense_ckpt if ckpt == "dense" else tiny_moe_ckpt
    out = run_ranks(WORKER, nproc, "--ckpt", str(path), "--mode", "export", *layout)
    assert '"exported"' in out


@pytest.mark.slow
def test_moe_tp2_ep2_export_four_ranks(tiny_moe_ckpt):
    run_ranks(WORKER, 4, "--ckpt", str(tiny_moe_ckpt), "--tp", "2", "--ep", "2", "--mode", "export")
