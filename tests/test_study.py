"""The study command: its aggregation against hand-computed values, its config refusals, and a tiny grid
end to end (demo-built models, a model trained by a run and exported, reward correction, resume)."""

import json
import math
import subprocess
import sys

import pytest

from megatron_opd.study import (Study, StudyConfig, aggregate_domains, aggregate_method, domain_accuracies,
                                mean_std, plot_study, reach_ratio, read_domain_curves, results_table, steps_ratio,
                                steps_to_match, steps_to_reach, verdict_better, verdict_faster)
from mopd_testing import REPO_ROOT


def test_mean_std_and_steps_to_reach_by_hand():
    assert mean_std([0.2, 0.4, 0.9]) == pytest.approx((0.5, math.sqrt((0.09 + 0.01 + 0.16) / 2)))
    assert mean_std([0.3]) == (0.3, 0.0)
    assert steps_to_reach([(20, 0.5), (0, 0.1), (40, 0.91), (60, 0.8)], 0.9) == 40
    assert steps_to_reach([(0, 0.1), (20, 0.5)], 0.9) is None


def test_aggregate_method_over_seeds_by_hand():
    curves = {1: [(0, 0.0, 0.2), (10, 5.0, 0.5), (20, 10.0, 0.95)],
              2: [(0, 0.0, 0.2), (10, 7.0, 0.9), (20, 14.0, 0.7)]}
    r = aggregate_method(curves, target=0.9)
    assert [p["step"] for p in r["curve"]] == [0, 10, 20]
    assert r["curve"][1]["acc_mean"] == pytest.approx(0.7)
    assert r["curve"][1]["acc_std"] == pytest.approx(math.sqrt(0.08))
    assert r["curve"][2]["wall_s"] == pytest.approx(12.0)
    assert r["final_acc_per_seed"] == [0.95, 0.7]  # the last evaluation, not the best
    assert r["steps_to_target_per_seed"] == [20, 10] and r["steps_to_target"] == pytest.approx(15.0)
    # one seed never reaches it: no mean (it would hide the failure), the count says why
    curves[2] = [(0, 0.0, 0.2), (10, 7.0, 0.5), (20, 14.0, 0.6)]
    r = aggregate_method(curves, target=0.9)
    assert r["steps_to_target"] is None and r["seeds_reaching_target"] == 1


def test_steps_to_match_reads_the_mean_curve():
    curve = [{"step": 0, "acc_mean": 0.2}, {"step": 20, "acc_mean": 0.45}, {"step": 40, "acc_mean": 0.6}]
    assert steps_to_match(curve, 0.45) == 20 and steps_to_match(curve, 0.61) is None


def test_steps_ratio_says_what_was_not_reached():
    assert steps_ratio(20.0, 180.0, 200) == (9.0, "9.00")
    ratio, text = steps_ratio(20.0, None, 200)
    assert ratio is None and text.startswith("> 10.0")
    assert steps_ratio(None, 40.0, 200)[0] is None
    assert steps_ratio(0.0, 40.0, 200)[1].startswith("undefined")


def _curve(*points):
    return [{"step": s, "acc_mean": a} for s, a in points]


