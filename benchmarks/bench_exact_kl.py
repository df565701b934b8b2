"""The exact KL's LM-head work in one step: one pass over both heads against separate passes.

    .venv/bin/python benchmarks/bench_exact_kl.py                      # 2048 tokens, V = 32,768, H = 512
    .venv/bin/python benchmarks/bench_exact_kl.py --tokens 4096 --vocab 65536 --hidden 1024 --dtype bfloat16

What an exact-KL step needs from the two LM heads at the response positions: the KL (forward and
backward), the student's log p(sampled token) (the TIS weights, the gap to the engine, an optional KL-
to-reference term) and the teacher's (its reward metrics). Measured on the same inputs, alternating,
best of --repeats:
- separate (before): the teacher's fused log-probs in scoring, the student's fused log-probs in the
  update, then `vocab_parallel_kl`, backward through both (teacher head 3x, student head 4x per token);
- one pass: `vocab_parallel_kl_and_logprobs`, forward and backward (each head 2x per token).
One process, TP = 1 (the per-rank work of any TP: the collectives are O(tokens)).
Ends with `name: value` lines, among them `exact_kl_step_time_ratio_vs_separate_passes` (< 1: faster).
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from megatron_opd.logprobs import fused_lm_head_token_logprobs
    from megatron_opd.vocab_kl import vocab_parallel_kl, vocab_parallel_kl_and_logprobs

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    n, v, h = args.tokens, args.vocab, args.hidden
    h_s, w_s = torch.randn(n, h).mul_(0.5).to(dtype), torch.randn(v, h).mul_(0.05).to(dtype)
    h_t, w_t = torch.randn(n, h).mul_(0.5).to(dtype), torch.randn(v, h).mul_(0.05).to(dtype)
    target = torch.randint(0, v, (n,))

    def separate():
        a, b = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        with torch.no_grad():
            fused_lm_head_token_logprobs(h_t, w_t, target)  # scoring: the teacher's log-probs
        lp, _ = fused_lm_head_token_logprobs(a, b, target)
        kl = vocab_parallel_kl(a, b, h_t, w_t)
        (kl.sum() + 0.0 * lp.sum()).backward()  # the log-prob's graph is part of the step (kl_coef, entropy)
        return kl.detach()

    def one_pass():
        a, b = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        kl, lp, _, _ = vocab_parallel_kl_and_logprobs(a, b, h_t, w_t, target)
        (kl.sum() + 0.0 * lp.sum()).backward()
        return kl.detach()

    torch.testing.assert_close(separate(), one_pass())  # the same KL (and warm-up)
    best = {"separate": float("inf"), "one_pass": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("separate", separate), ("one_pass", one_pass)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    out = {"exact_kl_separate_s": best["separate"], "exact_kl_one_pass_s": best["one_pass"],
           "exact_kl_step_time_ratio_vs_separate_passes": best["one_pass"] / best["separate"]}
    print(f"# {n} tokens x V {v} x H {h}, {args.dtype}, torch threads {torch.get_num_threads()}")
    for k, val in out.items():
        print(f"{k}: {val:.4f}")
    return out


if __name__ == "__main__":
    main()
