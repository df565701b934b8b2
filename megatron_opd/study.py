"""`megatron-opd study`: the papers' claims at small scale, as a grid of methods x seeds with error bars.

    megatron-opd study --config configs/studies/small.yaml [key=value ...]

Every method is a real run of `megatron-opd train | sft | erpd` (its own process: Megatron-Core student,
vLLM rollouts with refit) on the same student, data and held-out prompts (`data.synthetic_seed` fixed;
`train.seed` = the study seed varies sampling and order). Models come from the demo's builders (cached)
or from a run of this package started from another model and exported to HF (an RL teacher and its
pre-RL base, domain teachers). The study is resumable: a finished run leaves `study_run.json` and is
skipped; an interrupted one resumes from its own checkpoint.

Writes <out_dir>/study_results.json, study_table.md and study.png (held-out accuracy against optimizer
steps and against training wall time, mean +- std over seeds), and prints `name: value` lines, among them
`steps_to_90pct_teacher_<method>` for the methods named in `steps_to_teacher` and their ratio.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "sft", "erpd")
# commands whose curve is in optimizer steps of the same samples per step; ERPD's is in updates on one fixed
# batch, so it takes no part in step comparisons (reference_method, "faster" claims)
STEP_COMMANDS = ("train", "sft")


@dataclass
class StudyModel:
    """One model of the study: built by the demo's SFT builder, or trained by a run from another model."""

    demo: Optional[str] = None
    """"teacher" or "student_base": the demo's cached model (built with the study's `demo` settings)."""

    sft_error_rate: Optional[float] = None
    """Build by the demo's SFT builder (demo student's shape) with this fraction of flawed solutions (the
    task's typical mistake: carry-free sums; strings copied instead of reversed)."""

    sft_steps: int = 450
    """SFT steps of an `sft_error_rate` model."""

    sft_seed: int = 3
    """Initialisation/data seed of an `sft_error_rate` model."""

    sft_task: str = "arithmetic"
    """Synthetic task of an `sft_error_rate` model's SFT data: "arithmetic", "string" or "mixed" (a
    two-domain student, e.g. the start of domain teachers; the mistake is each task's typical one)."""

    sft_hidden: Optional[int] = None
    """Width of an `sft_error_rate` model (default: the demo student's); a multiple of 64 (heads of width
    32 in 2 KV groups)."""

    sft_layers: int = 4
    """Depth of an `sft_error_rate` model (the demo's models have 4 layers)."""

    sft_tokenizer: str = "qwen"
    """Tokenizer of an `sft_error_rate` model: "qwen" (the demo's), "llama" or "llama_digits" (another
    vocabulary size, merge list, special tokens and chat template; numbers merged, or one token per digit
    with merges across spaces and punctuation: `data.tokenizer.train_tokenizer`). A model trained from it
    (`start`) keeps it. A teacher whose tokenizer differs from the student's is passed with
    `tokenizer: cross`."""

    start: Optional[str] = None
    """Train from this study model with `recipe` + `overrides` (e.g. GRPO) and export the result to HF."""

    recipe: Optional[str] = None
    """`start`: recipe of the run (its objective; student.checkpoint is set to `start`'s)."""

    overrides: List[str] = field(default_factory=list)
    """`start`: key=value overrides of the run."""

    def validate(self, name: str) -> None:
        kinds = [k for k, v in (("demo", self.demo), ("sft_error_rate", self.sft_error_rate),
                                ("start", self.start)) if v is not None]
        if len(kinds) != 1:
            raise ValueError(f"study.models.{name}: set exactly one of demo / sft_error_rate / start "
                             f"(got {kinds or 'none'})")
        if self.demo is not None and self.demo not in ("teacher", "student_base"):
            raise ValueError(f"study.models.{name}.demo={self.demo!r}: use 'teacher' or 'student_base'")
        if self.start is not None and not self.recipe:
            raise ValueError(f"study.models.{name}: `start` needs `recipe` (the run that trains it)")
        if self.start is None and (self.recipe or self.overrides):
            raise ValueError(f"study.models.{name}: recipe/overrides are read only with `start`")
        from megatron_opd.data.synthetic import SYNTHETIC_KINDS

        if self.sft_task not in SYNTHETIC_KINDS:
            raise ValueError(f"study.models.{name}.sft_task={self.sft_task!r}: use one of {SYNTHETIC_KINDS}")
        if self.sft_task != "arithmetic" and self.sft_error_rate is None:
            raise ValueError(f"study.models.{name}.sft_task is read only with sft_error_rate (a model the "
                             "study builds by SFT); remove it")
        from megatron_opd.data.tokenizer import TOKENIZER_STYLES

        if self.sft_tokenizer not in TOKENIZER_STYLES:
            raise ValueError(f"study.models.{name}.sft_tokenizer={self.sft_tokenizer!r}: use one of {TOKENIZER_STYLES}")
        if (self.sft_tokenizer != "qwen" or self.sft_hidden is not None or self.sft_layers != 4) \
                and self.sft_error_rate is None:
            raise ValueError(f"study.models.{name}.sft_tokenizer / sft_hidden / sft_layers are read only with "
                             "sft_error_rate (a model the study builds by SFT); remove them")
        if self.sft_hidden is not None and (self.sft_hidden < 64 or self.sft_hidden % 64):
            raise ValueError(f"study.models.{name}.sft_hidden={self.sft_hidden}: use a multiple of 64 (heads of "
                             "width 32 in 2 KV groups)")
        if self.sft_layers < 1:
            raise ValueError(f"study.models.{name}.sft_layers={self.sft_layers} must be >= 1")


