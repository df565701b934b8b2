"""Peak memory of one OPD training step (score + update) at long responses and a Qwen3-size vocabulary:
the fused response-only LM head with token-budget micro-batches against the previous loop's path
(megatron's materialised [b, s, V/tp] logits, fixed micro-batches), on this CPU.

    .venv/bin/python benchmarks/bench_step_memory.py [--response-tokens 4096] [--vocab 151936]

Student and teacher: Qwen3 layout, hidden 64, 2 layers, random weights (so the LM head dominates, as
in a real step at 152k vocabulary). 4 prompts x 1 response of exactly `--response-tokens` tokens, made
without an engine; each variant runs in a fresh process (torchrun, 1 rank) through the trainer's own
micro_batches / score / update. The peak is the resident set sampled every 2 ms during the step, minus
the resident set just before it (the models, optimizer and batch are already in memory). Ends with
`step_peak_mem_ratio_vs_logits_path: <x>` (new step's peak / previous step's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "new": ["train.logprob_impl=fused", "train.micro_batch_size=4"],  # + a token budget (below)
    "logits": ["train.logprob_impl=logits", "train.micro_batch_size=1"],
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    import torch

    from megatron_opd import trainer as trainer_mod
    from megatron_opd.config import load_config
    from megatron_opd.rollout.engine import RolloutBatch, RolloutSample

    class NoEngine:
        def sleep(self, *a): pass
        def wake_up(self, *a): pass
        def shutdown(self): pass

    def generate(self, samples, first_index, step=0):
        batch = RolloutBatch()
        g = torch.Generator().manual_seed(first_index)
        for j in range(len(samples)):
            ids = torch.randint(3, 300, (16 + args.response_tokens,), generator=g).tolist()
            batch.samples.append(RolloutSample(prompt_index=j, prompt_ids=ids[:16], response_ids=ids[16:],
                                               response_logprobs=[-1.0] * args.response_tokens,
                                               finish_reason="length", text=""))
        return batch

    from megatron_opd.rollout import colocated

    colocated.build_engine = lambda *a, **k: NoEngine()
    colocated.ColocatedRollout.sample = generate
    length = 16 + args.response_tokens
    extra = VARIANTS[args.worker] + ([f"train.max_tokens_per_micro_batch={length}"] if args.worker == "new" else [])
    cfg = load_config(REPO / "configs/recipes/demo.yaml", [
        f"student.checkpoint={args.models}/student", f"teachers=[{{checkpoint: {args.models}/teacher}}]",
        f"train.out_dir={args.out}", "train.prompts_per_step=4", "rollout.n=1",
        f"rollout.max_model_len={length}", f"rollout.max_new_tokens={args.response_tokens}",
        # the sampled-token estimator: the path both variants can run (the exact KL needs the fused head)
        "objective.gopd.estimator=sampled", *extra])
    tr = trainer_mod.OPDTrainer(cfg)
    tr.setup()
    try:
        batch, _ = tr.rollout()
        base, peak, done = rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        micro = tr.micro_batches(batch)
        micro, _ = tr.score(micro)
        metrics = tr.update(micro)
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
        print(json.dumps({"step_memory": {"peak_over_base": max(peak[0] - base, 0), "base": base,
                                          "seconds": seconds, "loss": metrics["loss"]}}), flush=True)
    finally:
        tr.cleanup()


def build_models(root: Path, vocab: int) -> Path:
    from megatron_opd.data.tokenizer import train_tokenizer
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint
    from megatron_opd.models.spec import ModelSpec

    if (root / "teacher" / "config.json").exists():
        return root
    train_tokenizer(root / "tokenizer")
    base = ModelSpec.from_yaml(REPO / "configs/models/tiny_qwen3.yaml").__dict__
    spec = ModelSpec(**{**base, "name": "bench-vocab", "vocab_size": vocab, "num_layers": 2,
                        "max_position_embeddings": 8192})
    for seed, name in enumerate(("student", "teacher")):
        save_tiny_checkpoint(spec, root / name, seed=seed, tokenizer_dir=root / "tokenizer")
    return root


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--response-tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--worker", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    models = build_models(REPO / f"runs/bench/vocab{args.vocab}", args.vocab)
    results = {}
    for name in ("logits", "new"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
               "--worker", name, "--models", str(models), "--out", tempfile.mkdtemp(prefix="bench_mem_"),
               "--response-tokens", str(args.response_tokens), "--vocab", str(args.vocab)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        start = proc.stdout.rfind('{"step_memory"')
        results[name] = json.JSONDecoder().raw_decode(proc.stdout, start)[0]["step_memory"]
        r = results[name]
        print(f"{name}: step peak {r['peak_over_base'] / 2**20:.0f} MiB over {r['base'] / 2**20:.0f} MiB "
              f"resident before it, {r['seconds']:.1f} s, loss {r['loss']:.6f}", flush=True)
    ratio = results["new"]["peak_over_base"] / max(results["logits"]["peak_over_base"], 1)
    print(f"step_time_ratio_vs_logits_path: {results['new']['seconds'] / results['logits']['seconds']:.3f}")
    print(f"step_peak_mem_ratio_vs_logits_path: {ratio:.3f}")


if __name__ == "__main__":
    main()
