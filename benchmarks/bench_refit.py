"""Refit speed: seconds per refit of a Megatron student into a live vLLM engine, and its rate against a
plain copy of the same tensors.

    .venv/bin/python benchmarks/bench_refit.py [--sizes 50m,200m] [--repeats 3] [--subprocess]

One process (TP = 1, in-process engine, fp32). The baseline copies every HF-named tensor of the
model into preallocated buffers of the same shapes (`dst.copy_(src)`): the memory traffic any refit
must do at least once. The refit additionally gathers through the shared mapping (export_hf_weights),
validates the manifest, loads through vLLM's `reload_weights` and resets the prefix cache.
Ends with `name: value` lines; `refit_rate_ratio_vs_copy` is for the largest size. The time spent
inside the engine's load is reported separately (`refit_engine_load_fraction_*`), and the rate of the
export side alone (`refit_export_rate_ratio_vs_copy_*`): on CPU most of a refit is vLLM re-packing
every linear layer for oneDNN inside `reload_weights`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

SIZES = {  # ~parameters with the 384-token demo tokenizer's vocabulary padded to 512
    "50m": dict(hidden_size=512, num_layers=14, num_attention_heads=8, num_query_groups=4, head_dim=64,
                ffn_hidden_size=1536),
    "200m": dict(hidden_size=1024, num_layers=14, num_attention_heads=16, num_query_groups=8, head_dim=64,
                 ffn_hidden_size=3072),
}


def bench(size: str, repeats: int, workdir: str, in_process: bool = True) -> dict:
    import torch

    from megatron_opd import parallel
    from megatron_opd.config import RolloutConfig
    from megatron_opd.data.tokenizer import train_tokenizer
    from megatron_opd.models.builder import build_gpt_model
    from megatron_opd.models.hf_mapping import export_hf_weights, load_hf_into_megatron
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint
    from megatron_opd.models.spec import ModelSpec
    from megatron_opd.rollout.engine import RolloutEngine
    from megatron_opd.rollout.refit import refit

    tok = os.path.join(workdir, "tok")
    if not os.path.isdir(tok):
        train_tokenizer(tok)
    spec = ModelSpec(name=f"bench-{size}", architecture="qwen3", vocab_size=512, rope_theta=10000.0,
                     max_position_embeddings=256, **SIZES[size])
    ckpt = os.path.join(workdir, size)
    if not os.path.isdir(ckpt):
        ckpt = save_tiny_checkpoint(spec, ckpt, tokenizer_dir=tok)
    pcfg = parallel.ParallelConfig()
    parallel.initialize(pcfg)
    model = build_gpt_model(spec, pcfg, role="teacher")
    load_hf_into_megatron(model, spec, ckpt)
    engine = RolloutEngine(RolloutConfig(max_new_tokens=4, max_model_len=128), ckpt, in_process=in_process)
    tensors = [t.clone() for b in export_hf_weights(model, spec) for _, t in b]
    buffers = [torch.empty_like(t) for t in tensors]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    copy_s, refit_s, load_s = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d, s in zip(buffers, tensors):
            d.copy_(s)
        copy_s.append(time.perf_counter() - t0)
        stats = refit(engine, model, spec, bucket_mb=256)
        refit_s.append(stats.seconds)
        load_s.append(stats.load_seconds)
    engine.shutdown()
    parallel.destroy()
    best = min(range(repeats), key=refit_s.__getitem__)
    return {"params": spec.num_parameters(), "bytes": nbytes, "copy_s": min(copy_s), "refit_s": refit_s[best],
            "load_s": load_s[best]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="50m,200m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--subprocess", action="store_true",
                    help="also measure the engine-core subprocess mode used under torchrun (/dev/shm buckets)")
    args = ap.parse_args()
    lines = {}
    with tempfile.TemporaryDirectory() as work:
        for size in args.sizes.split(","):
            r = bench(size, args.repeats, work)
            ratio = r["copy_s"] / r["refit_s"]  # rate(refit) / rate(copy)
            print(f"{size}: {r['params'] / 1e6:.0f}M params, {r['bytes'] / 2**20:.0f} MiB, "
                  f"refit {r['refit_s']:.3f} s ({r['bytes'] / r['refit_s'] / 2**30:.2f} GiB/s), "
                  f"of which in vLLM's load {r['load_s']:.3f} s, copy {r['copy_s']:.3f} s", flush=True)
            lines[f"refit_seconds_{size}"] = r["refit_s"]
            lines[f"refit_engine_load_fraction_{size}"] = r["load_s"] / r["refit_s"]
            # Our side alone (gather + rename + manifest checks), without vLLM's reload_weights.
            lines[f"refit_export_rate_ratio_vs_copy_{size}"] = r["copy_s"] / (r["refit_s"] - r["load_s"])
            lines[f"refit_rate_ratio_vs_copy_{size}"] = ratio
            last = ratio
            if args.subprocess:
                sub = bench(size, args.repeats, work, in_process=False)
                print(f"{size}: engine-core subprocess refit {sub['refit_s']:.3f} s", flush=True)
                lines[f"refit_seconds_{size}_subprocess"] = sub["refit_s"]
                lines[f"refit_subprocess_cost_ratio_{size}"] = sub["refit_s"] / r["refit_s"]
    lines["refit_rate_ratio_vs_copy"] = last
    for k, v in lines.items():
        print(f"{k}: {v:.4f}")


if __name__ == "__main__":
    main()
