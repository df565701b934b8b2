"""The embedded demo (README's first command): a complete distillation on a 2-core CPU in minutes.

No weights can be downloaded on these machines, so the demo builds its own models:
  1. a tokenizer trained locally, and a synthetic verifiable task (multi-digit addition, \\boxed{} answer);
  2. a teacher: a small Qwen3 trained by SFT until it is accurate (cached after the first run);
  3. a weaker student: a Qwen3 of the same shape trained by SFT on solutions of which a fraction forgets
     every carry (a systematic learner's mistake the teacher does not make; cached too);
  4. OPD (lambda = 1, the exact reverse KL to the teacher over the vocabulary), ExOPD (lambda = 1.25,
     sampled-token reward, reference = the student's initial weights) and the RL baseline GRPO (verifier
     rewards, no teacher) at the same step budget, each a real `megatron-opd train` run (Megatron-Core
     models, vLLM rollouts with refit);
  5. held-out avg@k of teacher, student before, and student after each run, and the fraction of the
     student-teacher gap OPD closed; printed as `name: value` lines, written to
     <out_dir>/demo_results.json and plotted to <out_dir>/demo.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_opd.models.spec import ModelSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO_ROOT / "configs" / "recipes" / "demo.yaml"
GRPO_RECIPE = REPO_ROOT / "configs" / "recipes" / "grpo_demo.yaml"


@dataclass
class DemoConfig:
    """Sizes and budgets of the demo (override with `make demo ARGS="key=value"` or the CLI)."""

    out_dir: str = "runs/demo"
    """Run directory; models are cached in <out_dir>/cache and reused by later runs."""

    digits: int = 2
    """Operand digits of the addition task."""

    teacher_hidden: int = 128
    """Teacher width (4 layers)."""

    student_hidden: int = 128
    """Student width (4 layers). Same width as the teacher: at 64 the student cannot learn the task
    in a CPU-minute budget at all; the student is weak by what it was taught (student_error_rate)."""

    teacher_sft_steps: int = 1000
    """SFT steps that make the teacher accurate."""

    student_sft_steps: int = 450
    """SFT steps of the student."""

    student_error_rate: float = 0.6
    """Fraction of the student's SFT solutions written without carrying (37+48=75). Its sampling then
    repeats that mistake at about this rate on problems with a carry, a weakness that does not depend
    on how far a short SFT happens to get (an under-trained student was 0.45 accurate on one machine
    and 0.97 on another)."""

    sft_batch_size: int = 64
    """SFT sequences per step."""

    opd_steps: int = 200
    """Optimizer steps of each run (OPD, ExOPD and the GRPO baseline: the same budget)."""

    opd_overrides: tuple = ()
    """Extra `key=value` overrides passed to every run (teacher eval, OPD, ExOPD, GRPO)."""

    def __post_init__(self):
        if self.digits < 1 or self.digits > 6:
            raise ValueError("demo.digits must be in [1, 6]")
        if not 0 <= self.student_error_rate < 1:
            raise ValueError(f"demo.student_error_rate={self.student_error_rate} must be in [0, 1)")
        for name in ("teacher_sft_steps", "student_sft_steps", "opd_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo.{name} must be >= 1")

    @classmethod
    def from_overrides(cls, overrides: list[str], out_dir: Optional[str] = None) -> "DemoConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {"out_dir": out_dir} if out_dir else {}
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep or key not in known:
                raise ValueError(f"demo override {item!r}: use key=value with key in {sorted(known)}")
            typ = type(getattr(cls, key, "")) if not isinstance(getattr(cls, key, None), tuple) else tuple
            kwargs[key] = tuple(value.split(",")) if typ is tuple else typ(value)
        return cls(**kwargs)


def demo_spec(name: str, hidden: int, vocab_size: int, layers: int = 4) -> ModelSpec:
    """A small Qwen3: 4 layers (the demo's), heads of width 32 (the smallest vLLM's CPU attention
    supports) in 2 KV groups (divisible by TP = 2)."""
    return ModelSpec(
        name=name, architecture="qwen3", vocab_size=vocab_size, hidden_size=hidden, num_layers=layers,
        num_attention_heads=max(2, hidden // 32), num_query_groups=2, head_dim=32,
        ffn_hidden_size=3 * hidden,
        rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
    )


def build_sft_model(spec: ModelSpec, tokenizer_dir: Path, out: Path, steps: int, batch_size: int,
                    digits: int, seed: int, error_rate: float = 0.0, task: str = "arithmetic") -> Path:
    """SFT a randomly initialised model on worked solutions of the synthetic `task` ("arithmetic",
    "string" or "mixed"), a fraction `error_rate` of them with the task's typical mistake (no carries; a
    string copied, not reversed); save it as a HF checkpoint (cached)."""
    # The cache is reused only if it was built from the same recipe (a changed DemoConfig rebuilds it).
    recipe = {"spec": dataclasses.asdict(spec), "steps": steps, "batch_size": batch_size, "digits": digits,
              "seed": seed, "error_rate": error_rate}
    if task != "arithmetic":  # keyed only when set: caches built before `task` existed stay valid
        recipe["task"] = task
    stamp = out / "demo_build.json"
    if (out / "model.safetensors").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return out
    from transformers import AutoTokenizer

    from megatron_opd import parallel
    from megatron_opd.data.synthetic import make_samples, worked_solution
    from megatron_opd.models.builder import build_gpt_model
    from megatron_opd.models.hf_mapping import load_hf_into_megatron, save_hf_checkpoint
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint
    from megatron_opd.models.student import OptimConfig, build_optimizer, wrap_ddp
    from megatron_opd.sft import SFTConfig, run_sft, tokenize_pairs

    tmp = out.with_name(out.name + ".init")
    save_tiny_checkpoint(spec, tmp, seed=seed, tokenizer_dir=tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = random.Random(seed)
    pairs = [(s["prompt"], worked_solution(s, mistake=rng.random() < error_rate, digits=digits))
             for s in make_samples(task, 20_000, seed=seed, digits=digits)]
    examples = tokenize_pairs(tokenizer, pairs, max_len=spec.max_position_embeddings)

    pcfg = parallel.ParallelConfig()
    parallel.initialize(pcfg, seed=seed)
    model = build_gpt_model(spec, pcfg, role="student")
    load_hf_into_megatron(model, spec, tmp)
    model = wrap_ddp(model)
    optim = OptimConfig(lr=3e-3, min_lr=3e-4, lr_warmup_steps=min(20, steps // 10), lr_decay_style="cosine",
                        clip_grad=1.0)
    optimizer, scheduler = build_optimizer(model, optim, steps)
    sft = SFTConfig(steps=steps, batch_size=batch_size, micro_batch_size=batch_size, seed=seed)
    from tqdm import tqdm

    with tqdm(total=steps, desc=f"[demo] sft {spec.name}", unit="step", dynamic_ncols=True) as bar:
        def log(step, loss):
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)

        run_sft(model, optimizer, scheduler, examples, sft, pad_id=tokenizer.pad_token_id,
                vocab_size=spec.vocab_size, on_step=log)
    save_hf_checkpoint(model.module, spec, out)
    tokenizer.save_pretrained(str(out))
    stamp.write_text(json.dumps(recipe, indent=2))  # last: a crash before this leaves no valid cache
    parallel.destroy()
    return out


def _recipe_warmup_steps() -> int:
    import yaml

    return int(yaml.safe_load(DEMO_RECIPE.read_text())["optim"]["lr_warmup_steps"])


@dataclass(frozen=True)
class StageProgress:
    """A progress bar for one stage: `total` steps, read from a training run's metrics.jsonl as it grows
    (the last held-out accuracy shown beside it); without `metrics`, elapsed time only."""

    desc: str
    total: int = 0
    metrics: Optional[Path] = None


def run_stage(cmd: list[str], log_path: Path, tag: str = "demo", append: bool = False,
              progress: Optional[StageProgress] = None, verbose: bool = True) -> float:
    """Run one stage as its own process (each stage owns its process groups and vLLM engine), its command
    line and output to `log_path` (the command also to the console with `verbose`), a progress bar on the
    console with `progress`; returns its wall seconds. Shared by the demo and `megatron-opd study`."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    if verbose:
        print(f"[{tag}] $ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a" if append else "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))
        if progress is None:
            proc.wait()
        else:
            _follow(proc, progress)
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{tag} stage failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return time.time() - t0


def _follow(proc: subprocess.Popen, progress: StageProgress) -> None:
    """Advance a tqdm bar from the run's metrics.jsonl (one complete line per finished step) until `proc`
    ends."""
    from tqdm import tqdm

    with tqdm(total=progress.total or None, desc=progress.desc, unit="step", dynamic_ncols=True,
              bar_format=None if progress.metrics else "{desc}: {elapsed}") as bar:
        while proc.poll() is None:
            time.sleep(1.0)
            if progress.metrics is None or not progress.metrics.is_file():
                bar.refresh()
                continue
            rows = [json.loads(l) for l in progress.metrics.read_text().splitlines() if l.endswith("}")]
            if rows:
                bar.update(rows[-1]["step"] - bar.n)
                acc = [r["eval/accuracy"] for r in rows if r.get("eval/accuracy") is not None]
                if acc:
                    bar.set_postfix_str(f"held-out acc {acc[-1]:.3f}")


def build_demo_models(cfg: DemoConfig) -> dict:
    """The demo's tokenizer, teacher and student (built once, then read from <out_dir>/cache)."""
    from megatron_opd.data.tokenizer import train_tokenizer

    cache = Path(cfg.out_dir).resolve() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    tok_dir = cache / "tokenizer"
    tokenizer = train_tokenizer(tok_dir)
    vocab = ((len(tokenizer) + 63) // 64) * 64
    teacher = build_sft_model(demo_spec("demo-teacher", cfg.teacher_hidden, vocab), tok_dir,
                              cache / "teacher", cfg.teacher_sft_steps, cfg.sft_batch_size, cfg.digits, 1)
    student = build_sft_model(demo_spec("demo-student", cfg.student_hidden, vocab), tok_dir,
                              cache / "student_base", cfg.student_sft_steps, cfg.sft_batch_size,
                              cfg.digits, 2, error_rate=cfg.student_error_rate)
    return {"teacher": teacher, "student_base": student, "tokenizer": tok_dir, "vocab": vocab, "config": cfg}


def run_demo(cfg: DemoConfig, verbose: bool = False) -> dict:
    """Build (or reuse) the demo's models, evaluate the teacher, train OPD, ExOPD and GRPO, print the
    table. Each stage shows a progress bar; its command line and output go to <out_dir>/<stage>.log
    (the command lines to the console too with `verbose`)."""
    out = Path(cfg.out_dir).resolve()
    t0 = time.time()
    models = build_demo_models(cfg)
    teacher, student = models["teacher"], models["student_base"]
    print(f"[demo] models ready ({time.time() - t0:.0f}s)", flush=True)

    py = sys.executable
    common = [f"student.checkpoint={student}",
              f"train.steps={cfg.opd_steps}", f"data.synthetic_digits={cfg.digits}",
              # the recipe's warm-up, shortened for short runs (it must stay below train.steps)
              f"optim.lr_warmup_steps={min(_recipe_warmup_steps(), cfg.opd_steps // 10)}",
              *cfg.opd_overrides]
    with_teacher = [f"teachers=[{{checkpoint: {teacher}}}]"]
    teacher_eval = out / "teacher_eval.json"
    run_stage([py, "-m", "megatron_opd.cli", "eval", "--config", str(DEMO_RECIPE), "--checkpoint", str(teacher),
               "--output", str(teacher_eval), *common, *with_teacher], out / "teacher_eval.log",
              progress=StageProgress("[demo] teacher held-out eval"), verbose=verbose)
    results = {"teacher_acc": json.loads(teacher_eval.read_text())["eval/accuracy"]}
    # name: (recipe, overrides). GRPO is the RL baseline at the same step budget (no teacher).
    runs = {"opd": (DEMO_RECIPE, ["objective.gopd.lam=1.0", *with_teacher]),
            # ExOPD as the G-OPD paper runs it: the sampled-token reward (the exact KL has no lam)
            "exopd": (DEMO_RECIPE, ["objective.gopd.lam=1.25", "objective.gopd.estimator=sampled", *with_teacher]),
            "grpo": (GRPO_RECIPE, ["teachers=[]"])}
    curves = {}
    for name, (recipe, extra) in runs.items():
        run_dir = out / name
        run_stage([py, "-m", "megatron_opd.cli", "train", "--config", str(recipe),
                   f"train.out_dir={run_dir}", "train.resume=false", *common, *extra], out / f"{name}.log",
                  progress=StageProgress(f"[demo] {name}", cfg.opd_steps, run_dir / "metrics.jsonl"),
                  verbose=verbose)
        from megatron_opd.metrics import read_metrics

        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("eval/accuracy") is not None]
        curves[name] = [(r["step"], r["eval/accuracy"]) for r in rows]
        results.setdefault("student_acc_before", rows[0]["eval/accuracy"])
        results[f"student_acc_after_{name}"] = rows[-1]["eval/accuracy"]
    results["gap_closed_opd"] = gap_closed(results["teacher_acc"], results["student_acc_before"],
                                           results["student_acc_after_opd"])
    results["demo_seconds"] = round(time.time() - t0, 1)
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    plot_demo(curves, results, out / "demo.png")
    print(results_table(results, out), flush=True)
    return results


def results_table(results: dict, out: Path) -> str:
    """The demo's closing report: held-out accuracies, the share of the gap OPD closed, the outputs."""
    rows = [("teacher", "teacher_acc"), ("student before", "student_acc_before"),
            ("student after OPD", "student_acc_after_opd"), ("student after ExOPD (lam 1.25)", "student_acc_after_exopd"),
            ("student after GRPO (no teacher)", "student_acc_after_grpo")]
    gap = results["gap_closed_opd"]
    return "\n".join([
        "[demo] held-out accuracy (avg@k)",
        *(f"  {label:<32} {results[key]:.3f}" for label, key in rows),
        f"  OPD closed {'no gap (the student starts at the teacher)' if gap is None else f'{gap:.0%} of the gap'}"
        f" in {results['demo_seconds'] / 60:.1f} min",
        f"[demo] outputs: {out / 'demo_results.json'}, {out / 'demo.png'}; each stage's log and command line: "
        f"{out}/<stage>.log",
    ])


def gap_closed(teacher: float, before: float, after: float) -> Optional[float]:
    """The fraction of the student-teacher accuracy gap a run closed (README's target for OPD: >= 0.8);
    None when the student starts at or above the teacher (no gap to close)."""
    gap = teacher - before
    return round((after - before) / gap, 4) if gap > 0 else None


def plot_demo(curves: dict, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"student, {name.upper()}")
    ax.axhline(results["teacher_acc"], color="k", ls="--", label="teacher")
    ax.set_xlabel("OPD step")
    ax.set_ylabel("held-out accuracy (avg@k)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("megatron_opd demo: addition, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
