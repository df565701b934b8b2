"""One step's scoring and update computed different ways on the same batch must agree
(tests/workers/step_parity.py): the fused response-only LM head against materialised logits, token-budget
micro-batches against fixed rows (two budgets), and routed two-teacher scoring against every teacher
scoring every sample; at TP = 1, TP = 2 and PP = 2 (micro-batches of varying shape between stages)."""

from pathlib import Path

import pytest

from megatron_opd.data.tokenizer import train_tokenizer
from megatron_opd.models.hf_tiny import save_tiny_checkpoint
from mopd_testing import REPO_ROOT, last_json, run_ranks, tiny_spec

WORKER = Path(__file__).parent / "workers" / "step_parity.py"
RECIPE = str(REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tok = tmp_path_factory.mktemp("tok")
    train_tokenizer(tok)

    def save(seed):
        return save_tiny_checkpoint(tiny_spec("tiny_qwen3"), tmp_path_factory.mktemp(f"m{seed}"), seed=seed,
                                    tokenizer_dir=tok, init_std=0.1)

    return [save(0), save(1), save(2)]


# Relative to the largest gradient entry / log-prob: the paths differ only in summation order (fp32).
TOL = 2e-5


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_one_step_is_the_same_whichever_way_it_is_computed(ckpts, tmp_path, tp, pp):
    student, math_teacher, code_teacher = ckpts
    out = run_ranks(WORKER, tp * pp, "--config", RECIPE, f"student.checkpoint={student}",
                    f"teachers=[{{checkpoint: {math_teacher}, domain: math}}, "
                    f"{{checkpoint: {code_teacher}, domain: code}}]",
                    "data.synthetic=mixed", "train.prompts_per_step=8", "train.micro_batch_size=8",
                    "objective.gopd.entropy_coef=0.01", f"train.out_dir={tmp_path}",
                    f"parallel.tensor_model_parallel_size={tp}",
                    f"parallel.pipeline_model_parallel_size={pp}", timeout=600)
    r = last_json(out, "step_parity")["step_parity"]
    index = r["teacher_index"]
    assert 0 < sum(index) < len(index), "the batch must mix both teachers' domains"
    assert r["grad_max"] > 0
    # fused LM head == materialised logits (teacher log-probs, loss, every gradient)
    assert r["fused_vs_logits_teacher"] < TOL and r["fused_vs_logits_grad"] < TOL, r
    loss = r["loss"]
    assert loss["logits"] == pytest.approx(loss["fixed"], rel=1e-5)
    # the cut does not change the step: two budgets (more and fewer micro-batches than fixed rows)
    assert r["micro"]["small"] > r["micro"]["fixed"], r["micro"]
    assert r["budget_small_vs_fixed_grad"] < TOL and r["budget_large_vs_fixed_grad"] < TOL, r
    assert loss["small"] == pytest.approx(loss["fixed"], rel=1e-5)
    assert loss["large"] == pytest.approx(loss["fixed"], rel=1e-5)
    # routing: the same teacher log-probs and step with 1/K of the teacher sequences (K = 2)
    assert r["routed_vs_all_teacher"] < TOL and r["routed_vs_all_grad"] < TOL, r
    assert loss["unrouted"] == pytest.approx(loss["fixed"], rel=1e-5)
    assert r["sequences_unrouted"] == 2 * r["rows"]
    assert r["sequences_routed"] == r["rows"]


HOST_SYNCS = Path(__file__).parent / "workers" / "host_syncs.py"


@pytest.mark.parametrize("objective", ["sampled", "full"], ids=["sampled", "exact-kl"])
def test_host_synchronisations_per_step_do_not_grow_with_micro_batches(ckpts, tmp_path, objective):
    """One step's scoring and update read the device a fixed number of times: the same with 4 and with
    16 micro-batches (per-micro-batch `.item()`, `nonzero`, boolean indexing or finiteness reads would
    add one per micro-batch, each a pipeline stall on GPU)."""
    student, teacher, _ = ckpts
    out = run_ranks(HOST_SYNCS, 1, "--config", RECIPE, "--micro", "4,1", f"student.checkpoint={student}",
                    f"teachers=[{{checkpoint: {teacher}}}]", "train.prompts_per_step=8",
                    f"objective.gopd.estimator={objective}", "objective.gopd.tis_cap=2.0",
                    f"train.out_dir={tmp_path}", timeout=600)
    r = last_json(out, "host_syncs")["host_syncs"]
    few, many = r["4"], r["16"]
    # ours: one read of each phase's deferred input checks (score, update), the step's fused finiteness
    # check and its metrics; megatron's own forward/backward schedule reads nothing
    assert few["ours"] == many["ours"] <= 4, (few, many)
    assert few["megatron_other"] == many["megatron_other"] == 0, (few, many)
    # the optimizer step reads once per step, not per micro-batch
    assert few["optimizer_step"] == many["optimizer_step"], (few, many)
