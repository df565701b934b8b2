"""The rollout side (rollout/colocated.py) inside the real loop: the default placement, one TP=1 engine
on every rank, against one engine per replica on its leader (`rollout.engines_per_replica=1`, the
placement before every GPU generated). Seeds are a function of each prompt's global index and the step,
so both placements must sample the same tokens, evaluate the same and train to the same weights."""

import json
from pathlib import Path

import pytest
import torch

from mopd_testing import REPO_ROOT, run_ranks

WORKER = REPO_ROOT / "tests" / "workers" / "train_run.py"
RECIPE = str(REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml")
pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mopd_testing import tiny_checkpoints

    student, teacher = tiny_checkpoints(tmp_path_factory, seeds=[0, 1])
    return student, teacher


def run(models, out: Path, nproc: int, *overrides):
    student, teacher = models
    run_ranks(WORKER, nproc, "--config", RECIPE, "--dump-weights", str(out / "weights.pt"),
              "--dump-samples", str(out / "samples.json"), f"student.checkpoint={student}",
              f"teachers=[{{checkpoint: {teacher}}}]", f"train.out_dir={out}", "data.synthetic_eval_size=8",
              "train.eval_samples=2", "rollout.engines_per_replica=null", *overrides, timeout=900)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return (json.loads((out / "samples.json").read_text()), torch.load(out / "weights.pt"),
            {r["step"]: r for r in rows})


def assert_same_run(a, b, logprob_atol=1e-5, loss_rtol=1e-5, weight_atol=2e-6):
    (sa, wa, ma), (sb, wb, mb) = a, b
    assert len(sa["samples"]) == len(sb["samples"]) == 2
    for step_a, step_b in zip(sa["samples"], sb["samples"]):
        assert [(p, r) for p, r, _ in step_a] == [(p, r) for p, r, _ in step_b]  # the same tokens
        worst = max(abs(x - y) for (_, _, la), (_, _, lb) in zip(step_a, step_b) for x, y in zip(la, lb))
        assert worst <= logprob_atol, worst  # vLLM's log-probs: one engine batches more prompts than two
    assert sa["evals"] == sb["evals"] and len(sa["evals"]) == 2
    assert [ma[s]["loss"] for s in (1, 2)] == pytest.approx([mb[s]["loss"] for s in (1, 2)], rel=loss_rtol)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= weight_atol, worst  # the tolerance of tests/test_trainer_dp.py (Adam on reduction noise)


def test_tp2_engine_per_rank_equals_one_engine_per_replica(models, tmp_path):
    """TP=2 on 2 ranks: two engines (one per rank, each half of the replica's prompts and of the
    held-out set) against one engine on rank 0 serving everything."""
    tp2 = "parallel.tensor_model_parallel_size=2"
    every = run(models, tmp_path / "every", 2, tp2)
    leader = run(models, tmp_path / "leader", 2, tp2, "rollout.engines_per_replica=1")
    assert_same_run(every, leader)
    assert every[2][2]["rollout/response_length"] > 1  # a real rollout, not an empty one


@pytest.mark.slow
def test_tp2_engine_of_tp2_equals_one_tp1_engine_per_replica(models, tmp_path):
    """rollout.tensor_parallel_size=2 at training TP=2: one engine whose two vLLM workers run on the
    replica's two ranks' cores, refit every step through the transport slots."""
    tp2 = "parallel.tensor_model_parallel_size=2"
    # vLLM's TP=2 reductions give log-probs ~2e-5 from TP=1 (fp32; the refit tests' bound is 1e-4).
    # They reach the loss only through the TIS weight, and Adam turns a 1e-5 relative change of a
    # near-zero gradient into up to half a learning rate (measured: 5e-5 after 2 steps): with TIS off
    # the loss depends on the samples alone, which must then train to the same weights.
    no_tis = "objective.gopd.tis_cap=null"
    engine_tp2 = run(models, tmp_path / "etp2", 2, tp2, no_tis, "rollout.tensor_parallel_size=2")
    leader = run(models, tmp_path / "leader", 2, tp2, no_tis, "rollout.engines_per_replica=1")
    assert_same_run(engine_tp2, leader, logprob_atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_4_ranks_tp2_dp2_with_4_engines_equals_one_per_replica_and_resumes_after_kill9(models, tmp_path):
    """TP=2 x DP=2 on 4 ranks: 4 engines (one per rank) against 2 (one per replica) on the same seeds;
    then the 4-engine run killed with SIGKILL after its step-1 checkpoint (every rank and engine) and
    resumed: its step-2 loss and final weights bit-identical to the uninterrupted run."""
    from mopd_testing import kill_ranks_when

    tp2 = "parallel.tensor_model_parallel_size=2"
    every = run(models, tmp_path / "every", 4, tp2)
    leaders = run(models, tmp_path / "leaders", 4, tp2, "rollout.engines_per_replica=1")
    assert_same_run(every, leaders)

    student, teacher = models
    out = tmp_path / "killed"
    args = ["--config", RECIPE, "--dump-weights", str(out / "weights.pt"), f"student.checkpoint={student}",
            f"teachers=[{{checkpoint: {teacher}}}]", f"train.out_dir={out}", "data.synthetic_eval_size=8",
            "train.eval_samples=2", "rollout.engines_per_replica=null", tp2]
    kill_ranks_when(WORKER, 4, *args, marker=out / "checkpoints" / "step_1" / "meta.json")
    assert not (out / "weights.pt").exists()
    run_ranks(WORKER, 4, *args, timeout=1500)
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert rows[2]["loss"] == every[2][2]["loss"]  # the resumed step, bit-identical
    resumed = torch.load(out / "weights.pt")
    assert max((resumed[k] - every[1][k]).abs().max().item() for k in resumed) == 0.0
