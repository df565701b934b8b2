"""One OPD step (rollout, scoring, update, refit) of megatron_opd against TRL's GKDTrainer in on-policy
reverse-KL mode (lmbda = 1, beta = 1), same student/teacher checkpoints and prompts, on this CPU.

    pip install trl==1.16.0 accelerate==1.15.0        # for this benchmark only (extra "bench")
    .venv/bin/python benchmarks/bench_opd_step_vs_trl.py --size realistic
    .venv/bin/python benchmarks/bench_opd_step_vs_trl.py --student <hf_dir> --teacher <hf_dir>

`--size realistic` builds (once, into runs/bench/models) a 32M-parameter Qwen3 student and a 3x larger
96M teacher on the project's tokenizer, and runs 64 prompts x up to 128 new tokens per step. The models
are random; the student's end-of-sequence row is scaled (x40) so that its responses end at varied
lengths, as trained models' do (the mean length is printed). Without
`--size`, the given checkpoints are used (`make demo` leaves suitable ones in runs/demo/cache).

Both sides sample `--batch` responses of at most `--max-new-tokens` tokens per step from the same
student at T = 1, score them with the same teacher and take one AdamW step; the first `--warmup` steps
are excluded. The ratio is of sampled response tokens per second, counted the same way on both sides:
the response tokens each step actually sampled (megatron_opd's from its response mask, TRL's from the
completion labels of the batches its trainer generated; a step without a count is an error, not a
default). Prints megatron_opd's per-phase breakdown and ends with
`opd_step_tokens_per_s_ratio_vs_trl: <x>`.

`--precision bf16` runs both sides in bf16 as well, in the same invocation: megatron_opd with
`precision.params_dtype=bfloat16 rollout.dtype=bfloat16` (megatron's mixed precision: bf16 weights and
GEMMs, fp32 main parameters, gradients and softmax reductions), TRL's GKDTrainer with `bf16=True` (CPU
autocast of fp32 models), and adds `opd_step_tokens_per_s_ratio_vs_trl_bf16` and
`opd_step_bf16_over_fp32_ratio` (our bf16 step's rate over our fp32 step's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_realistic_models(root: Path) -> tuple[str, str]:
    """A ~32M student and a ~96M teacher (Qwen3 layout, random weights, the project's tokenizer)."""
    import torch

    from megatron_opd.data.tokenizer import train_tokenizer
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint
    from megatron_opd.models.spec import ModelSpec

    student, teacher = root / "student", root / "teacher"
    if (student / "config.json").exists() and (teacher / "config.json").exists():
        return str(student), str(teacher)
    tok = root / "tokenizer"
    train_tokenizer(tok)
    base = ModelSpec.from_yaml(REPO / "configs/models/tiny_qwen3.yaml").__dict__
    shapes = {"student": dict(hidden_size=512, num_layers=10, num_attention_heads=8, num_query_groups=4,
                              head_dim=64, ffn_hidden_size=1536),
              "teacher": dict(hidden_size=768, num_layers=13, num_attention_heads=12, num_query_groups=4,
                              head_dim=64, ffn_hidden_size=2304)}
    for seed, (name, shape) in enumerate(shapes.items()):
        spec = ModelSpec(**{**base, **shape, "name": f"bench-{name}"})
        save_tiny_checkpoint(spec, root / name, seed=seed, tokenizer_dir=tok, init_std=0.02)
    # Varied response lengths: a larger end-of-sequence row makes EOS likely at some positions.
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(str(student)).eos_token_id
    path = student / "model.safetensors"
    weights = load_file(str(path))
    with torch.no_grad():
        weights["lm_head.weight"][eos] *= 40.0
    save_file(weights, str(path), metadata={"format": "pt"})
    return str(student), str(teacher)


PHASES = ("rollout", "sleep", "score", "update", "wake", "refit")


def run_ours(student, teacher, batch, max_new, steps, warmup, *extra) -> tuple[float, dict]:
    out = tempfile.mkdtemp(prefix="bench_opd_")
    cmd = [sys.executable, "-m", "megatron_opd.cli", "train", "--config", str(REPO / "configs/recipes/demo.yaml"),
           f"student.checkpoint={student}", f"teachers=[{{checkpoint: {teacher}}}]", f"train.out_dir={out}",
           "train.resume=false", f"train.steps={steps}", f"train.prompts_per_step={batch}", "rollout.n=1",
           f"rollout.max_new_tokens={max_new}", "train.eval_every=0", "train.save_every=0",
           "data.synthetic_eval_size=2", "train.eval_samples=1", "objective.gopd.tis_cap=null",
           "optim.lr_warmup_steps=0", *extra]
    subprocess.run(cmd, check=True, capture_output=True, cwd=str(REPO))
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > warmup and "time/step" in r]
    tokens = sum(r["throughput/tokens_per_s"] * r["time/step"] for r in rows)
    seconds = sum(r["time/step"] for r in rows)
    breakdown = {p: sum(r.get(f"time/{p}", 0.0) for r in rows) / len(rows) for p in PHASES}
    breakdown["step"] = seconds / len(rows)
    breakdown["response_tokens"] = tokens / len(rows)
    breakdown["mean_length"] = sum(r["rollout/response_length"] for r in rows) / len(rows)
    return tokens / seconds, breakdown


