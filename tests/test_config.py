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
    other = config_to_dict(load_config(recipe, ["objective.gopd.lam=1.5", "optim.lr=3e-6",
                                                "teachers=[{checkpoint: /elsewhere}]"]))
    assert config_changes(old, other) == [
        "objective.gopd.lam: 1.0 -> 1.5", "optim.lr: 0.0001 -> 3e-06",
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


TINY = REPO_ROOT / "configs" / "recipes" / "tiny_opd.yaml"


@pytest.mark.parametrize("overrides, message", [
    # another objective's section: its settings would be ignored
    (["objective.name=reopold", "objective.gopd.lam=1.25"], "objective.gopd is set but objective.name=reopold"),
    # fields the chosen settings do not use
    (["objective.gopd.estimator=full", "objective.gopd.eps_low=0.1"], "eps_low=0.1 is not used by estimator=full"),
    (["objective.gopd.estimator=full", "objective.gopd.dual_clip_c=3.0"], "dual_clip_c=3.0 is not used"),
    (["objective.gopd.kl_direction=forward"], "kl_direction='forward' is not used by estimator=sampled"),
    (["objective.gopd.estimator=full", "objective.gopd.top_k=8"], "top_k=8 is not used by estimator=full"),
    (["objective.gopd.kl_estimator=k2"], "kl_estimator='k2' is not used without a KL term"),
    (["objective.name=reopold", "objective.gopd=null", "objective.reopold.exploration=clamp"],
     "exploration='clamp' is not used without an exploration phase"),
    (["objective.name=reopold", "objective.gopd=null", "objective.reopold.switch_step=5",
      "objective.reopold.exploration_beta=0.3"], "exploration_beta=0.3 is not used by exploration=mask_below_floor"),
    # meaningless or unsound combinations
    (["objective.gopd.kl_coef=0.1", "objective.gopd.kl_estimator=k1"], "k1's gradient is zero in expectation"),
    (["objective.gopd.estimator=topk"], "needs objective.gopd.top_k"),
    (["objective.gopd.estimator=full", "objective.gopd.lam=1.25"], "needs estimator=sampled"),
    (["objective.gopd.estimator=full", "train.logprob_impl=logits"], "train.logprob_impl=logits"),
    (["objective.name=erpd", "objective.gopd=null", "teachers=[]", "rollout.n=4", "train.logprob_impl=logits"],
     "objective.name=erpd reads pi_old's hidden states through the fused LM-head path"),
    (["objective.gopd.reward_correction=true"], "no effect at lam = 1"),
    (["objective.name=reopold", "objective.gopd=null", "objective.reopold.mixture=null",
      "objective.reopold.switch_step=5"], "needs a floor"),
    (["objective.name=grpo", "objective.gopd=null", "rollout.n=4"], "objective.name=grpo uses no teacher"),
    (["objective.name=grpo", "objective.gopd=null", "teachers=[]", "rollout.n=1"], "rollout.n >= 2"),
    (["reference={checkpoint: /somewhere}"], "reference is set but objective.name=gopd"),
    # a teacher with another tokenizer: only through the sampled-token log-ratio
    (["teachers=[{checkpoint: /t, tokenizer: cross}]", "objective.gopd.estimator=full"],
     "teachers[0].tokenizer=cross is not supported here: the exact KL"),
    (["teachers=[{checkpoint: /t, tokenizer: bpe}]"], "tokenizer='bpe': use one of"),
    (["objective.gopd.lam=1.25", "reference={checkpoint: /r, tokenizer: cross}"],
     "reference.tokenizer='cross': only teachers"),
    # SFT on teacher samples and ERPD
    (["objective.name=sft", "objective.gopd=null", "teachers=[]"], "give exactly one teacher"),
    (["objective.name=sft", "objective.gopd=null", "teachers=[{checkpoint: /t, offload: true}]"],
     "offload / domain are not used by objective.name=sft"),
    (["objective.name=erpd", "objective.gopd=null", "teachers=[]", "rollout.n=4", "objective.erpd.stage1.loss=grpo", "objective.erpd.stage1.tau_pos=2.0"],
     "tau_pos=2.0 is not used by loss=grpo"),
    (["objective.name=erpd", "objective.gopd=null", "teachers=[]", "rollout.n=4", "objective.erpd.ensemble=sum"], "ensemble='sum' is not used without ensemble_with"),
    (["objective.name=erpd", "objective.gopd=null", "teachers=[]", "rollout.n=4", "objective.erpd.stage2.strategy=2", "objective.erpd.stage1.loss=mse"], "needs objective.erpd.unlearned_step"),
    (["objective.name=erpd", "objective.gopd=null", "teachers=[]", "rollout.n=4", "objective.erpd.stage2.strategy=2"], "set objective.erpd.stage1.loss=mse"),
    (["objective.name=erpd", "objective.gopd=null", "teachers=[]", "rollout.n=4", "objective.erpd.stage2.strategy=3"], "needs objective.erpd.weak_checkpoint"),
    (["objective.name=erpd", "objective.gopd=null", "teachers=[]", "rollout.n=4", "objective.erpd.teacher_step=7"], "teacher_step=7 is not a kept candidate"),
    (["objective.name=erpd", "objective.gopd=null", "teachers=[]", "rollout.n=4", "objective.erpd.stage1.loss=ppo"], "use one of"),
    # recipes written for the flat section are told where the key went
    (["objective.lam=1.25"], "use objective.gopd.lam"),
    (["objective.name=reopold", "objective.entropy_top_beta=0.2"], "use objective.reopold.refinement_beta"),
])
def test_objective_settings_are_refused_with_the_field_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(TINY, overrides)


def test_each_objective_declares_what_a_step_must_provide():
    def needs(*overrides):
        return load_config(TINY, list(overrides)).objective.needs()

    assert needs() == needs("objective.gopd.lam=1.0")
    assert not needs().reference and needs("objective.gopd.lam=1.25").reference  # lam = 1: no reference
    assert needs("objective.gopd.kl_coef=0.1").reference
    assert needs("objective.gopd.estimator=full").teacher_hidden
    assert needs("objective.gopd.estimator=topk", "objective.gopd.top_k=4").teacher_hidden
    assert needs("objective.gopd.entropy_coef=0.01").update_entropy
    reopold = needs("objective.name=reopold", "objective.gopd=null")
    assert reopold.old_policy and reopold.teachers and not reopold.update_entropy
    grpo = needs("objective.name=grpo", "objective.gopd=null", "teachers=[]", "rollout.n=4")
    assert grpo.outcome_rewards and not grpo.teachers and not grpo.reference
    # ERPD: every log-prob through the fused path (pi_old's hidden states come from it; signals compare)
    assert needs("objective.name=erpd", "objective.gopd=null", "teachers=[]", "rollout.n=4").fused_logprobs
    assert not any(needs(*o).fused_logprobs for o in [(), ("objective.gopd.estimator=full",)])


def test_every_recipe_loads_with_only_its_objectives_section():
    for recipe in sorted((REPO_ROOT / "configs" / "recipes").glob("*.yaml")):
        cfg = load_config(recipe, require_teachers=False)
        others = [n for n in ("gopd", "reopold", "grpo") if n != cfg.objective.name]
        assert all(getattr(cfg.objective, n) is None for n in others), recipe.name


def test_the_loop_never_branches_on_an_objectives_name():
    source = (REPO_ROOT / "megatron_opd" / "trainer.py").read_text()
    for pattern in ("objective.name", '"gopd"', '"reopold"', '"grpo"', "'gopd'", "'reopold'", "'grpo'"):
        assert pattern not in source, pattern


def test_a_retired_key_is_refused_in_recipes_but_not_a_change_on_resume():
    from megatron_opd.config import config_changes, config_to_dict

    with pytest.raises(ValueError, match="mismatch_probe_size"):
        load_config(TINY, ["rollout.mismatch_probe_size=2"])  # accepted and never read before: now refused
    new = config_to_dict(load_config(TINY))
    old = {**new, "rollout": {**new["rollout"], "mismatch_probe_size": 2}}  # a checkpoint written earlier
    assert config_changes(old, new) == []


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "config error at train.stepz: Key 'stepz' not in 'TrainConfig'. Did you mean: 'steps'?"),
    (["train.steps=abc"], "config error at train.steps: Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_config_errors_are_one_line_with_the_field_first(overrides, message):
    """OmegaConf's own text put the field on its second line, among reference and object types."""
    with pytest.raises(ValueError) as err:
        load_config(TINY, overrides)
    assert str(err.value) == message


def test_a_recipe_that_is_not_yaml_or_not_a_mapping_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  seed: [1, 2\ndata:\n  x: 1\n")
    with pytest.raises(ValueError) as err:
        load_config(bad)
    assert str(err.value) == (f"config file {bad}: YAML syntax error at line 4, column 5 (did not find expected "
                              "',' or ']'); fix it there")
    bad.write_text("- train\n- data\n")
    with pytest.raises(ValueError, match=r"bad.yaml holds a ListConfig, not a mapping of sections"):
        load_config(bad)
