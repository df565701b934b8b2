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
              "train.eval_samples=2", *overrides, timeout=900)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return (json.loads((out / "samples.json").read_text()), torch.load(out / "weights.pt"),
            {r["step"]: r for r in rows})


def assert_same_run(a, b):
    (sa, wa, ma), (sb, wb, mb) = a, b
    assert len(sa["samples"]) == len(sb["samples"]) == 2
    for step_a, step_b in zip(sa["samples"], sb["samples"]):
        assert [(p, r) for p, r, _ in step_a] == [(p, r) for p, r, _ in step_b]  # the same tokens
        worst = max(abs(x - y) for (_, _, la), (_, _, lb) in zip(step_a, step_b) for x, y in zip(la, lb))
        assert worst <= 1e-5, worst  # vLLM's log-probs: one engine batches more prompts than two
    assert sa["evals"] == sb["evals"] and len(sa["evals"]) == 2
    assert [ma[s]["loss"] for s in (1, 2)] == pytest.approx([mb[s]["loss"] for s in (1, 2)], rel=1e-5)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= 2e-6, worst  # the tolerance of tests/test_trainer_dp.py (Adam on reduction noise)


def test_tp2_engine_per_rank_equals_one_engine_per_replica(models, tmp_path):
    """TP=2 on 2 ranks: two engines (one per rank, each half of the replica's prompts and of the
    held-out set) against one engine on rank 0 serving everything."""
    tp2 = "parallel.tensor_model_parallel_size=2"
    every = run(models, tmp_path / "every", 2, tp2)
    leader = run(models, tmp_path / "leader", 2, tp2, "rollout.engines_per_replica=1")
    assert_same_run(every, leader)
    assert every[2][2]["rollout/response_length"] > 1  # a real rollout, not an empty one
