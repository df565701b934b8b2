"""Worker (torchrun, 2 gloo ranks): TP=2 full-vocabulary / top-k KL and gradients equal TP=1."""

import json

import torch
import torch.distributed as dist

from megatron_opd.vocab_kl import vocab_parallel_kl, vocab_parallel_kl_and_logprobs


def main():
    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # identical full tensors on every rank
    n, hs, ht, V, Vpad = 13, 8, 12, 45, 48
    h_s, w_s = torch.randn(n, hs), torch.randn(Vpad, hs) * 0.7
    h_t, w_t = torch.randn(n, ht), torch.randn(Vpad, ht) * 0.7
    g = torch.randn(n)
    shard = slice(rank * Vpad // tp, (rank + 1) * Vpad // tp)
    errs = {}
    for direction in ("reverse", "forward"):
        for top_k in (None, 4):
            a1, b1 = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
            kl1 = vocab_parallel_kl(a1, b1, h_t, w_t, None, V, direction, top_k, chunk_size=5)
            ga1, gb1 = torch.autograd.grad((kl1 * g).sum(), [a1, b1])
            a2, b2 = h_s.clone().requires_grad_(), w_s[shard].clone().requires_grad_()
            kl2 = vocab_parallel_kl(a2, b2, h_t, w_t[shard], group, V, direction, top_k, chunk_size=5)
            ga2, gb2 = torch.autograd.grad((kl2 * g).sum(), [a2, b2])
            key = f"{direction}_{top_k or 'full'}"
            errs[f"{key}_kl"] = (kl1 - kl2).abs().max().item()
            errs[f"{key}_grad_hidden"] = (ga1 - ga2).abs().max().item()
            errs[f"{key}_grad_lm_head"] = (gb1[shard] - gb2).abs().max().item()
            # the one-pass KL + sampled-token log-probs (+ entropy) of both models
            target = torch.arange(n) * 7 % V
            outs = []
            for group_, w_s_, w_t_ in ((None, w_s, w_t), (group, w_s[shard], w_t[shard])):
                a, b = h_s.clone().requires_grad_(), w_s_.clone().requires_grad_()
                kl, lp, ent, lp_t = vocab_parallel_kl_and_logprobs(a, b, h_t, w_t_, target, group_, V, direction,
                                                                   top_k, compute_entropy=True, chunk_size=5)
                outs.append((kl, lp, ent, lp_t, *torch.autograd.grad((kl * g + lp + ent * g).sum(), [a, b])))
            (kl1, lp1, e1, t1, ga1, gb1), (kl2, lp2, e2, t2, ga2, gb2) = outs
            for name, x, y in (("kl", kl1, kl2), ("lp", lp1, lp2), ("ent", e1, e2), ("lp_t", t1, t2),
                               ("grad_hidden", ga1, ga2), ("grad_lm_head", gb1[shard], gb2)):
                errs[f"{key}_one_pass_{name}"] = (x - y).abs().max().item()
    print(json.dumps({"rank": rank, **errs}), flush=True)
    bad = {k: v for k, v in errs.items() if not v <= 1e-5}
    assert not bad, bad
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
