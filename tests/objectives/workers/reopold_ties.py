"""Worker (torchrun, 2 gloo ranks): REOPOLD's token selection over a data-parallel group keeps exactly
the tokens one process keeps on the whole batch, ties included."""

import json

import torch
import torch.distributed as dist

from megatron_opd.objectives.reopold import top_fraction_mask


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    score = torch.tensor([[0.9, 0.8, 0.7] + [0.5] * 7] * 10)  # 70 % of the entropies tied, at the cut
    mask = torch.ones(10, 10)
    mine = slice(0, 4) if rank == 0 else slice(4, 10)  # unequal shares, as token budgets give
    kept = top_fraction_mask(score[mine], mask[mine], 0.8, group=dist.group.WORLD)
    parts = [None, None]
    dist.all_gather_object(parts, kept.tolist())
    if rank == 0:
        whole = top_fraction_mask(score, mask, 0.8)
        print(json.dumps({"ties": {"same": torch.tensor(parts[0] + parts[1]).equal(whole),
                                   "kept": int(whole.sum())}}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
