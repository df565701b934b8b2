"""Peak memory and time of token log-prob computation: naive vs chunked vs fused LM head.

    .venv/bin/python benchmarks/bench_logprobs.py            # large (8192 x 151,936 x 2,560) + small
    .venv/bin/python benchmarks/bench_logprobs.py --quick    # small shapes only
    .venv/bin/python benchmarks/bench_logprobs.py --chunk-sweep 2048,151936,2560   # chunk-size choices

Each variant runs in a fresh subprocess (forward only, teacher-style, fp32), so its peak RSS
(ru_maxrss) is its own; the reported peak is that minus the RSS after allocating the inputs. Baselines:
- memory: naive `log_softmax(hidden @ W.T).gather(...)`;
- time: a bare LM-head matmul `hidden @ W.T` of the same shape (the unavoidable cost).
TP = 2 is simulated in one process by giving the variant the V/2 weight shard (the per-rank work and
memory; the all-reduces are O(tokens) and are timed in tests/workers/logprobs_tp.py, not here).
Ends with `name: value` lines.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {"large": (8192, 151_936, 2560), "small": (1024, 32_000, 512)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_variant(variant: str, tokens: int, vocab: int, hidden: int, tp: int, repeats: int) -> dict:
    import torch

    from megatron_opd.logprobs import fused_lm_head_token_logprobs, vocab_parallel_token_logprobs

    torch.manual_seed(0)
    local_vocab = vocab // tp
    h = torch.randn(tokens, hidden).mul_(0.05)  # in place: no temporary raises the RSS baseline
    w = torch.randn(local_vocab, hidden).mul_(0.05)
    target = torch.randint(0, local_vocab, (tokens,))
    base = _rss_mb()

    def once():
        with torch.no_grad():
            if variant == "matmul":
                return h @ w.t()
            if variant == "naive":
                return torch.log_softmax(h @ w.t(), -1).gather(-1, target[:, None])
            if variant == "chunked":
                return vocab_parallel_token_logprobs(h @ w.t(), target)[0]  # chunk_size='auto'
            if variant == "fused":
                return fused_lm_head_token_logprobs(h, w, target)[0]  # chunk_size='auto'
            raise ValueError(variant)

    once()  # warm-up (allocator, threads)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t0)
        del out
    return {"seconds": min(times), "peak_mb": _rss_mb() - base}


def measure(variant, shape, tp, repeats) -> dict:
    tokens, vocab, hidden = SHAPES[shape]
    cmd = [sys.executable, __file__, "--child", variant, str(tokens), str(vocab), str(hidden), str(tp),
           str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def chunk_sweep(tokens: int, vocab: int, hidden: int, chunks=(16, 64, 256, 512, 1024), repeats: int = 2):
    """The measurements behind chunk_size="auto" (megatron_opd/logprobs.py), in this process:
    from-logits time vs the naive log_softmax + gather, fused time vs the bare matmul, per chunk size."""
    import torch

    from megatron_opd.logprobs import fused_lm_head_token_logprobs, vocab_parallel_token_logprobs

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden).mul_(0.05)
    w = torch.randn(vocab, hidden).mul_(0.05)
    target = torch.randint(0, vocab, (tokens,))

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def from_logits(lines):  # its own scope: the full logits are freed before the fused timings
        logits = h @ w.t()
        naive = best(lambda: torch.log_softmax(logits, -1).gather(-1, target[:, None]))
        for c in chunks:
            t = best(lambda: vocab_parallel_token_logprobs(logits, target, chunk_size=c))
            lines[f"from_logits_chunk{c}_{c * vocab * 4 / 2**20:.0f}MiB_time_ratio_vs_naive"] = t / naive

    lines = {}
    with torch.no_grad():
        from_logits(lines)
        matmul = best(lambda: h @ w.t())
        for c in chunks:
            t = best(lambda: fused_lm_head_token_logprobs(h, w, target, chunk_size=c))
            lines[f"fused_chunk{c}_time_ratio_vs_matmul"] = t / matmul
        t = best(lambda: fused_lm_head_token_logprobs(h, w, target))
        lines["fused_auto_time_ratio_vs_matmul"] = t / matmul
    for k, v in lines.items():
        print(f"{k}: {v:.4f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--large-tp", default="1,2", help="TP sizes for the large shape (each costs minutes)")
    ap.add_argument("--child", nargs=6)
    ap.add_argument("--chunk-sweep", metavar="TOKENS,VOCAB,HIDDEN",
                    help="time both paths over chunk sizes at one shape (the basis of chunk_size='auto')")
    args = ap.parse_args()
    if args.chunk_sweep:
        chunk_sweep(*(int(x) for x in args.chunk_sweep.split(",")))
        return
    if args.child:
        v, t, V, H, tp, r = args.child
        print(json.dumps(run_variant(v, int(t), int(V), int(H), int(tp), int(r))))
        return
    shapes = ["small"] if args.quick else ["small", "large"]
    results = {}
    tps = {"small": (1, 2), "large": tuple(int(t) for t in args.large_tp.split(","))}
    for shape in shapes:
        for tp in tps[shape]:
            for variant in ("matmul", "naive", "chunked", "fused"):
                r = measure(variant, shape, tp, args.repeats)
                results[(shape, tp, variant)] = r
                print(f"{shape:5s} tp={tp} {variant:8s} {r['seconds']:8.3f} s  peak {r['peak_mb']:9.1f} MB",
                      flush=True)
    lines = {}
    for shape in shapes:
        for tp in tps[shape]:
            g = lambda v: results[(shape, tp, v)]  # noqa: E731
            for v in ("chunked", "fused"):
                lines[f"{shape}_tp{tp}_{v}_peak_mem_ratio_vs_naive"] = g(v)["peak_mb"] / max(g("naive")["peak_mb"], 1e-9)
                lines[f"{shape}_tp{tp}_{v}_time_ratio_vs_matmul"] = g(v)["seconds"] / g("matmul")["seconds"]
    key = "large" if "large" in shapes else "small"
    lines["logprob_peak_mem_ratio_vs_naive"] = lines[f"{key}_tp1_fused_peak_mem_ratio_vs_naive"]
    lines["logprob_time_ratio_vs_matmul"] = lines[f"{key}_tp1_fused_time_ratio_vs_matmul"]
    lines["logprob_chunked_time_ratio_vs_matmul"] = lines[f"{key}_tp1_chunked_time_ratio_vs_matmul"]
    for k, v in lines.items():
        print(f"{k}: {v:.4f}")


if __name__ == "__main__":
    main()
