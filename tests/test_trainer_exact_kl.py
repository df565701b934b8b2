"""objective.gopd.estimator=full / topk inside the trainer (tests/workers/exact_kl_step.py): one step's loss
and every student gradient equal the same step with the KL computed from materialised full-vocabulary
logits, and the loss equals transformers' own dense KL of the HF checkpoints; at TP = 1, TP = 2 and PP = 2."""

from pathlib import Path

import pytest

from mopd_testing import REPO_ROOT, last_json, run_ranks, tiny_checkpoints

WORKER = Path(__file__).parent / "workers" / "exact_kl_step.py"
RECIPE = str(REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory, (0, 1))


@pytest.mark.parametrize("tp, pp, estimator", [(1, 1, ["objective.gopd.estimator=full"]),
                                               (2, 1, ["objective.gopd.estimator=full"]),
                                               (1, 2, ["objective.gopd.estimator=full"]),
                                               (2, 1, ["objective.gopd.estimator=topk", "objective.gopd.top_k=16",
                                                       "objective.gopd.kl_direction=forward"])],
                         ids=["tp1-full", "tp2-full", "pp2-full", "tp2-topk16-forward"])
def test_exact_kl_step_equals_dense_references(ckpts, tmp_path, tp, pp, estimator):
    student, teacher = ckpts
    out = run_ranks(WORKER, tp * pp, "--config", RECIPE, f"student.checkpoint={student}",
                    f"teachers=[{{checkpoint: {teacher}}}]", "train.prompts_per_step=8",
                    "train.micro_batch_size=4", "objective.gopd.tis_cap=null", *estimator,
                    f"train.out_dir={tmp_path}", f"parallel.tensor_model_parallel_size={tp}",
                    f"parallel.pipeline_model_parallel_size={pp}", timeout=600)
    r = last_json(out, "exact_kl")["exact_kl"]
    assert r["loss"] > 0.01 and r["grad_max"] > 0  # two different random models: a real KL
    assert r["loss"] == pytest.approx(r["loss_dense"], rel=1e-5)
    assert r["loss"] == pytest.approx(r["loss_hf"], rel=1e-4)
    assert r["grad_rel"] < 2e-5, r
