"""teachers[i].tokenizer: cross inside the trainer (tests/workers/cross_step.py): with the student's own
tokenizer the cross path equals the same-tokenizer path (every span one token); with a genuinely
different tokenizer (another vocabulary size, merge list, special tokens and chat template) the teacher's
log-prob of every response equals transformers' forward of the teacher on the text rendered its way, at
TP = 1 and TP = 2."""

from pathlib import Path

import pytest

from megatron_opd.data.tokenizer import train_tokenizer
from megatron_opd.models.hf_tiny import save_tiny_checkpoint
from mopd_testing import REPO_ROOT, last_json, run_ranks, tiny_checkpoints, tiny_spec

WORKER = Path(__file__).parent / "workers" / "cross_step.py"
RECIPE = str(REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    student, teacher = tiny_checkpoints(tmp_path_factory, (0, 1))
    llama = tmp_path_factory.mktemp("llama_tok")
    train_tokenizer(llama, style="llama")
    other = save_tiny_checkpoint(tiny_spec("tiny_qwen3", vocab_size=640), tmp_path_factory.mktemp("other"), seed=2,
                                 tokenizer_dir=llama, init_std=0.1)
    return student, teacher, other


def run(student, teacher, tmp_path, *extra, nproc=1):
    out = run_ranks(WORKER, nproc, "--config", RECIPE, *extra, f"student.checkpoint={student}",
                    f"teachers=[{{checkpoint: {teacher}, tokenizer: cross}}]", "train.prompts_per_step=8",
                    "train.micro_batch_size=4", f"train.out_dir={tmp_path}",
                    f"parallel.tensor_model_parallel_size={nproc}", timeout=600)
    return last_json(out, "cross_step")["cross_step"]


def test_cross_path_with_the_students_tokenizer_equals_the_same_tokenizer_path(ckpts, tmp_path):
    student, teacher, _ = ckpts
    r = run(student, teacher, tmp_path, "--compare-same")
    assert r["grad_max"] > 0 and r["loss"] != 0
    assert r["loss"] == r["loss_same"] and r["grad_diff"] == 0.0, r
    m = r["metrics"]
    assert m["cross/student_tokens_per_span"] == 1.0 and m["cross/teacher_tokens_per_student_token"] == 1.0
    assert m["cross/unaligned_fraction"] == 0.0
    assert r["teacher_seq_logprob"] == pytest.approx(r["teacher_seq_logprob_hf"], abs=1e-4)


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])  # TP = 2: make test's time budget
def test_teacher_with_another_tokenizer_scores_its_own_rendering(ckpts, tmp_path, tp):
    student, _, other = ckpts
    r = run(student, other, tmp_path, nproc=tp)
    ours, hf = r["teacher_seq_logprob"], r["teacher_seq_logprob_hf"]
    assert len(ours) == len(hf) >= 8 and ours == pytest.approx(hf, abs=1e-4), (ours, hf)
    m = r["metrics"]
    assert m["cross/teacher_tokens_per_student_token"] < 0.95  # the teacher merges digits the student splits
    assert m["cross/student_tokens_per_span"] > 1.0 and m["cross/unaligned_fraction"] == 0.0


def test_routed_teachers_one_with_another_tokenizer(ckpts, tmp_path):
    """Math prompts to a same-tokenizer teacher, code prompts to one with its own tokenizer: each sample
    scored by its own teacher, its own way (routing and the cross path together)."""
    student, teacher, other = ckpts
    out = run_ranks(WORKER, 1, "--config", RECIPE, f"student.checkpoint={student}",
                    f"teachers=[{{checkpoint: {teacher}, domain: math}}, "
                    f"{{checkpoint: {other}, domain: code, tokenizer: cross}}]", "data.synthetic=mixed",
                    "train.prompts_per_step=8", "train.micro_batch_size=4", f"train.out_dir={tmp_path}",
                    timeout=600)
    r = last_json(out, "cross_step")["cross_step"]
    ours, hf = r["teacher_seq_logprob"], r["teacher_seq_logprob_hf"]
    assert len(ours) == len(hf) >= 8 and ours == pytest.approx(hf, abs=1e-4), (ours, hf)
    assert {"math", "code"} == set(r["domains"]), r["domains"]  # both teachers scored some samples
    assert 0 < r["metrics"]["cross/teacher_tokens_per_student_token"] < 0.95  # the code samples' teacher


def test_cross_teacher_is_refused_where_expert_groups_span_replicas():
    from megatron_opd.config import load_config
    from megatron_opd.trainer import check_cross_layout

    cfg = load_config(RECIPE, ["teachers=[{checkpoint: /t, tokenizer: cross}]", "parallel.expert_model_parallel_size=2"])
    check_cross_layout(cfg, experts_span=False)
    with pytest.raises(ValueError, match=r"teachers\[0\].tokenizer=cross: the MoE layers' expert groups \(ETP x EP = 2"):
        check_cross_layout(cfg, experts_span=True)