def test_reach_ratio_and_verdict_faster_by_hand():
    grpo = _curve((0, 0.2), (10, 0.22), (20, 0.25), (30, 0.3), (40, 0.31))
    opd = _curve((0, 0.2), (10, 0.26), (20, 0.31), (30, 0.5), (40, 0.6))
    # GRPO's final 0.31: GRPO there at 40 (crossed in 31..40), OPD at 20 (crossed in 11..20)
    r = reach_ratio(opd, grpo, 0.31)
    assert (r["steps"], r["reference_steps"], r["ratio"]) == (20, 40, 2.0)
    assert (r["ratio_low"], r["ratio_high"]) == (31 / 20, 40 / 11)
    assert verdict_faster(r, 6.7)["verdict"] == "partly"  # surely sooner (> 1.55x), surely below 6.7x (< 3.64x)
    assert verdict_faster(r, 1.5)["verdict"] == "yes"  # even the lower bound 1.55 is above 1.5
    assert verdict_faster(r, 3.0)["verdict"] == "undecided"  # 1.55..3.64 straddles 3
    assert "2.00x (1.55-3.64x)" in verdict_faster(r, 3.0)["text"]
    # there by the first evaluation: 31/10 .. 40/1
    fast = reach_ratio(_curve((0, 0.2), (10, 0.4), (20, 0.5)), grpo, 0.31)
    assert (fast["ratio_low"], fast["ratio_high"]) == (3.1, 40.0) and verdict_faster(fast, 6.7)["verdict"] == "undecided"
    assert verdict_faster(fast, 3.0)["verdict"] == "yes"
    # as slow as GRPO (bounds 31/40 .. 40/31 around 1, below the claim), never, or already there at step 0
    slow = reach_ratio(_curve((0, 0.2), (10, 0.2), (20, 0.2), (30, 0.2), (40, 0.35)), grpo, 0.31)
    assert slow["ratio"] == 1.0 and verdict_faster(slow, 6.7)["verdict"] == "no"
    never = reach_ratio(_curve((0, 0.2), (40, 0.3)), grpo, 0.31)
    assert never["steps"] is None and verdict_faster(never, 6.7)["verdict"] == "no"
    assert verdict_faster(reach_ratio(_curve((0, 0.5), (10, 0.6)), grpo, 0.31), 6.7)["verdict"] == "undefined"
    # each seed's own curve: seed 1 there at 10, seed 2 at 20
    per_seed = [{"step": 0, "acc_mean": 0.2, "acc_per_seed": [0.2, 0.2]},
                {"step": 10, "acc_mean": 0.28, "acc_per_seed": [0.33, 0.23]},
                {"step": 20, "acc_mean": 0.4, "acc_per_seed": [0.4, 0.4]}]
    assert reach_ratio(per_seed, grpo, 0.31)["steps_per_seed"] == [10, 20]


def test_verdict_better_by_hand():
    # means 0.5 and 0.4, stds 0.02 and 0.01 (hand-computed): intervals [0.48, 0.52] and [0.39, 0.41] apart
    r = verdict_better([0.48, 0.5, 0.52], [0.39, 0.4, 0.41])
    assert r["verdict"] == "yes" and r["diff"] == pytest.approx(0.1) and r["seeds_above"] == 3
    assert r["text"] == "0.500 ± 0.020 vs 0.400 ± 0.010 (+0.100; above in 3/3 seeds)"
    assert verdict_better([0.39, 0.4, 0.41], [0.48, 0.5, 0.52])["verdict"] == "no"
    # means 0.45 vs 0.40 but stds 0.07 and 0.01: [0.38, 0.52] overlaps [0.39, 0.41]; seed 1 below
    r = verdict_better([0.38, 0.45, 0.52], [0.39, 0.4, 0.41])
    assert r["verdict"] == "within noise" and r["seeds_above"] == 2