@dataclass
class StudyMethod:
    """One row of the study: a command and recipe, on the study's models."""

    name: str
    """Row name (also the run directory name)."""

    recipe: str
    """Recipe YAML (its objective); data, budget and models are the study's."""

    command: str = "train"
    """"train", "sft" or "erpd" (`megatron-opd <command>`)."""

    overrides: List[str] = field(default_factory=list)
    """key=value overrides of this method (e.g. objective.gopd.lam=1.25)."""

    teachers: List[str] = field(default_factory=lambda: ["teacher"])
    """Study models used as teachers (empty for GRPO); several need `domains`."""

    domains: List[str] = field(default_factory=list)
    """With several teachers: each teacher's domain (multi-teacher routing)."""

    reference: Optional[str] = None
    """Study model used as the reference (reward correction: the teacher's pre-RL base)."""

    nproc: int = 1
    """Processes of the run (> 1: under torchrun, e.g. 2 for a trainer rank and a dedicated engine rank)."""

    def validate(self, models: Dict[str, StudyModel]) -> None:
        where = f"study.methods[{self.name}]"
        if self.nproc < 1:
            raise ValueError(f"{where}.nproc must be >= 1")
        if self.command not in COMMANDS:
            raise ValueError(f"{where}.command={self.command!r}: use one of {COMMANDS}")
        for m in [*self.teachers, *([self.reference] if self.reference else [])]:
            if m not in models:
                raise ValueError(f"{where}: model {m!r} is not in study.models ({sorted(models)})")
        if self.domains and len(self.domains) != len(self.teachers):
            raise ValueError(f"{where}.domains: one domain per teacher ({len(self.teachers)})")
        if not self.teachers and "teacher" not in models:
            raise ValueError(f"{where}: a method without teachers is scored against study.models.teacher "
                             "(its steps-to-teacher target); add that model")
        if len(self.teachers) > 1 and not self.domains:
            raise ValueError(f"{where}: several teachers need `domains`")


CLAIM_KINDS = ("better", "faster", "above_model")


@dataclass
class StudyClaim:
    """A paper's claim, checked on the study's numbers at its end (a verdict with the numbers behind it)."""

    claim: str
    """The claim in words, with its source (e.g. "ExOPD (lambda 1.25) beats OPD strong-to-weak (G-OPD Table 3)")."""

    kind: str
    """"better": `method`'s final accuracy above `baseline`'s (a method), `verdict_better`'s rule; "faster":
    `method` reaches `baseline`'s (a method's) final mean accuracy `at_least` times sooner than `baseline`
    does (steps of the mean curves, with the evaluation interval's bounds: `verdict_faster`); "above_model":
    `method`'s final accuracy above a fixed study model's (`baseline`, e.g. the student), as "better"."""

    method: str
    """The method the claim is about."""

    baseline: str
    """What it is compared with: a method ("better", "faster") or a study model ("above_model")."""

    at_least: Optional[float] = None
    """"faster" only: the claimed ratio's low end, > 1 (REOPOLD: 6.7x the sample efficiency of RL)."""

    def validate(self, methods: List[str], models: List[str]) -> None:
        where = f"study.claims[{self.method}: {self.kind}]"
        if self.kind not in CLAIM_KINDS:
            raise ValueError(f"{where}.kind={self.kind!r}: use one of {CLAIM_KINDS}")
        if self.method not in methods:
            raise ValueError(f"{where}.method={self.method!r}: name one of the methods {methods}")
        pool, what = (models, "study.models") if self.kind == "above_model" else (methods, "the methods")
        if self.baseline not in pool:
            raise ValueError(f"{where}.baseline={self.baseline!r}: name one of {what} {pool}")
        if (self.at_least is not None) != (self.kind == "faster"):
            raise ValueError(f"{where}.at_least is the claimed ratio of a \"faster\" claim: set it there (> 1), "
                             "and only there")
        if self.at_least is not None and self.at_least <= 1:
            raise ValueError(f"{where}.at_least={self.at_least} must be > 1 (how many times sooner)")


