"""One-step-off OPD on a dedicated engine rank against colocated engines, on the same 2 ranks: the real
trainer (the tiny recipe on a 3M-parameter Qwen3-style model; same prompts, seeds and steps).

    .venv/bin/python benchmarks/bench_async.py [--steps 6] [--prompts 8] [--tokens 96]

Three runs of `--steps` steps under torchrun, each rank pinned to one core (rank r to core r; an engine's
OpenMP threads follow its rank through `platform.engine_process_env`):
    colocated      DP=2, an engine on each rank: generate, then score and update, then refit, on both cores
    dedicated/s0   1 trainer rank + 1 engine rank, train.max_staleness=0: each waits for the other
    dedicated/s1   the same ranks, train.max_staleness=1: step k+1's batch is generated during step k

Throughput = response tokens trained per second over steps 2..N (step 1 has nothing to overlap with).
Prints each run's per-step phase timeline for one step (trainer phases and, for dedicated, the engine's
generation of the next batch, in seconds from the step's start), then `name: value` lines, among them
`async_step_throughput_ratio_vs_colocated` (dedicated/s1 over colocated).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "recipes" / "tiny_opd.yaml"
SPEC = dict(hidden_size=256, num_layers=4, num_attention_heads=4, num_query_groups=2, head_dim=64,
            ffn_hidden_size=768)
RUNS = {
    "colocated": ["rollout.engines_per_replica=null"],
    "dedicated/s0": ["rollout.placement=dedicated", "rollout.dedicated_ranks=1", "rollout.engines_per_replica=null"],
    "dedicated/s1": ["rollout.placement=dedicated", "rollout.dedicated_ranks=1", "rollout.engines_per_replica=null",
                     "train.max_staleness=1"],
}


def worker(args) -> None:
    import torch

    from megatron_opd import parallel
    from megatron_opd.config import load_config
    from megatron_opd.rollout.dedicated import DedicatedRollout, is_engine_rank, serve_engine
    from megatron_opd.trainer import OPDTrainer

    rank = int(os.environ["RANK"])
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)
    cfg = load_config(RECIPE, args.overrides)
    if is_engine_rank(cfg, parallel.launched_rank(), parallel.launched_world_size()):
        sys.exit(serve_engine(cfg))

    timeline, generated = [], {}
    real_phase, real_receive = OPDTrainer.phase, DedicatedRollout._receive

    @contextlib.contextmanager
    def phase(self, name, timings=None):
        t0 = time.time()
        with real_phase(self, name, timings):
            yield
        timeline.append((self.step, name, t0, time.time()))

    def receive(self, step):
        real_receive(self, step)
        generated[step] = self.ready[step].generated

    OPDTrainer.phase, DedicatedRollout._receive = phase, receive
    trainer = OPDTrainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    if rank == 0:
        print(json.dumps({"result": {"timeline": timeline, "generated": generated}}), flush=True)


def summarise(name: str, out: Path, result: dict, skip: int, samples_per_step: int) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = {r["step"]: r for r in rows if "loss" in r}
    timeline = [t for t in result["timeline"] if t[0] >= skip]
    start, end = min(t[2] for t in timeline), max(t[3] for t in timeline)
    tokens = sum(rows[s + 1]["rollout/response_length"] * samples_per_step for s in sorted({t[0] for t in timeline}))
    return {"name": name, "seconds": end - start, "tokens": tokens, "tokens_per_s": tokens / (end - start),
            "timeline": result["timeline"], "generated": result["generated"]}


def show_step(run: dict, step: int) -> None:
    phases = [t for t in run["timeline"] if t[0] == step]
    t0 = min(t[2] for t in phases)
    line = ", ".join(f"{name} {a - t0:.2f}-{b - t0:.2f}" for _, name, a, b in phases)
    print(f"  {run['name']:<13} step {step + 1}: {line}")
    gen = run["generated"].get(str(step + 1))
    if gen is not None:
        print(f"  {'':<13} engine generating step {step + 2}'s batch: {gen[0] - t0:.2f}-{gen[1] - t0:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(REPO / "tests"))
    from megatron_opd.data.tokenizer import train_tokenizer
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint
    from megatron_opd.models.spec import ModelSpec
    from mopd_testing import last_json, run_ranks

    runs = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        train_tokenizer(work / "tok")
        spec = ModelSpec(name="bench-async", architecture="qwen3", vocab_size=512, rope_theta=10000.0,
                         max_position_embeddings=512, **SPEC)
        student = save_tiny_checkpoint(spec, work / "student", tokenizer_dir=work / "tok", seed=0)
        teacher = save_tiny_checkpoint(spec, work / "teacher", tokenizer_dir=work / "tok", seed=1)
        for name, extra in RUNS.items():
            out = work / name.replace("/", "_")
            common = [f"student.checkpoint={student}", f"teachers=[{{checkpoint: {teacher}}}]",
                      f"train.out_dir={out}", f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts}",
                      "train.save_every=0", "train.eval_every=0", "rollout.n=2", f"rollout.max_new_tokens={args.tokens}",
                      f"rollout.max_model_len={args.tokens + 96}", "rollout.stop=[]", "train.micro_batch_size=8"]
            output = run_ranks(Path(__file__), 2, "--worker", *common, *extra, timeout=1800,
                               env={"OMP_NUM_THREADS": "1"})
            runs.append(summarise(name, out, last_json(output, "result")["result"], skip=1,
                                  samples_per_step=args.prompts * 2))
    print(f"{spec.num_parameters() / 1e6:.0f}M params, {args.steps} steps x {args.prompts} prompts x 2 samples x "
          f"<= {args.tokens} tokens; timed steps 2..{args.steps}")
    for run in runs:
        show_step(run, 2)
    base = runs[0]["tokens_per_s"]
    for run in runs:
        key = run["name"].replace("/", "_")
        print(f"tokens_per_s_{key}: {run['tokens_per_s']:.2f}")
    print(f"sync_dedicated_throughput_ratio_vs_colocated: {runs[1]['tokens_per_s'] / base:.4f}")
    print(f"async_step_throughput_ratio_vs_colocated: {runs[2]['tokens_per_s'] / base:.4f}")


if __name__ == "__main__":
    main()
