"""Worker (torchrun, 2 gloo ranks): TP=2 full-vocabulary / top-k KL and gradients equal TP=1."""

import json

import torch
import torch.distributed as dist

from megatron_opd.vocab_kl import vocab_parallel_kl


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
    print(json.dumps({"rank": rank, **errs}), flush=True)
    bad = {k: v for k, v in errs.items() if not v <= 1e-5}
    assert not bad, bad
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