def test_claims_and_reference_method_in_the_summary_and_table(tmp_path):
    raw = _study_dict(out_dir=str(tmp_path), reference_method="grpo", claims=[
        {"claim": "OPD beats GRPO", "kind": "better", "method": "opd", "baseline": "grpo"},
        {"claim": "OPD is 5x faster than GRPO", "kind": "faster", "method": "opd", "baseline": "grpo", "at_least": 5},
        {"claim": "OPD passes its teacher", "kind": "above_model", "method": "opd", "baseline": "teacher"}])
    raw["methods"].append({"name": "erpd", "recipe": "configs/recipes/erpd_demo.yaml", "command": "erpd",
                           "teachers": []})
    study = Study(StudyConfig.from_dict(raw))
    opd = aggregate_method({1: [(0, 0.0, 0.2), (10, 1.0, 0.3), (20, 2.0, 0.5)],
                            2: [(0, 0.0, 0.2), (10, 1.0, 0.32), (20, 2.0, 0.52)]}, 0.9)
    grpo = aggregate_method({1: [(0, 0.0, 0.2), (10, 1.0, 0.25), (20, 2.0, 0.3)],
                             2: [(0, 0.0, 0.2), (10, 1.0, 0.24), (20, 2.0, 0.32)]}, 0.9)
    erpd = aggregate_method({1: [(0, 0.0, 0.2), (56, 9.0, 0.25)], 2: [(0, 0.0, 0.2), (56, 9.0, 0.26)]}, 0.9)
    rows = {"opd": {"command": "train", **opd}, "grpo": {"command": "train", **grpo}, "erpd": {"command": "erpd", **erpd}}
    out = study.summarise({"student": 0.2, "teacher": 0.8}, rows,
                          {"student": {1: 0.2, 2: 0.2}, "teacher": {2: 0.81, 1: 0.79}})
    ref = out["reference"]
    assert ref["target"] == pytest.approx(0.31) and set(ref["methods"]) == {"opd", "grpo"}  # ERPD: another budget
    assert ref["methods"]["opd"]["steps"] == 10 and ref["methods"]["grpo"]["steps"] == 20
    assert (ref["methods"]["opd"]["ratio_low"], ref["methods"]["opd"]["ratio_high"]) == (1.1, 20.0)
    better, faster, above = out["claims"]
    assert better["verdict"] == "yes" and better["text"].startswith("0.510 ± 0.014 vs 0.310 ± 0.014")
    assert faster["verdict"] == "undecided" and faster["steps"] == 10 and faster["steps_per_seed"] == [20, 10]  # seed 1: 0.30 at step 10
    assert above["verdict"] == "no" and "vs 0.800 ± 0.014" in above["text"]
    # a claim whose methods have not run yet
    assert study.summarise({}, {"opd": rows["opd"]}, {})["claims"][0]["verdict"] == "pending"
    table = results_table({**out, "model_acc_std": {"student": 0.0, "teacher": 0.014}})
    assert "| opd | 0.510 ± 0.014 | 20 | not reached (0/2 seeds) | 10: 2.00x (1.10-20.00x) | 2 |" in table
    assert "| grpo | 0.310 ± 0.014 | 20 | not reached (0/2 seeds) | (reference) | 2 |" in table
    assert "| erpd | 0.255 ± 0.007 | 56 | not reached (0/2 seeds) | - (another budget) | 9 |" in table
    assert "| OPD beats GRPO | **yes** | 0.510 ± 0.014 vs 0.310 ± 0.014 (+0.200; above in 2/2 seeds) |" in table
    plot_study(out, tmp_path / "study.png")  # GRPO's final accuracy drawn as the target line
    assert (tmp_path / "study.png").stat().st_size > 0


def test_claims_pair_each_seed_with_the_same_seed():
    """Seeds listed out of order: a fixed model's evaluations are keyed by seed, a method's rows are sorted."""
    row = {"command": "train", **aggregate_method({3: [(0, 0.0, 0.9)], 1: [(0, 0.0, 0.1)], 2: [(0, 0.0, 0.5)]}, 1.0)}
    claim = StudyConfig.from_dict(_study_dict(seeds=[3, 1, 2], claims=[
        {"claim": "c", "kind": "above_model", "method": "opd", "baseline": "student"}])).claims[0]
    r = Study.check_claim(claim, {"opd": row}, {"student": {3: 0.85, 1: 0.05, 2: 0.45}})
    assert r["seeds_above"] == 3  # each seed above its own evaluation by 0.05 (unpaired it would be 1/3)
    with pytest.raises(ValueError, match="equal-length per-seed lists of >= 2 seeds"):
        verdict_better([0.5], [0.4])


