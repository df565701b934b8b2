"""One OPD step (rollout, scoring, update, refit) of megatron_opd against TRL's GKDTrainer in on-policy
reverse-KL mode (lmbda = 1, beta = 1), same student/teacher checkpoints and prompts, on this CPU.

    pip install trl==1.16.0 accelerate==1.15.0        # for this benchmark only (extra "bench")
    .venv/bin/python benchmarks/bench_opd_step_vs_trl.py --student <hf_dir> --teacher <hf_dir>

(`make demo` leaves suitable checkpoints in runs/demo/cache/{student_base,teacher}.) Both sides sample
`--batch` responses of at most `--max-new-tokens` tokens per step from the same student at T = 1, score
them with the same teacher and take one AdamW step; the first `--warmup` steps are excluded. The ratio
is of sampled response tokens per second (megatron_opd's counted exactly; TRL's counted from the
completions its trainer generated). Ends with `opd_step_tokens_per_s_ratio_vs_trl: <x>`.
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


def run_ours(student, teacher, batch, max_new, steps, warmup) -> float:
    out = tempfile.mkdtemp(prefix="bench_opd_")
    cmd = [sys.executable, "-m", "megatron_opd.cli", "train", "--config", str(REPO / "configs/recipes/demo.yaml"),
           f"student.checkpoint={student}", f"teachers=[{{checkpoint: {teacher}}}]", f"train.out_dir={out}",
           "train.resume=false", f"train.steps={steps}", f"train.prompts_per_step={batch}", "rollout.n=1",
           f"rollout.max_new_tokens={max_new}", "train.eval_every=0", "train.save_every=0",
           "data.synthetic_eval_size=2", "train.eval_samples=1", "objective.tis_cap=null"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=str(REPO))
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > warmup and "time/step" in r]
    tokens = sum(r["throughput/tokens_per_s"] * r["time/step"] for r in rows)
    return tokens / sum(r["time/step"] for r in rows)


def run_trl(student, teacher, batch, max_new, steps, warmup) -> float:
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
                    use_cpu=True, bf16=False, dataloader_num_workers=0, gradient_accumulation_steps=1)
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
    t = sum(times[warmup:])
    n = sum(tokens[warmup:]) if len(tokens) >= len(times) else batch * max_new * (len(times) - warmup)
    return n / t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default=str(REPO / "runs/demo/cache/student_base"))
    ap.add_argument("--teacher", default=str(REPO / "runs/demo/cache/teacher"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    ours = run_ours(args.student, args.teacher, args.batch, args.max_new_tokens, args.steps, args.warmup)
    print(f"megatron_opd: {ours:.1f} response tokens/s", flush=True)
    theirs = run_trl(args.student, args.teacher, args.batch, args.max_new_tokens, args.steps, args.warmup)
    print(f"trl GKDTrainer (lmbda=1, beta=1): {theirs:.1f} response tokens/s", flush=True)
    print(f"opd_step_tokens_per_s_megatron_opd: {ours:.2f}")
    print(f"opd_step_tokens_per_s_trl: {theirs:.2f}")
    print(f"opd_step_tokens_per_s_ratio_vs_trl: {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
