"""What the CPU compatibility layer costs a training forward/backward (megatron_opd/platform/cpu.py).

    .venv/bin/python benchmarks/bench_cpu_layer.py [--student runs/bench/models/student] [--repeats 6]

Before issue 13 the whole pipeline schedule ran inside the layer's TorchFunctionMode, so every op of
every forward and backward passed through a Python hook; now only the schedules' one `torch.zeros(...,
device="cuda")` is redirected. Both are timed in one process on the same model and micro-batches
(Megatron GPTModel + DDP, 4 micro-batches of 4 x 160 tokens by default), alternating, and the script
ends with `cpu_layer_fwd_bwd_time_ratio_mode_vs_now: <x>` (> 1: the old wrapping was slower).
Run it under torchrun with 1 rank (done for you when launched directly).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    from megatron.core.pipeline_parallel import schedules

    from megatron_opd import parallel
    from megatron_opd.models.builder import build_gpt_model
    from megatron_opd.batching import ForwardBatch
    from megatron_opd.models.forward import prepare_for_training, run_micro_batches
    from megatron_opd.models.hf_mapping import HFCheckpoint, load_hf_into_megatron
    from megatron_opd.models.student import wrap_ddp
    from megatron_opd.platform import cpu

    pcfg = parallel.ParallelConfig(1, 1)
    parallel.initialize(pcfg)
    ckpt = HFCheckpoint(args.student)
    spec = ckpt.spec()
    model = build_gpt_model(spec, pcfg, role="student")
    load_hf_into_megatron(model, spec, ckpt)
    model = wrap_ddp(model)
    prepare_for_training(model)
    torch.manual_seed(0)
    micro = [ForwardBatch(input_ids=torch.randint(3, 300, (args.rows, args.tokens))) for _ in range(args.micro)]

    def loss_fn(mb, logits):
        loss = logits.float().pow(2).mean() * 1e-3
        return loss, {}

    now = schedules.forward_backward_no_pipelining
    wrapped = cpu._wrap_in_mode(now)  # the pre-issue-13 wrapping

    def timed(fn) -> float:
        schedules.forward_backward_no_pipelining = fn
        model.zero_grad_buffer()
        t = time.perf_counter()
        run_micro_batches(model, micro, loss_fn, forward_only=False)
        seconds = time.perf_counter() - t
        schedules.forward_backward_no_pipelining = now
        return seconds

    timed(now), timed(wrapped)  # warm-up
    t_now, t_mode = [], []
    for _ in range(args.repeats):
        t_mode.append(timed(wrapped))
        t_now.append(timed(now))
    best_now, best_mode = min(t_now), min(t_mode)
    print(f"fwd+bwd, {args.micro} micro-batches of {args.rows} x {args.tokens} tokens, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters: "
          f"schedule inside the mode {best_mode:.3f} s, now {best_now:.3f} s (best of {args.repeats})")
    print(f"cpu_layer_fwd_bwd_time_ratio_mode_vs_now: {best_mode / best_now:.3f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default=str(REPO / "runs/bench/models/student"),
                    help="an HF checkpoint (benchmarks/bench_opd_step_vs_trl.py --size realistic builds this one)")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
           "--worker", *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    sys.exit(subprocess.run(cmd, env=env, cwd=str(REPO)).returncode)


if __name__ == "__main__":
    main()
