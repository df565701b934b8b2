"""Every GPU generates: one step's rollout with an engine on every rank against one engine per replica
on its leader (the placement before rollout.tensor_parallel_size), same model, same prompts, same seeds.

    .venv/bin/python benchmarks/bench_rollout_placement.py [--prompts 64] [--tokens 128] [--repeats 2]

Two trainer ranks at TP=2 (one replica) under torchrun, gloo. Each rank stands for one GPU: rank r and
its engine are pinned to core r (the rank by `os.sched_setaffinity`, which its engine-core process
inherits; the engine's OpenMP threads by VLLM_CPU_OMP_THREADS_BIND, set by `platform.engine_process_env`
from the engine's devices), so the leader placement generates on one core while the other core's rank
waits, as 28 of 32 GPUs waited in the 30B recipes. The two placements alternate `--repeats` times in one
job and the best time of each is kept. Ends with `name: value` lines, among them
`rollout_tokens_per_s_ratio_vs_leader_engine` (response tokens per second, engine per rank / leader).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = dict(hidden_size=512, num_layers=8, num_attention_heads=8, num_query_groups=4, head_dim=64,
            ffn_hidden_size=1536)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_opd import parallel
    from megatron_opd.config import load_config
    from megatron_opd.data.synthetic import make_samples
    from megatron_opd.rollout.colocated import ColocatedRollout

    rank = int(os.environ["RANK"])
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]})
    torch.set_num_threads(1)
    base = [f"student.checkpoint={args.model}", f"teachers=[{{checkpoint: {args.model}}}]",
            "parallel.tensor_model_parallel_size=2", f"rollout.max_new_tokens={args.tokens}",
            "rollout.max_model_len=256", "rollout.n=1", "rollout.stop=[]"]
    cfg = load_config(REPO / "configs" / "recipes" / "tiny_opd.yaml", base)
    parallel.initialize(cfg.parallel, seed=cfg.train.seed)
    prompts = make_samples("arithmetic", args.prompts, seed=5)
    never_stop = lambda batch, share: [0.0] * len(batch.samples)  # noqa: E731 (rewards are not timed)
    times = {"leader": [], "every": []}
    tokens = {}
    for _ in range(args.repeats):
        for placement in ("leader", "every"):
            overrides = base + (["rollout.engines_per_replica=1"] if placement == "leader" else [])
            rollout = ColocatedRollout(load_config(REPO / "configs" / "recipes" / "tiny_opd.yaml", overrides),
                                       args.model, None, verify=never_stop)
            rollout.generate(prompts[:2], step=0)  # warm-up: the engines' first requests
            dist.barrier()
            t0 = time.perf_counter()
            out = rollout.generate(prompts, step=1)
            dist.barrier()
            times[placement].append(time.perf_counter() - t0)
            tokens[placement] = sum(s.length for s in out.batch.samples)
            rollout.shutdown()
            dist.barrier()
    if rank == 0:
        print(json.dumps({"result": {"times": times, "tokens": tokens,
                                     "same_samples": tokens["leader"] == tokens["every"]}}), flush=True)
    parallel.destroy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(REPO / "tests"))
    from megatron_opd.data.tokenizer import train_tokenizer
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint
    from megatron_opd.models.spec import ModelSpec
    from mopd_testing import last_json, run_ranks

    with tempfile.TemporaryDirectory() as work:
        train_tokenizer(Path(work) / "tok")
        spec = ModelSpec(name="bench-placement", architecture="qwen3", vocab_size=512, rope_theta=10000.0,
                         max_position_embeddings=512, **SPEC)
        model = save_tiny_checkpoint(spec, Path(work) / "model", tokenizer_dir=Path(work) / "tok")
        out = run_ranks(Path(__file__), 2, "--worker", f"--model={model}", f"--prompts={args.prompts}",
                        f"--tokens={args.tokens}", f"--repeats={args.repeats}", timeout=1800,
                        env={"OMP_NUM_THREADS": "1"})
    r = last_json(out, "result")["result"]
    rate = {p: r["tokens"][p] / min(r["times"][p]) for p in ("leader", "every")}
    print(f"{spec.num_parameters() / 1e6:.0f}M params, {args.prompts} prompts x {args.tokens} tokens; "
          f"times (s) {r['times']}; response tokens {r['tokens']}", flush=True)
    lines = {"rollout_tokens_per_s_leader_engine": rate["leader"],
             "rollout_tokens_per_s_engine_per_rank": rate["every"],
             "rollout_tokens_per_s_ratio_vs_leader_engine": rate["every"] / rate["leader"]}
    for k, v in lines.items():
        print(f"{k}: {v:.4f}")


if __name__ == "__main__":
    main()
