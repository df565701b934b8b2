"""objective.gopd.estimator=full / topk inside the trainer (tests/workers/exact_kl_step.py): one step's loss
and every student gradient equal the same step with the KL computed from materialised full-vocabulary
logits, and the loss equals transformers' own dense KL of the HF checkpoints; at TP = 1, TP = 2 and PP = 2.
With two teachers routed by domain (of different widths), each sample's KL is to its own teacher: the
same against both references and against every teacher scoring every sample, with half the teacher
sequences."""

from pathlib import Path

import pytest

from mopd_testing import REPO_ROOT, last_json, run_ranks, tiny_checkpoints, tiny_spec

WORKER = Path(__file__).parent / "workers" / "exact_kl_step.py"
RECIPE = str(REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint

    student, teacher = tiny_checkpoints(tmp_path_factory, (0, 1))
    wide = save_tiny_checkpoint(tiny_spec("tiny_qwen3", hidden_size=96, ffn_hidden_size=192),
                                tmp_path_factory.mktemp("wide"), seed=2, tokenizer_dir=student, init_std=0.1)
    return student, teacher, wide


TWO_TEACHERS = "two-teachers"


@pytest.mark.parametrize("tp, pp, estimator", [
    (1, 1, ["objective.gopd.estimator=full"]),
    (2, 1, ["objective.gopd.estimator=full", TWO_TEACHERS]),
    (1, 2, ["objective.gopd.estimator=full"]),
    (2, 1, ["objective.gopd.estimator=topk", "objective.gopd.top_k=16", "objective.gopd.kl_direction=forward"]),
    # make test's time budget: routed top-k (the full KL's routing at TP = 2 runs in make test)
    pytest.param(1, 1, ["objective.gopd.estimator=topk", "objective.gopd.top_k=8", TWO_TEACHERS], marks=pytest.mark.slow),
], ids=["tp1-full", "tp2-full-two-teachers", "pp2-full", "tp2-topk16-forward", "tp1-topk8-two-teachers"])
def test_exact_kl_step_equals_dense_references(ckpts, tmp_path, tp, pp, estimator):
    student, teacher, wide = ckpts
    teachers = [f"teachers=[{{checkpoint: {teacher}}}]"]
    if TWO_TEACHERS in estimator:  # math prompts to one teacher, code prompts to the other (wider) one
        estimator = [e for e in estimator if e != TWO_TEACHERS]
        teachers = [f"teachers=[{{checkpoint: {teacher}, domain: math}}, {{checkpoint: {wide}, domain: code}}]",
                    "data.synthetic=mixed"]
    out = run_ranks(WORKER, tp * pp, "--config", RECIPE, f"student.checkpoint={student}", *teachers,
                    "train.prompts_per_step=8", "train.micro_batch_size=4", "objective.gopd.tis_cap=null",
                    *estimator, f"train.out_dir={tmp_path}", f"parallel.tensor_model_parallel_size={tp}",
                    f"parallel.pipeline_model_parallel_size={pp}", timeout=600)
    r = last_json(out, "exact_kl")["exact_kl"]
    assert r["loss"] > 0.01 and r["grad_max"] > 0  # two different random models: a real KL
    assert r["loss"] == pytest.approx(r["loss_dense"], rel=1e-5)
    assert r["loss"] == pytest.approx(r["loss_hf"], rel=1e-4)
    assert r["grad_rel"] < 2e-5, r
    # routed (each teacher over its own rows) == every teacher over every row, then select
    assert r["routed_vs_all_grad"] < 2e-5 and r["loss_unrouted"] == pytest.approx(r["loss"], rel=1e-5), r
    rows = len(r["teacher_index"])
    if len(teachers) == 2:
        assert 0 < sum(r["teacher_index"]) < rows, "the batch must mix both teachers' domains"
        assert r["sequences"] == rows and r["sequences_unrouted"] == 2 * rows
