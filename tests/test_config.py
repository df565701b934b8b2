"""Recipe loading: where relative paths point, train.resume, what may change on resume, eval without a
teacher."""

from pathlib import Path

import pytest

from megatron_opd.config import load_config
from mopd_testing import REPO_ROOT


def test_recipe_spec_paths_are_relative_to_the_recipe_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_1p7b.yaml")  # base: ..._to_4b
    assert Path(cfg.student.spec) == REPO_ROOT / "configs" / "models" / "qwen3_1p7b.yaml"  # its own
    assert Path(cfg.teachers[0].spec) == REPO_ROOT / "configs" / "models" / "qwen3_30b_a3b.yaml"  # from base
    # on the command line a path is the user's: relative to the working directory
    (tmp_path / "m.yaml").write_text((REPO_ROOT / "configs" / "models" / "qwen3_4b.yaml").read_text())
    cfg = load_config(REPO_ROOT / "configs" / "recipes" / "exopd_30b_a3b_to_4b.yaml", ["student.spec=m.yaml"])
    assert cfg.student.spec == "m.yaml"


def test_train_resume_takes_true_false_or_force():
    recipe = REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml"
    for given, want in [("true", "true"), ("false", "false"), ("force", "force"), ("True", "true")]:
        assert load_config(recipe, [f"train.resume={given}"]).train.resume == want
    with pytest.raises(ValueError, match="train.resume='maybe': use true, false or force"):
        load_config(recipe, ["train.resume=maybe"])


def test_config_changes_ignore_run_length_evaluation_and_logging_only():
    from megatron_opd.config import config_changes, config_to_dict, load_config

    recipe = REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml"
    old = config_to_dict(load_config(recipe))
    same = config_to_dict(load_config(recipe, ["train.steps=9", "train.eval_every=3", "train.save_every=2",
                                               "train.keep_last=5", "train.eval_samples=2"]))
    assert config_changes(old, same) == []
    other = config_to_dict(load_config(recipe, ["objective.lam=1.5", "optim.lr=3e-6",
                                                "teachers=[{checkpoint: /elsewhere}]"]))
    assert config_changes(old, other) == [
        "objective.lam: 1.0 -> 1.5", "optim.lr: 0.0001 -> 3e-06",
        f"teachers[0].checkpoint: {old['teachers'][0]['checkpoint']!r} -> '/elsewhere'"]


def test_eval_loads_a_recipe_without_teachers():
    recipe = REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml"
    with pytest.raises(ValueError, match="at least one teacher"):
        load_config(recipe, ["teachers=[]"])
    assert load_config(recipe, ["teachers=[]"], require_teachers=False).teachers == []
    with pytest.raises(ValueError, match="at least one teacher"):  # the switch does not leak
        load_config(recipe, ["teachers=[]"])


def test_micro_batch_token_budget_and_logprob_impl_are_validated():
    recipe = REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml"
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=32 is below rollout.max_model_len=64"):
        load_config(recipe, ["train.max_tokens_per_micro_batch=32"])
    with pytest.raises(ValueError, match="train.logprob_impl='dense': use auto, fused or logits"):
        load_config(recipe, ["train.logprob_impl=dense"])
    assert load_config(recipe, ["train.max_tokens_per_micro_batch=64"]).train.max_tokens_per_micro_batch == 64


def test_logprob_impl_auto_picks_the_fused_head_for_wide_vocabularies():
    from megatron_opd.models.forward import resolve_logprob_impl

    assert resolve_logprob_impl("auto", 151936 // 4) == "fused"
    assert resolve_logprob_impl("auto", 512) == "logits"
    assert resolve_logprob_impl("logits", 151936) == "logits"
