"""Worker (torchrun, 2 gloo ranks): with global counts over the DP group, the per-rank losses sum to
the full-batch loss for every aggregation mode."""

import torch
import torch.distributed as dist

from megatron_opd.objectives import AGG_MODES, aggregate_loss, global_counts


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    loss = torch.rand(5, 8)
    mask = torch.zeros(5, 8)
    for i, n in enumerate([8, 2, 5, 3, 6]):
        mask[i, :n] = 1
    rows = [slice(0, 2), slice(2, 5)][rank]  # unequal shares
    for mode in AGG_MODES:
        full = aggregate_loss(loss, mask, mode)
        n_tok, n_seq = global_counts([mask[rows]], group=dist.group.WORLD)
        mine = aggregate_loss(loss[rows], mask[rows], mode, n_tok, n_seq)
        dist.all_reduce(mine)
        assert torch.allclose(mine, full), (mode, mine, full)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