def test_domain_accuracies_and_curves_read_the_per_domain_keys(tmp_path):
    assert domain_accuracies({"eval/accuracy": 0.5, "eval/accuracy/math": 0.75, "eval/accuracy/code": 0.25,
                              "eval/pass@2": 0.9}) == {"math": 0.75, "code": 0.25}
    assert domain_accuracies({"eval/accuracy": 0.5}) == {}
    rows = [{"step": 0, "eval/accuracy": 0.5, "eval/accuracy/math": 0.6, "eval/accuracy/code": 0.4},
            {"step": 1, "loss": 0.1}, {"step": 2, "eval/accuracy": 0.7, "eval/accuracy/math": 0.9,
                                       "eval/accuracy/code": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_domain_curves(tmp_path) == {"math": [(0, 0.6), (2, 0.9)], "code": [(0, 0.4), (2, 0.5)]}


def test_aggregate_domains_compares_each_domain_with_its_teacher_by_hand():
    finals = {1: {"math": 0.8, "code": 0.5}, 2: {"math": 0.6, "code": 0.7}, 3: {"math": 0.7, "code": 0.9}}
    r = aggregate_domains(finals, {"math": ("tm", 0.65, 0.0), "code": ("tc", 0.9, 0.05)})
    assert r["math"]["acc_mean"] == pytest.approx(0.7) and r["math"]["acc_std"] == pytest.approx(0.1)
    assert r["math"]["teacher"] == "tm" and r["math"]["exceeds_teacher"] is True
    assert r["math"]["exceeds_beyond_std"] is False and r["math"]["seeds_exceeding"] == 2
    assert r["code"]["exceeds_teacher"] is False and r["code"]["seeds_exceeding"] == 0
    # beyond both standard deviations: 0.92 - 0.02 > 0.8 + 0.05
    sharp = aggregate_domains({1: {"math": 0.9}, 2: {"math": 0.92}, 3: {"math": 0.94}}, {"math": ("tm", 0.8, 0.05)})
    assert sharp["math"]["exceeds_beyond_std"] is True and sharp["math"]["seeds_exceeding"] == 3
    # a domain without a teacher (one-teacher or teacher-free methods on mixed data): no comparison
    r = aggregate_domains(finals, {})
    assert "teacher" not in r["code"] and r["code"]["acc_per_seed"] == [0.5, 0.7, 0.9]
    table = results_table({"threshold": 0.9, "eval_samples": 2, "eval_size": 8, "seeds": [1, 2, 3], "steps": 4,
                           "model_acc": {"student": 0.3}, "model_acc_std": {"student": 0.01},
                           "model_domain_acc": {"tm": {"math": 0.65, "code": 0.1}},
                           "model_domain_acc_std": {"tm": {"math": 0.02, "code": 0.03}},
                           "methods": {"multi": {"curve": [], "final_acc_mean": 0.7, "final_acc_std": 0.1,
                                                 "steps_to_target": None, "seeds_reaching_target": 0,
                                                 "seeds": [1, 2, 3],
                                                 "domains": aggregate_domains(finals, {"math": ("tm", 0.65, 0.02)})}}})
    assert "| multi | math | 0.700 ± 0.100 | tm | 0.650 ± 0.020 | yes (2/3) |" in table
    assert "| multi | code | 0.700 ± 0.200 | - | - | - |" in table
    assert "| tm | 0.100 ± 0.030 | 0.650 ± 0.020 |" in table  # domains sorted: code, math
    assert "| student | 0.300 ± 0.010 |" in table


def _study_dict(**kw):
    raw = {"models": {"student": {"demo": "student_base"}, "teacher": {"demo": "teacher"}},
           "methods": [{"name": "opd", "recipe": "configs/recipes/demo.yaml"},
                       {"name": "grpo", "recipe": "configs/recipes/grpo_demo.yaml", "teachers": []}]}
    raw.update(kw)
    return raw


@pytest.mark.parametrize("change,message", [
    ({"seeds": [1, 1]}, "study.seeds"),
    ({"eval_size": 0}, "study.eval_size must be >= 1"),
    ({"threshold": 1.5}, "study.threshold"),
    ({"steps_to_teacher": ["opd", "sft"]}, "study.steps_to_teacher"),
    ({"models": {"student": {"sft_error_rate": 0.3, "sft_task": "poetry"}, "teacher": {"demo": "teacher"}}},
     "study.models.student.sft_task='poetry'"),
    ({"models": {"student": {"demo": "student_base", "sft_task": "mixed"}, "teacher": {"demo": "teacher"}}},
     "study.models.student.sft_task is read only with sft_error_rate"),
    ({"lr": 1e-3}, r"study: unknown field\(s\) \['lr'\]"),
    ({"models": {"student": {"demo": "student_base", "sft_layers": 8}, "teacher": {"demo": "teacher"}}},
     "sft_layers are read only with sft_error_rate"),
    ({"models": {"student": {"sft_error_rate": 0.1, "sft_hidden": 96}, "teacher": {"demo": "teacher"}}},
     "study.models.student.sft_hidden=96: use a multiple of 64"),
    ({"reference_method": "ppo"}, "study.reference_method='ppo'"),
    ({"claims": [{"claim": "x", "kind": "cheaper", "method": "opd", "baseline": "grpo"}]},
     r"study.claims\[opd: cheaper\].kind"),
    ({"claims": [{"claim": "x", "kind": "better", "method": "opd", "baseline": "teacher"}]},
     r"baseline='teacher': name one of the methods"),
    ({"claims": [{"claim": "x", "kind": "above_model", "method": "opd", "baseline": "grpo"}]},
     r"baseline='grpo': name one of study.models"),
    ({"claims": [{"claim": "x", "kind": "faster", "method": "opd", "baseline": "grpo"}]},
     r"at_least is the claimed ratio"),
    ({"claims": [{"claim": "x", "kind": "better", "method": "opd", "baseline": "grpo", "at_least": 2}]},
     r"at_least is the claimed ratio"),
    ({"seeds": [1], "claims": [{"claim": "x", "kind": "better", "method": "opd", "baseline": "grpo"}]},
     r"study.claims need >= 2 seeds"),
    ({"claims": {"claim": "x"}}, r"study.claims: give a list"),
    ({"reference_method": "erpd", "steps_to_teacher": [], "methods": [
        {"name": "opd", "recipe": "x.yaml"}, {"name": "erpd", "recipe": "y.yaml", "command": "erpd", "teachers": []}]},
     r"study.reference_method='erpd': name one of the methods trained in steps"),
    ({"claims": [{"claim": "x", "kind": "faster", "method": "erpd", "baseline": "opd", "at_least": 2}],
      "steps_to_teacher": [], "methods": [
        {"name": "opd", "recipe": "x.yaml"}, {"name": "erpd", "recipe": "y.yaml", "command": "erpd", "teachers": []}]},
     r"study.claims\[erpd: faster\]: compares steps"),
    ({"claims": [{"claim": "x", "kind": "better", "method": "opd", "baseline": "grpo", "verdict": "yes"}]},
     r"study.claims\[opd\]: unknown field\(s\) \['verdict'\]"),
    ({"models": {"teacher": {"demo": "teacher"}}}, "study.models needs `student`"),
    ({"models": {"student": {"demo": "student_base"}, "teacher": {"demo": "teacher", "sft_error_rate": 0.1}}},
     "study.models.teacher: set exactly one"),
    ({"models": {"student": {"demo": "student_base"}, "teacher": {"start": "student"}}},
     "study.models.teacher: `start` needs `recipe`"),
    ({"methods": [{"name": "opd", "recipe": "x.yaml", "teachers": ["nope"]},
                  {"name": "grpo", "recipe": "y.yaml", "teachers": []}]}, "model 'nope' is not in study.models"),
    ({"models": {"student": {"demo": "student_base"}, "t2": {"demo": "teacher"}},
      "methods": [{"name": "opd", "recipe": "x.yaml", "teachers": ["t2"]},
                  {"name": "grpo", "recipe": "y.yaml", "teachers": []}]}, "scored against study.models.teacher"),
    ({"methods": [{"name": "opd", "recipe": "x.yaml", "command": "dpo"},
                  {"name": "grpo", "recipe": "y.yaml", "teachers": []}]}, r"study.methods\[opd\].command"),
    ({"methods": [{"name": "opd", "recipe": "x.yaml", "epochs": 3},
                  {"name": "grpo", "recipe": "y.yaml", "teachers": []}]}, r"unknown field\(s\) \['epochs'\]"),
])
def test_study_config_refusals_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(_study_dict(**change))


def test_a_finished_run_made_with_other_settings_is_refused_not_reused(tmp_path):
    cfg = StudyConfig.from_dict(_study_dict(out_dir=str(tmp_path)))
    study = Study(cfg)
    study.paths = {"student": tmp_path / "s", "teacher": tmp_path / "t"}
    run_dir = tmp_path / "runs" / "opd" / "seed1"
    run_dir.mkdir(parents=True)
    record = {"wall_s": 1.0, "curve": [[0, 0.0, 0.1]], "cmd": ["-m", "megatron_opd.cli", "train", "optim.lr=1"]}
    (run_dir / "study_run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"study.methods\[opd\] seed 1: .* other settings .*optim.lr=1"):
        study.run_method(cfg.methods[0], 1)
    # a record from before commands were recorded: reused, nothing runs
    method = cfg.methods[0]
    (run_dir / "study_run.json").unlink()
    record["cmd"] = None
    (run_dir / "study_run.json").write_text(json.dumps(record))
    assert study.run_method(method, 1) == {"curve": [(0, 0.0, 0.1)], "domain_curve": {}}


@pytest.mark.parametrize("name", ["small", "domains", "cross_tokenizer", "async", "bf16", "strong_to_weak"])
def test_shipped_study_configs_load(name):
    cfg = StudyConfig.load(str(REPO_ROOT / "configs" / "studies" / f"{name}.yaml"))
    assert len(cfg.seeds) >= 3 and cfg.eval_size >= 256
    for m in [*cfg.methods, *(m for m in cfg.models.values() if m.recipe)]:
        assert (REPO_ROOT / m.recipe).is_file(), m.recipe


TINY_STUDY = """
out_dir: {out}
demo_dir: {out}/demo
demo: {{teacher_sft_steps: 3, student_sft_steps: 3, sft_batch_size: 8}}
seeds: [1, 2]
steps: 2
eval_every: 1
eval_size: 4
eval_samples: 1
steps_to_teacher: [opd, exopd_rc]
reference_method: exopd_rc
claims:
  - {{claim: "ExOPD with reward correction beats OPD", kind: better, method: exopd_rc, baseline: opd}}
  - {{claim: "OPD reaches exopd_rc's final accuracy 2x sooner", kind: faster, method: opd, baseline: exopd_rc, at_least: 2}}
  - {{claim: "ERPD improves on the student", kind: above_model, method: erpd, baseline: student}}
common_overrides: [train.prompts_per_step=4, rollout.max_new_tokens=8, train.micro_batch_size=4,
                   optim.lr_warmup_steps=0, train.save_every=1, data.synthetic=mixed]
models:
  student: {{demo: student_base}}
  teacher: {{demo: teacher}}
  teacher_rl:
    start: student
    recipe: configs/recipes/grpo_demo.yaml
    overrides: [train.steps=1, "teachers=[]", rollout.n=2]
methods:
  - {{name: opd, recipe: configs/recipes/demo.yaml}}
  - {{name: exopd_rc, recipe: configs/recipes/demo.yaml, teachers: [teacher_rl], reference: student,
     overrides: [objective.gopd.lam=1.25, objective.gopd.estimator=sampled, objective.gopd.reward_correction=true]}}
  - {{name: multi_exopd, recipe: configs/recipes/demo.yaml, teachers: [teacher, teacher_rl], domains: [math, code],
     overrides: [objective.gopd.lam=1.25, objective.gopd.estimator=sampled]}}
  - {{name: erpd, recipe: configs/recipes/erpd_tiny.yaml, command: erpd, teachers: []}}
"""


@pytest.mark.slow  # 5.5 min: the suite's longest; `make test-all` runs it (README: Tests)
def test_tiny_study_end_to_end_then_resumes_without_rerunning(tmp_path):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(TINY_STUDY.format(out=tmp_path / "study"))
    cmd = [sys.executable, "-m", "megatron_opd.cli", "study", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "study"
    results = json.loads((out / "study_results.json").read_text())
    assert set(results["methods"]) == {"opd", "exopd_rc", "multi_exopd", "erpd"} and results["complete"]
    erpd = json.loads((out / "runs" / "erpd" / "seed1" / "erpd_results.json").read_text())
    assert results["methods"]["erpd"]["final_acc_per_seed"][0] == erpd["erpd_stage2_acc"]
    assert results["methods"]["erpd"]["curve"][0]["step"] == 0
    assert (out / "models" / "teacher_rl" / "model.safetensors").is_file()  # trained by a run, exported
    for name in ("opd", "exopd_rc"):
        row = results["methods"][name]
        assert row["seeds"] == [1, 2] and [p["step"] for p in row["curve"]] == [0, 1, 2]
        for seed in (1, 2):  # each point is the run's own held-out evaluation
            metrics = [json.loads(l) for l in (out / "runs" / name / f"seed{seed}" / "metrics.jsonl").open()]
            evals = [r["eval/accuracy"] for r in metrics if "eval/accuracy" in r]
            assert row["final_acc_per_seed"][seed - 1] == evals[-1]
        config = (out / "runs" / name / "seed1" / "config.yaml").read_text()
        assert "synthetic_seed: 7" in config and "synthetic_eval_size: 4" in config
    # multi-teacher on two domains: each domain's final accuracy against its own teacher's in that domain
    # (fixed models are evaluated with every seed's sampling, like the runs: their mean is compared)
    evals = {name: [json.loads((out / "evals" / f"{name}{sfx}.json").read_text()) for sfx in ("", "_seed2")]
             for name in ("teacher", "teacher_rl")}
    assert results["model_domain_acc"]["teacher_rl"]["code"] == pytest.approx(
        mean_std([e["eval/accuracy/code"] for e in evals["teacher_rl"]])[0])
    doms = results["methods"]["multi_exopd"]["domains"]
    assert doms["math"]["teacher"] == "teacher" and doms["code"]["teacher"] == "teacher_rl"
    assert (doms["math"]["teacher_acc"], doms["math"]["teacher_acc_std"]) == pytest.approx(
        mean_std([e["eval/accuracy/math"] for e in evals["teacher"]]))
    for seed in (1, 2):
        metrics = [json.loads(l) for l in (out / "runs" / "multi_exopd" / f"seed{seed}" / "metrics.jsonl").open()]
        assert doms["code"]["acc_per_seed"][seed - 1] == [r for r in metrics if "eval/accuracy/code" in r][-1][
            "eval/accuracy/code"]
    assert (out / "study_domains.png").stat().st_size > 0
    assert "multi_exopd_final_acc_code:" in proc.stdout and "| multi_exopd | code |" in (out / "study_table.md").read_text()
    rc = (out / "runs" / "exopd_rc" / "seed1" / "config.yaml").read_text()
    assert str(out / "models" / "teacher_rl") in rc and "reward_correction: true" in rc
    assert "steps_to_90pct_teacher_opd" in results and "steps_to_90pct_teacher_exopd_rc" in results
    assert "steps_to_90pct_teacher_opd:" in proc.stdout and "steps_for_opd_to_reach_exopd_rc_final_acc" in results
    assert (out / "study.png").stat().st_size > 0 and "| opd |" in (out / "study_table.md").read_text()
    # every row but ERPD's (another budget) against exopd_rc's final accuracy; a verdict per claim
    assert set(results["reference"]["methods"]) == {"opd", "exopd_rc", "multi_exopd"}
    assert [c["verdict"] != "pending" for c in results["claims"]] == [True, True, True]
    assert "| ExOPD with reward correction beats OPD | **" in proc.stdout  # the table, then the verdicts
    assert "claim: ERPD improves on the student -> " in proc.stdout and "steps_to_exopd_rc_final_acc_opd:" in proc.stdout

    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[study] $" not in again.stdout  # every run and evaluation is reused
    assert json.loads((out / "study_results.json").read_text())["methods"] == results["methods"]
