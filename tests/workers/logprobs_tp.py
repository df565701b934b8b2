"""Worker (torchrun, 2 gloo ranks): TP=2 log-probs, entropies and gradients equal the TP=1 result."""

import json

import torch
import torch.distributed as dist

from megatron_opd.logprobs import fused_lm_head_token_logprobs, vocab_parallel_token_logprobs


def main():
    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # identical full tensors on every rank
    s, b, V, Vpad, H = 7, 3, 90, 128, 16
    logits = torch.randn(s, b, Vpad) * 3
    target = torch.randint(0, V, (s, b))
    g_lp, g_ent = torch.randn(s, b), torch.randn(s, b)
    hidden = torch.randn(s, b, H)
    weight = torch.randn(Vpad, H) * 0.5

    # TP=1 dense reference
    full = logits.clone().requires_grad_()
    lp1, ent1 = vocab_parallel_token_logprobs(full, target, None, V, compute_entropy=True, chunk_size=5)
    (grad1,) = torch.autograd.grad((lp1 * g_lp + ent1 * g_ent).sum(), full)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    flp1, fent1 = fused_lm_head_token_logprobs(h1, w1, target, None, V, True, chunk_size=4)
    gh1, gw1 = torch.autograd.grad((flp1 * g_lp + fent1 * g_ent).sum(), [h1, w1])

    # TP=2: each rank holds only its vocabulary slice
    shard = slice(rank * Vpad // tp, (rank + 1) * Vpad // tp)
    local = logits[..., shard].clone().requires_grad_()
    lp2, ent2 = vocab_parallel_token_logprobs(local, target, group, V, compute_entropy=True, chunk_size=5)
    (grad2,) = torch.autograd.grad((lp2 * g_lp + ent2 * g_ent).sum(), local)
    h2, w2 = hidden.clone().requires_grad_(), weight[shard].clone().requires_grad_()
    flp2, fent2 = fused_lm_head_token_logprobs(h2, w2, target, group, V, True, chunk_size=4)
    gh2, gw2 = torch.autograd.grad((flp2 * g_lp + fent2 * g_ent).sum(), [h2, w2])

    errs = {
        "logprobs": (lp1 - lp2).abs().max().item(),
        "entropy": (ent1 - ent2).abs().max().item(),
        "grad_logits": (grad1[..., shard] - grad2).abs().max().item(),
        "fused_logprobs": (flp1 - flp2).abs().max().item(),
        "fused_entropy": (fent1 - fent2).abs().max().item(),
        "fused_grad_hidden": (gh1 - gh2).abs().max().item(),
        "fused_grad_weight": (gw1[shard] - gw2).abs().max().item(),
    }
    print(json.dumps({"rank": rank, **errs}), flush=True)
    bad = {k: v for k, v in errs.items() if not v <= 1e-5}
    assert not bad, bad
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