def run_trl(student, teacher, batch, max_new, steps, warmup, bf16: bool = False) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from megatron_opd.data.synthetic import ArithmeticTask

    tok = AutoTokenizer.from_pretrained(student)
    task = ArithmeticTask(digits=2)
    data = [{"messages": [{"role": "user", "content": s["prompt"]},
                          {"role": "assistant", "content": task.solution(s)}]}
            for s in task.samples(batch * (steps + 1), seed=1)]
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    cfg = GKDConfig(output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=batch,
                    max_steps=steps, lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=max_new,
                    learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to=[],
                    use_cpu=True, bf16=bf16, dataloader_num_workers=0, gradient_accumulation_steps=1,
                    # TRL's default (True) also turns off the KV cache in its HF `generate`, which then
                    # re-runs every prefix (measured: > 8 min for one 64 x 128 rollout here); we do not
                    # checkpoint either, so TRL gets its fast path.
                    gradient_checkpointing=False)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                         teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32),
                         args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok,
                         callbacks=[Clock()])
    real_generate = trainer.generate_on_policy_outputs

    def counting(*a, **k):  # count the response tokens TRL sampled (non-pad after the prompt)
        out = real_generate(*a, **k)
        new_ids, _, labels = out if isinstance(out, tuple) else (out, None, None)
        if labels is not None:
            tokens.append(int((labels != -100).sum()))
        return out

    trainer.generate_on_policy_outputs = counting
    trainer.train()
    if len(tokens) != len(times):
        raise RuntimeError(f"TRL ran {len(times)} steps but {len(tokens)} generations were counted: the "
                           "benchmark's token count hook no longer matches GKDTrainer; fix it, do not guess")
    print(f"trl GKDTrainer{' (bf16)' if bf16 else ''}: {sum(times[warmup:]) / len(times[warmup:]):.2f} s and "
          f"{sum(tokens[warmup:]) / len(tokens[warmup:]):.0f} response tokens per step", flush=True)
    return sum(tokens[warmup:]) / sum(times[warmup:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["realistic"], default=None,
                    help="build the 32M student / 96M teacher pair and use 64 prompts x 128 new tokens")
    ap.add_argument("--student", default=str(REPO / "runs/demo/cache/student_base"))
    ap.add_argument("--teacher", default=str(REPO / "runs/demo/cache/teacher"))
    ap.add_argument("--batch", type=int, default=None, help="prompts per step (32; realistic: 64)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="(24; realistic: 128)")
    ap.add_argument("--steps", type=int, default=None, help="(8; realistic: 4)")
    ap.add_argument("--warmup", type=int, default=None, help="steps excluded (2; realistic: 1)")
    ap.add_argument("--variants", default="new,logits-fixed",
                    help="megatron_opd settings to run: new (defaults: fused log-probs, token budget) and/or "
                         "logits-fixed (materialised logits, fixed 4-row micro-batches: the previous loop)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: also run the default variant and TRL in bf16 (same invocation, same models)")
    args = ap.parse_args()
    realistic = args.size == "realistic"
    defaults = dict(batch=(64 if realistic else 32), max_new_tokens=(128 if realistic else 24),
                    steps=(4 if realistic else 8), warmup=(1 if realistic else 2))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if realistic:
        args.student, args.teacher = build_realistic_models(REPO / "runs/bench/models")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    run = (args.batch, args.max_new_tokens, args.steps, args.warmup)
    variants = {
        "new": [f"rollout.max_model_len={256 if realistic else 96}", "train.logprob_impl=fused", "train.micro_batch_size=64",
                f"train.max_tokens_per_micro_batch={4096 if realistic else 1024}"],
        "logits-fixed": [f"rollout.max_model_len={256 if realistic else 96}", "train.logprob_impl=logits", "train.micro_batch_size=4"],
    }
    names = args.variants.split(",")
    if args.precision == "bf16":
        variants["new-bf16"] = variants["new"] + ["precision.params_dtype=bfloat16", "rollout.dtype=bfloat16"]
        names.append("new-bf16")
    results = {}
    for name in names:
        rate, breakdown = run_ours(args.student, args.teacher, *run, *variants[name])
        results[name] = rate
        print(f"megatron_opd [{name}]: {rate:.1f} response tokens/s; per step: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in breakdown.items() if k not in ("response_tokens", "mean_length"))
              + f"; {breakdown['response_tokens']:.0f} response tokens (mean length "
              f"{breakdown['mean_length']:.1f})", flush=True)
    ours = results.get("new", next(iter(results.values())))
    theirs = run_trl(args.student, args.teacher, *run)
    print(f"trl GKDTrainer (lmbda=1, beta=1): {theirs:.1f} response tokens/s", flush=True)
    print(f"opd_step_tokens_per_s_megatron_opd: {ours:.2f}")
    print(f"opd_step_tokens_per_s_trl: {theirs:.2f}")
    if "logits-fixed" in results and "new" in results:
        print(f"opd_step_tokens_per_s_ratio_vs_previous_loop: {results['new'] / results['logits-fixed']:.3f}")
    print(f"opd_step_tokens_per_s_ratio_vs_trl: {ours / theirs:.3f}")
    if args.precision == "bf16":
        theirs_bf16 = run_trl(args.student, args.teacher, *run, bf16=True)
        print(f"trl GKDTrainer bf16: {theirs_bf16:.1f} response tokens/s", flush=True)
        print(f"opd_step_tokens_per_s_megatron_opd_bf16: {results['new-bf16']:.2f}")
        print(f"opd_step_tokens_per_s_trl_bf16: {theirs_bf16:.2f}")
        print(f"opd_step_bf16_over_fp32_ratio: {results['new-bf16'] / results['new']:.3f}")
        print(f"trl_bf16_over_fp32_ratio: {theirs_bf16 / theirs:.3f}")
        print(f"opd_step_tokens_per_s_ratio_vs_trl_bf16: {results['new-bf16'] / theirs_bf16:.3f}")


if __name__ == "__main__":
    main()