@dataclass
class StudyConfig:
    """A grid of methods x seeds with one student, data and budget."""

    out_dir: str = "runs/study"
    """Study directory: models/, runs/<method>/seed<k>/, results."""

    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """train.seed of each repetition (sampling, data order)."""

    data_seed: int = 7
    """data.synthetic_seed of every run: the same training and held-out prompts for all."""

    steps: int = 100
    """Optimizer steps of every train/sft method (ERPD runs its recipe's stage budgets)."""

    eval_every: int = 20
    """Held-out evaluation interval (steps)."""

    eval_size: int = 256
    """Held-out prompts (>= 256: one point of accuracy is then above sampling noise at avg@2)."""

    eval_samples: int = 2
    """Samples per held-out prompt (avg@k)."""

    threshold: float = 0.9
    """`steps_to_<pct>pct_teacher`: first evaluated step with accuracy >= threshold x teacher accuracy."""

    steps_to_teacher: List[str] = field(default_factory=lambda: ["opd", "grpo"])
    """Two methods whose steps-to-threshold are compared (the ratio is second / first); [] = none."""

    reference_method: Optional[str] = None
    """A method (e.g. "grpo") whose final mean accuracy is every method's target: each row gets the steps its
    mean curve needs to reach it and the reference's own steps to it over those (a sample-efficiency ratio at
    equal samples per step, with the bounds `eval_every` leaves: `reach_ratio`). Not an ERPD method."""

    common_overrides: List[str] = field(default_factory=list)
    """key=value overrides given to every run (e.g. optim.lr)."""

    demo: Dict[str, object] = field(default_factory=dict)
    """DemoConfig fields for the demo-built models (default: the demo's own; its cache is reused)."""

    demo_dir: str = "runs/demo"
    """Where the demo's models are cached (shared with `make demo`)."""

    models: Dict[str, StudyModel] = field(default_factory=dict)
    """Named models: `student` (required) and the teachers/references the methods use."""

    methods: List[StudyMethod] = field(default_factory=list)
    """The grid's rows."""

    claims: List[StudyClaim] = field(default_factory=list)
    """Papers' claims checked at the study's end: each gets a verdict and its numbers (results "claims",
    study_table.md, the printed lines `claim: ...`)."""

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds={self.seeds}: give distinct seeds (>= 3 for error bars)")
        for name in ("steps", "eval_every", "eval_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"study.{name} must be >= 1")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"study.threshold={self.threshold} must be in (0, 1]")
        if "student" not in self.models:
            raise ValueError("study.models needs `student` (the model every method starts from)")
        for name, m in self.models.items():
            m.validate(name)
        names = [m.name for m in self.methods]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"study.methods: give methods with distinct names (got {names})")
        for m in self.methods:
            m.validate(self.models)
        if self.steps_to_teacher and (len(self.steps_to_teacher) != 2 or set(self.steps_to_teacher) - set(names)):
            raise ValueError(f"study.steps_to_teacher={self.steps_to_teacher}: name two of the methods {names} "
                             "(or [] for none)")
        stepped = [m.name for m in self.methods if m.command in STEP_COMMANDS]
        if self.claims and len(self.seeds) < 2:
            raise ValueError(f"study.claims need >= 2 seeds for a verdict against the noise (seeds={self.seeds})")
        for claim in self.claims:
            claim.validate(names, sorted(self.models))
            if claim.kind == "faster" and {claim.method, claim.baseline} - set(stepped):
                raise ValueError(f"study.claims[{claim.method}: faster]: compares steps to a target; name methods "
                                 f"trained in steps of the same samples ({stepped}), not ERPD's")
        if self.reference_method is not None and self.reference_method not in stepped:
            raise ValueError(f"study.reference_method={self.reference_method!r}: name one of the methods trained in "
                             f"steps of the same samples {stepped} (or null for none)")

    @classmethod
    def load(cls, path: str, overrides: Optional[List[str]] = None) -> "StudyConfig":
        from omegaconf import OmegaConf

        raw = OmegaConf.load(path)
        if overrides:
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(raw, resolve=True)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "StudyConfig":
        raw = dict(raw)
        _refuse_unknown("study", raw, cls)
        models = {}
        for name, m in (raw.pop("models", None) or {}).items():
            _refuse_unknown(f"study.models.{name}", m, StudyModel)
            models[name] = StudyModel(**m)
        methods = []
        for m in raw.pop("methods", None) or []:
            _refuse_unknown(f"study.methods[{m.get('name')}]", m, StudyMethod)
            methods.append(StudyMethod(**m))
        claims = []
        if not isinstance(raw.get("claims") or [], list):
            raise ValueError("study.claims: give a list of {claim, kind, method, baseline[, at_least]}")
        for m in raw.pop("claims", None) or []:
            _refuse_unknown(f"study.claims[{m.get('method')}]", m, StudyClaim)
            claims.append(StudyClaim(**m))
        return cls(models=models, methods=methods, claims=claims, **raw)


def _refuse_unknown(where: str, raw: dict, cls) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")


# --------------------------------------------------------------------------------------------------
# Pure aggregation (tested against hand-computed values)
# --------------------------------------------------------------------------------------------------


def mean_std(values: List[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def steps_to_reach(curve: List[tuple[int, float]], target: float) -> Optional[int]:
    """First evaluated step whose accuracy is >= target (None if none is)."""
    for step, acc in sorted(curve):
        if acc >= target:
            return step
    return None


def aggregate_method(curves: Dict[int, List[tuple[int, float, float]]], target: float) -> dict:
    """One method's summary over seeds. `curves[seed]` = [(step, wall_s, accuracy)] at its evaluations.

    Returns the mean/std curve over the steps every seed evaluated, the final accuracy, and steps to
    `target`: the mean over seeds when every seed reached it, else None with the count that did."""
    seeds = sorted(curves)
    common = sorted(set.intersection(*(set(s for s, _, _ in curves[k]) for k in seeds)))
    curve = []
    for step in common:
        accs = [next(a for s, _, a in curves[k] if s == step) for k in seeds]
        walls = [next(w for s, w, _ in curves[k] if s == step) for k in seeds]
        m, sd = mean_std(accs)
        curve.append({"step": step, "wall_s": mean_std(walls)[0], "acc_mean": m, "acc_std": sd,
                      "acc_per_seed": accs})
    final = [max(curves[k])[2] for k in seeds]
    reached = [steps_to_reach([(s, a) for s, _, a in curves[k]], target) for k in seeds]
    done = [r for r in reached if r is not None]
    fm, fs = mean_std(final)
    return {"seeds": seeds, "curve": curve, "final_acc_mean": fm, "final_acc_std": fs,
            "final_acc_per_seed": final, "steps_to_target_per_seed": reached,
            "steps_to_target": mean_std(done)[0] if len(done) == len(seeds) else None,
            "seeds_reaching_target": len(done)}


def steps_to_match(curve: List[dict], target: float) -> Optional[int]:
    """First step of a mean curve (aggregate_method's "curve") whose mean accuracy is >= target."""
    return steps_to_reach([(p["step"], p["acc_mean"]) for p in curve], target)


def reach_ratio(curve: List[dict], reference_curve: List[dict], target: float) -> dict:
    """Steps of a mean curve (aggregate_method's "curve") to reach `target`, the reference curve's steps to
    it, and their ratio (reference / this: how many times sooner), with the bounds the evaluation interval
    leaves: each curve crossed `target` after its previous evaluation, so the ratio lies in
    [(ref_prev + 1) / steps, ref / (prev + 1)]. Also each seed's steps to `target` (its own curve)."""
    steps, ref = steps_to_match(curve, target), steps_to_match(reference_curve, target)

    def previous(points, step):
        return max((p["step"] for p in points if p["step"] < step), default=0)

    out = {"target": target, "steps": steps, "reference_steps": ref, "ratio": None, "ratio_low": None,
           "ratio_high": None, "steps_per_seed": None}
    if curve and "acc_per_seed" in curve[0]:
        out["steps_per_seed"] = [steps_to_reach([(p["step"], p["acc_per_seed"][i]) for p in curve], target)
                                 for i in range(len(curve[0]["acc_per_seed"]))]
    if steps and ref is not None:
        out.update(ratio=ref / steps, ratio_low=(previous(reference_curve, ref) + 1) / steps,
                   ratio_high=ref / (previous(curve, steps) + 1))
    return out


def format_ratio(reach: dict) -> str:
    """"5.00x (4.55-9.09x)": the ratio at the evaluated steps and the bounds of the evaluation interval."""
    if reach["ratio"] is None:
        return "undefined"
    return f"{reach['ratio']:.2f}x ({reach['ratio_low']:.2f}-{reach['ratio_high']:.2f}x)"


def verdict_better(a: List[float], b: List[float]) -> dict:
    """Is `a` (one accuracy per seed) above `b` (per seed, the same seeds in the same order)? "yes" when the
    mean +- std intervals are apart, "no" when they are apart the other way, "within noise" when they
    overlap."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"verdict_better: two equal-length per-seed lists of >= 2 seeds (got {len(a)}, {len(b)})")
    ma, sa = mean_std(a)
    mb, sb = mean_std(b)
    verdict = "yes" if ma - sa > mb + sb else "no" if ma + sa < mb - sb else "within noise"
    above = sum(x > y for x, y in zip(a, b))
    return {"verdict": verdict, "diff": ma - mb, "seeds_above": above,
            "text": f"{ma:.3f} ± {sa:.3f} vs {mb:.3f} ± {sb:.3f} ({ma - mb:+.3f}; above in {above}/{len(a)} seeds)"}


def verdict_faster(reach: dict, at_least: float) -> dict:
    """A `reach_ratio` against a claimed ratio: "yes" when even its lower bound is at or above the claim;
    "partly" when even its upper bound is below the claim but the method is surely sooner (lower bound > 1);
    "no" when the upper bound is below the claim otherwise, or the target is never reached; "undecided" when
    the bounds straddle the claim (evaluate more often); "undefined" when the method is at the target
    before training, or the baseline's mean curve never meets it."""
    t, s, ref = reach["target"], reach["steps"], reach["reference_steps"]
    if s is None:
        return {"verdict": "no", "text": f"never reached {t:.3f} (the baseline's final accuracy)"}
    if s == 0:
        return {"verdict": "undefined", "text": f"at {t:.3f} before training (step 0)"}
    if ref is None:  # seeds evaluated at different last steps: the mean final is not a point of the mean curve
        return {"verdict": "undefined", "text": f"the baseline's mean curve never met {t:.3f}"}
    lo, hi = reach["ratio_low"], reach["ratio_high"]
    per_seed = reach.get("steps_per_seed")
    text = (f"reaches {t:.3f} at step {s} vs the baseline's {ref}: {format_ratio(reach)}"
            + (f"; per seed at steps {per_seed}" if per_seed else "") + f" (claimed >= {at_least}x)")
    if lo >= at_least:
        verdict = "yes"
    elif hi < at_least:
        verdict = "partly" if lo > 1 else "no"
    else:
        verdict = "undecided"
    return {"verdict": verdict, "text": text}


def domain_accuracies(metrics: dict) -> Dict[str, float]:
    """{domain: accuracy} from an evaluation's `eval/accuracy/<domain>` keys (empty on one-domain data)."""
    from megatron_opd.rewards.evaluation import DOMAIN_ACCURACY_PREFIX as prefix

    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix) and v is not None}


def aggregate_domains(finals: Dict[int, Dict[str, float]], teacher_of: Dict[str, tuple]) -> dict:
    """Per-domain final accuracy over seeds (`finals[seed][domain]`) and, for a domain with a teacher
    (`teacher_of[domain]` = (teacher name, its mean accuracy in that domain, its std over the evaluation
    seeds)), whether the student exceeds it: in the mean, per seed, and with the two means further apart
    than the sum of their standard deviations (`exceeds_beyond_std`)."""
    out = {}
    for d in sorted(set.intersection(*(set(f) for f in finals.values()))):
        per_seed = [finals[k][d] for k in sorted(finals)]
        m, sd = mean_std(per_seed)
        row = {"acc_mean": m, "acc_std": sd, "acc_per_seed": per_seed}
        teacher, t_acc, t_sd = teacher_of.get(d, (None, None, None))
        if teacher is not None and t_acc is not None:
            row.update(teacher=teacher, teacher_acc=t_acc, teacher_acc_std=t_sd, exceeds_teacher=m > t_acc,
                       exceeds_beyond_std=m - sd > t_acc + t_sd, seeds_exceeding=sum(a > t_acc for a in per_seed))
        out[d] = row
    return out


def steps_ratio(fast: Optional[float], slow: Optional[float], budget: int) -> tuple[Optional[float], str]:
    """slow / fast steps-to-target and a sentence; a method that never reached it gives a lower bound."""
    if fast is None:
        return None, f"the first method did not reach the target within {budget} steps"
    if fast == 0:
        return None, "undefined: the first method met the target before training (step 0)"
    if slow is None:
        return None, f"> {budget / fast:.1f} (the second did not reach it within {budget} steps)"
    return slow / fast, f"{slow / fast:.2f}"


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _run(cmd: List[str], log_path: Path) -> float:
    """One stage in its own process, appended to its log (a resumed run keeps its earlier output)."""
    from megatron_opd.demo import run_stage

    return run_stage(cmd, log_path, tag="study", append=True)


class Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir).resolve()
        self.py = sys.executable
        self.paths: Dict[str, Path] = {}

    # ---- models
    def build_models(self) -> None:
        from megatron_opd.demo import DemoConfig, build_demo_models

        needs_demo = any(m.demo or m.sft_error_rate is not None for m in self.cfg.models.values())
        demo = None
        if needs_demo:
            dcfg = DemoConfig(out_dir=self.cfg.demo_dir, **self.cfg.demo)
            demo = build_demo_models(dcfg)
        pending = dict(self.cfg.models)
        while pending:
            progressed = False
            for name, m in list(pending.items()):
                if m.start is not None and m.start not in self.paths:
                    if m.start not in pending:
                        raise ValueError(f"study.models.{name}.start={m.start!r} is not a study model")
                    continue
                self.paths[name] = self.build_model(name, m, demo)
                del pending[name]
                progressed = True
            if not progressed:
                raise ValueError(f"study.models: `start` forms a cycle among {sorted(pending)}")

    def build_model(self, name: str, m: StudyModel, demo) -> Path:
        from megatron_opd.demo import build_sft_model, demo_spec

        if m.demo:
            return demo[m.demo]
        if m.sft_error_rate is not None:
            dcfg = demo["config"]
            tok_dir, vocab = demo["tokenizer"], demo["vocab"]
            if m.sft_tokenizer != "qwen":  # another tokenizer, trained here once
                from megatron_opd.data.tokenizer import train_tokenizer

                tok_dir = self.out / "models" / f"tokenizer_{m.sft_tokenizer}"
                vocab = ((len(train_tokenizer(tok_dir, style=m.sft_tokenizer)) + 63) // 64) * 64
            return build_sft_model(demo_spec(f"study-{name}", m.sft_hidden or dcfg.student_hidden, vocab,
                                             layers=m.sft_layers),
                                   tok_dir, self.out / "models" / name, m.sft_steps,
                                   dcfg.sft_batch_size, dcfg.digits, m.sft_seed, error_rate=m.sft_error_rate,
                                   task=m.sft_task)
        out = self.out / "models" / name
        run_dir = self.out / "models" / f"{name}.run"
        cmd = [self.py, "-m", "megatron_opd.cli", "train", "--config", str(REPO_ROOT / m.recipe),
               f"student.checkpoint={self.paths[m.start]}", f"train.out_dir={run_dir}", "train.resume=true",
               f"data.synthetic_seed={self.cfg.data_seed}", *self.cfg.common_overrides, *m.overrides]
        stamp = self.out / "models" / f"{name}.json"
        if (out / "model.safetensors").is_file():
            check_recorded_command(stamp, cmd, f"study.models.{name}", out)
            return out
        _run(cmd, self.out / "models" / f"{name}.log")
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        _run([self.py, "-m", "tools.convert_megatron_to_hf", "--megatron", str(run_dir), "--out", str(tmp)],
             self.out / "models" / f"{name}.log")
        stamp.write_text(json.dumps({"cmd": cmd[1:]}, indent=2))
        tmp.rename(out)  # last: an interrupted export leaves no model that looks finished
        return out

    def tokenizer_of(self, name: str) -> str:
        """The tokenizer style of a study model (a model trained by a run keeps its start's)."""
        m = self.cfg.models[name]
        return self.tokenizer_of(m.start) if m.start is not None else m.sft_tokenizer

    # ---- evaluation of fixed models
    def data_overrides(self, seed: int) -> List[str]:
        c = self.cfg
        return [f"train.seed={seed}", f"data.synthetic_seed={c.data_seed}", f"data.synthetic_eval_size={c.eval_size}",
                f"train.eval_samples={c.eval_samples}"]

    def evaluate_model(self, name: str, seed: int) -> dict:
        """The held-out metrics of a fixed model (eval/accuracy, and eval/accuracy/<domain> on
        multi-domain data) with one seed's sampling; every seed is evaluated, as the methods' runs are."""
        suffix = "" if seed == self.cfg.seeds[0] else f"_seed{seed}"
        path = self.out / "evals" / f"{name}{suffix}.json"
        if not path.is_file():
            recipe = REPO_ROOT / self.cfg.methods[0].recipe
            _run([self.py, "-m", "megatron_opd.cli", "eval", "--config", str(recipe), "--checkpoint",
                  str(self.paths[name]), "--output", str(path), *self.data_overrides(seed),
                  *self.cfg.common_overrides], self.out / "evals" / f"{name}.log")
        return json.loads(path.read_text())

    # ---- one method x seed
    def run_method(self, method: StudyMethod, seed: int) -> dict:
        """One finished run's record: "curve" [(step, wall_s, accuracy)] and "domain_curve"
        {domain: [(step, accuracy)]} (empty on one-domain data)."""
        c = self.cfg
        run_dir = self.out / "runs" / method.name / f"seed{seed}"
        done = run_dir / "study_run.json"

        def tokenizer(t):  # a teacher with another tokenizer than the student's: the cross-tokenizer path
            return ", tokenizer: cross" if self.tokenizer_of(t) != self.tokenizer_of("student") else ""

        teachers = ", ".join(
            f"{{checkpoint: {self.paths[t]}{tokenizer(t)}" + (f", domain: {method.domains[i]}}}" if method.domains else "}")
            for i, t in enumerate(method.teachers))
        launcher = [self.py] if method.nproc == 1 else \
            [self.py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={method.nproc}"]
        cmd = [*launcher, "-m", "megatron_opd.cli", method.command, "--config", str(REPO_ROOT / method.recipe),
               f"student.checkpoint={self.paths['student']}", f"teachers=[{teachers}]",
               f"train.out_dir={run_dir}", "train.resume=true", *self.data_overrides(seed)]
        if method.reference:
            cmd.append(f"reference={{checkpoint: {self.paths[method.reference]}}}")
        if method.command != "erpd":
            cmd += [f"train.steps={c.steps}", f"train.eval_every={c.eval_every}"]
        cmd += [*c.common_overrides, *method.overrides]
        if done.is_file():
            check_recorded_command(done, cmd, f"study.methods[{method.name}] seed {seed}", run_dir)
        else:
            wall = _run(cmd, run_dir.parent / f"seed{seed}.log")
            curve = read_curve(run_dir, method.command, wall)
            domain_curve = read_domain_curves(run_dir) if method.command != "erpd" else {}
            done.write_text(json.dumps({"wall_s": wall, "curve": curve, "domain_curve": domain_curve,
                                        "cmd": cmd[1:]}, indent=2))
        record = json.loads(done.read_text())
        return {"curve": [tuple(p) for p in record["curve"]], "domain_curve": record.get("domain_curve", {})}

    def run(self) -> dict:
        c = self.cfg
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.build_models()
        used = sorted(({t for m in c.methods for t in [*m.teachers, *([m.reference] if m.reference else [])]}
                       | ({"teacher"} & set(c.models))
                       | {cl.baseline for cl in c.claims if cl.kind == "above_model"}) - {"student"})
        # each fixed model at every seed's sampling: its accuracy carries the same noise as the runs'
        evals = {name: [self.evaluate_model(name, seed) for seed in c.seeds] for name in ["student", *used]}
        model_acc, model_acc_std, model_domain_acc, model_domain_acc_std = {}, {}, {}, {}
        model_acc_per_seed = {}
        for name, runs in evals.items():
            model_acc_per_seed[name] = {seed: e["eval/accuracy"] for seed, e in zip(c.seeds, runs)}
            model_acc[name], model_acc_std[name] = mean_std(list(model_acc_per_seed[name].values()))
            doms = [domain_accuracies(e) for e in runs]
            for d in sorted(doms[0]):
                m, sd = mean_std([x[d] for x in doms])
                model_domain_acc.setdefault(name, {})[d] = m
                model_domain_acc_std.setdefault(name, {})[d] = sd
        rows = {}
        for method in c.methods:
            records = {seed: self.run_method(method, seed) for seed in c.seeds}
            curves = {seed: r["curve"] for seed, r in records.items()}
            # the target is 90 % of the (best) teacher this method learns from; GRPO: the study's `teacher`
            teacher_acc = max(model_acc[t] for t in (method.teachers or ["teacher"]))
            rows[method.name] = {"command": method.command, "teachers": method.teachers,
                                 "reference": method.reference, "overrides": method.overrides,
                                 "teacher_acc": teacher_acc,
                                 **aggregate_method(curves, c.threshold * teacher_acc)}
            finals = {seed: {d: max(pts)[1] for d, pts in r["domain_curve"].items()}
                      for seed, r in records.items() if r["domain_curve"]}
            if finals:
                # each domain's teacher (multi-teacher routing); other methods: no teacher to compare with
                teacher_of = {d: (t, model_domain_acc.get(t, {}).get(d), model_domain_acc_std.get(t, {}).get(d))
                              for t, d in zip(method.teachers, method.domains)}
                rows[method.name]["domains"] = aggregate_domains(finals, teacher_of)
            # rewritten after every method: an interrupted study still has the rows it finished
            results = self.summarise(model_acc, rows, model_acc_per_seed)
            results["model_acc_std"] = model_acc_std
            if model_domain_acc:
                results.update(model_domain_acc=model_domain_acc, model_domain_acc_std=model_domain_acc_std)
            results["study_seconds"] = round(time.time() - t0, 1)
            results["complete"] = len(rows) == len(c.methods)
            self.write(results)
        return results

    def summarise(self, model_acc: dict, rows: dict, model_acc_per_seed: Optional[dict] = None) -> dict:
        c = self.cfg
        pct = round(c.threshold * 100)
        out = {"model_acc": model_acc, "seeds": c.seeds, "steps": c.steps, "eval_size": c.eval_size,
               "eval_samples": c.eval_samples, "threshold": c.threshold, "methods": rows}
        ref = rows.get(c.reference_method)
        if ref is not None:
            out["reference"] = {"method": c.reference_method, "target": ref["final_acc_mean"], "methods": {
                name: reach_ratio(r["curve"], ref["curve"], ref["final_acc_mean"])
                for name, r in rows.items() if r["command"] in STEP_COMMANDS}}
        out["claims"] = [self.check_claim(claim, rows, model_acc_per_seed or {}) for claim in c.claims]
        if not c.steps_to_teacher:
            return out
        first, second = c.steps_to_teacher
        if first not in rows or second not in rows:
            return out
        for name in (first, second):
            s = rows[name]["steps_to_target"]
            out[f"steps_to_{pct}pct_teacher_{name}"] = s if s is not None else f"not reached within {c.steps}"
        ratio, text = steps_ratio(rows[first]["steps_to_target"], rows[second]["steps_to_target"], c.steps)
        out[f"steps_to_{pct}pct_teacher_ratio_{second}_over_{first}"] = ratio if ratio is not None else text
        # the same comparison at a target both can reach: the second method's final mean accuracy
        final = rows[second]["final_acc_mean"]
        at = steps_to_match(rows[first]["curve"], final)
        out[f"steps_for_{first}_to_reach_{second}_final_acc"] = at if at is not None else f"not reached within {c.steps}"
        if at:
            out[f"steps_ratio_{second}_over_{first}_at_{second}_final_acc"] = rows[second]["curve"][-1]["step"] / at
        return out

    @staticmethod
    def check_claim(claim: StudyClaim, rows: dict, model_acc_per_seed: dict) -> dict:
        out = {"claim": claim.claim, "kind": claim.kind, "method": claim.method, "baseline": claim.baseline}
        baselines = model_acc_per_seed if claim.kind == "above_model" else rows
        if claim.method not in rows or claim.baseline not in baselines:
            return {**out, "verdict": "pending", "text": "not run yet"}
        row = rows[claim.method]
        if claim.kind == "faster":
            base = rows[claim.baseline]
            reach = reach_ratio(row["curve"], base["curve"], base["final_acc_mean"])
            return {**out, **reach, **verdict_faster(reach, claim.at_least)}
        # per seed, in the method's (sorted) seed order: "above in k/n seeds" pairs the same seed's runs
        base = (model_acc_per_seed[claim.baseline] if claim.kind == "above_model"
                else dict(zip(rows[claim.baseline]["seeds"], rows[claim.baseline]["final_acc_per_seed"])))
        return {**out, **verdict_better(row["final_acc_per_seed"], [base[seed] for seed in row["seeds"]])}

    def write(self, results: dict) -> None:
        (self.out / "study_results.json").write_text(json.dumps(results, indent=2))
        (self.out / "study_table.md").write_text(results_table(results))
        plot_study(results, self.out / "study.png")
        if any(r.get("domains") for r in results["methods"].values()):
            plot_domains(results, self.out / "study_domains.png")


def check_recorded_command(record: Path, cmd: List[str], what: str, result: Path) -> None:
    """A finished run or model is reused only if the study would run it the same way now (arguments after
    the interpreter compared; a record without them is from before this check and is reused)."""
    recorded = json.loads(record.read_text()).get("cmd") if record.is_file() else None
    if recorded is not None and recorded != cmd[1:]:
        changed = sorted(set(recorded) ^ set(cmd[1:]))
        raise ValueError(f"{what}: its finished run in {result} was made with other settings ({changed}); "
                         f"restore them, or delete {result} to run it again with the new ones")


def read_curve(run_dir: Path, command: str, run_wall_s: float) -> List[tuple[int, float, float]]:
    """[(step, training wall seconds so far, held-out accuracy)] of a finished run. Wall time is the sum
    of `time/step` up to that step (rollout, scoring, update, refit; not evaluation or start-up).
    ERPD: pi_old and the final student, at stage-1 + stage-2 updates and the run's whole wall time (its
    candidate evaluations are part of the method)."""
    from megatron_opd.metrics import read_metrics

    if command == "erpd":
        res = json.loads((run_dir / "erpd_results.json").read_text())
        rows = read_metrics(run_dir / "metrics.jsonl")
        updates = sum(1 for r in rows if "erpd/stage1_loss" in r or "erpd/stage2_loss" in r)
        return [(0, 0.0, res["base_acc"]), (updates, round(run_wall_s, 3), res["erpd_stage2_acc"])]
    curve, wall = [], 0.0
    for r in read_metrics(run_dir / "metrics.jsonl"):
        wall += r.get("time/step", 0.0)
        if r.get("eval/accuracy") is not None:
            curve.append((int(r["step"]), round(wall, 3), float(r["eval/accuracy"])))
    return curve


def read_domain_curves(run_dir: Path) -> Dict[str, List[tuple[int, float]]]:
    """{domain: [(step, held-out accuracy in that domain)]} of a finished run (empty on one-domain data)."""
    from megatron_opd.metrics import read_metrics

    curves: Dict[str, List[tuple[int, float]]] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        for d, acc in domain_accuracies(r).items():
            curves.setdefault(d, []).append((int(r["step"]), acc))
    return curves


def results_table(results: dict) -> str:
    pct = round(results["threshold"] * 100)
    lines = [f"Held-out accuracy (avg@{results['eval_samples']}, {results['eval_size']} prompts), mean ± std over "
             f"seeds {results['seeds']}; budget {results['steps']} steps.", "",
             "| model | accuracy |", "|---|---|"]
    std = results.get("model_acc_std", {})  # absent in results written before fixed models had every seed
    lines += [f"| {k} | {v:.3f}" + (f" ± {std[k]:.3f} |" if k in std else " |") for k, v in results["model_acc"].items()]
    ref = results.get("reference")
    ref_head = (f" steps to {ref['method']}'s final {ref['target']:.3f}: {ref['method']}'s steps / these "
                f"(bounds of the evaluation interval) |" if ref else "")
    lines += ["", f"| method | final accuracy | at step | steps to {pct}% of teacher |{ref_head} train wall s |",
              "|---|---|---|---|---|" + ("---|" if ref else "")]
    for name, r in results["methods"].items():
        last = r["curve"][-1] if r["curve"] else {"step": "-", "wall_s": float("nan")}
        s = r["steps_to_target"]
        reach = f"{s:.0f}" if s is not None else f"not reached ({r['seeds_reaching_target']}/{len(r['seeds'])} seeds)"
        cell = ""
        if ref:
            rr = ref["methods"].get(name)
            cell = (" - (another budget) |" if rr is None else " (reference) |" if name == ref["method"] else
                    " not reached |" if rr["steps"] is None else f" {rr['steps']}: {format_ratio(rr)} |")
        lines.append(f"| {name} | {r['final_acc_mean']:.3f} ± {r['final_acc_std']:.3f} | {last['step']} | {reach} |"
                     f"{cell} {last['wall_s']:.0f} |")
    with_domains = {n: r["domains"] for n, r in results["methods"].items() if r.get("domains")}
    if with_domains:
        lines += ["", "Per domain (final accuracy; a multi-teacher method against each teacher in its domain):", "",
                  "| method | domain | final accuracy | teacher | teacher's accuracy | student > teacher (seeds) |",
                  "|---|---|---|---|---|---|"]
        for name, doms in with_domains.items():
            for d, r in doms.items():
                if "teacher" in r:
                    vs = (f"| {r['teacher']} | {r['teacher_acc']:.3f} ± {r['teacher_acc_std']:.3f} | "
                          f"{'yes' if r['exceeds_teacher'] else 'no'} ({r['seeds_exceeding']}/{len(r['acc_per_seed'])}"
                          f"{'; beyond both stds' if r['exceeds_beyond_std'] else ''}) |")
                else:
                    vs = "| - | - | - |"
                lines.append(f"| {name} | {d} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f} {vs}")
    if results.get("claims"):
        lines += ["", "| claim | verdict | numbers |", "|---|---|---|"]
        lines += [f"| {cl['claim'].replace('|', '/')} | **{cl['verdict']}** | {cl['text']} |" for cl in results["claims"]]
    if results.get("model_domain_acc"):
        doms = sorted({d for accs in results["model_domain_acc"].values() for d in accs})
        lines += ["", "| model | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
        stds = results.get("model_domain_acc_std", {})
        for name, accs in results["model_domain_acc"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{accs[d]:.3f} ± {stds.get(name, {}).get(d, 0.0):.3f}" if d in accs else "-" for d in doms) + " |")
    return "\n".join(lines) + "\n"


def plot_study(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    # one colour per method: past matplotlib's 10-colour cycle, 20 colours (light/dark pairs)
    colors = plt.get_cmap("tab10" if len(results["methods"]) <= 10 else "tab20").colors
    for i, (name, r) in enumerate(results["methods"].items()):
        xs = [p["step"] for p in r["curve"]]
        ws = [p["wall_s"] for p in r["curve"]]
        m = [p["acc_mean"] for p in r["curve"]]
        sd = [p["acc_std"] for p in r["curve"]]
        for ax, x in ((axes[0], xs), (axes[1], ws)):
            line, = ax.plot(x, m, marker="o", ms=3, label=name, color=colors[i % len(colors)])
            ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                            color=line.get_color(), alpha=0.15)
    ref = results.get("reference")
    for ax, label in ((axes[0], "optimizer step"), (axes[1], "training wall time (s)")):
        ax.axhline(results["model_acc"].get("teacher", float("nan")), color="k", ls="--", lw=1)
        if ref:
            ax.axhline(ref["target"], color="gray", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (mean ± std over seeds)")
    axes[0].set_ylim(0, 1.02)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("megatron_opd study (dashed: teacher" + (f"; dotted: {ref['method']}'s final accuracy)" if ref else ")"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_domains(results: dict, path: Path) -> None:
    """One panel per domain: each method's final accuracy (mean ± std over seeds), that domain's teacher
    (dashed, its std over the seeds' evaluations shaded) and the student before training (dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r["domains"] for n, r in results["methods"].items() if r.get("domains")}
    domains = sorted({d for doms in rows.values() for d in doms})
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4.2), sharey=True, squeeze=False)
    for ax, d in zip(axes[0], domains):
        names = [n for n in rows if d in rows[n]]
        ax.bar(range(len(names)), [rows[n][d]["acc_mean"] for n in names],
               yerr=[rows[n][d]["acc_std"] for n in names], capsize=3, color="tab:blue", alpha=0.8)
        teacher = next((rows[n][d] for n in names if "teacher" in rows[n][d]), None)
        if teacher is not None:
            t, sd = teacher["teacher_acc"], teacher["teacher_acc_std"]
            ax.axhline(t, color="k", ls="--", lw=1, label=f"{teacher['teacher']} {t:.3f} ± {sd:.3f}")
            ax.axhspan(t - sd, t + sd, color="k", alpha=0.1)
        student = results.get("model_domain_acc", {}).get("student", {}).get(d)
        if student is not None:
            ax.axhline(student, color="gray", ls=":", lw=1, label=f"student before {student:.3f}")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"domain {d}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("final held-out accuracy (mean ± std over seeds)")
    axes[0][0].set_ylim(0, 1.02)
    fig.suptitle("multi-teacher students against each teacher in its domain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_study(cfg: StudyConfig) -> dict:
    results = Study(cfg).run()
    pct = round(cfg.threshold * 100)
    for k, v in results["model_acc"].items():
        print(f"{k}_acc: {v:.4f} +- {results['model_acc_std'][k]:.4f}")
    for name, r in results["methods"].items():
        print(f"{name}_final_acc: {r['final_acc_mean']:.4f} +- {r['final_acc_std']:.4f}")
    for name, accs in results.get("model_domain_acc", {}).items():
        for d, v in accs.items():
            print(f"{name}_acc_{d}: {v:.4f} +- {results['model_domain_acc_std'][name][d]:.4f}")
    for name, r in results["methods"].items():
        for d, row in (r.get("domains") or {}).items():
            vs = (f" (teacher {row['teacher']}: {row['teacher_acc']:.4f}; exceeds in {row['seeds_exceeding']}/"
                  f"{len(row['acc_per_seed'])} seeds)" if "teacher" in row else "")
            print(f"{name}_final_acc_{d}: {row['acc_mean']:.4f} +- {row['acc_std']:.4f}{vs}")
    for k, v in results.items():
        if k.startswith((f"steps_to_{pct}pct_teacher", "steps_for_", "steps_ratio_")):
            print(f"{k}: {v}")
    ref = results.get("reference")
    for name, rr in (ref or {}).get("methods", {}).items():
        ratio = "" if rr["ratio"] is None else f" ({format_ratio(rr)})"
        print(f"steps_to_{ref['method']}_final_acc_{name}: {rr['steps'] if rr['steps'] is not None else 'not reached'}"
              f"{ratio}")
    print("\n" + results_table(results))  # the same table as <out_dir>/study_table.md
    for cl in results.get("claims", []):
        print(f"claim: {cl['claim']} -> {cl['verdict']}: {cl['text']}")
    print(f"study_seconds: {results['study_seconds']}")
    return results
