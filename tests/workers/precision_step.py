"""Worker (torchrun): one OPD step's scoring and update on a fixed synthetic batch (no rollout engine),
at the precision the overrides choose. Saves this rank's loss and flattened gradient buffer to
`<out>/rank<R>.pt`; the test compares two precisions on the same batch, rank by rank (the TP shards)."""

import argparse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from step_parity import engine_free_trainer

    tr, captured = engine_free_trainer(args.config, args.overrides)
    try:
        batch, _ = tr.rollout()
        micro = tr.micro_batches(batch)
        micro, _ = tr.score(micro)
        metrics = tr.update(micro)
        dtypes = sorted({str(p.dtype) for p in tr.student.parameters()})
        torch.save({"loss": metrics["loss"], "grads": captured["grads"], "param_dtypes": dtypes,
                    "optimizer": sorted({type(o).__name__ for o in getattr(tr.optimizer, "chained_optimizers", [tr.optimizer])})},
                   f"{args.out}/rank{dist.get_rank()}.pt")
    finally:
        tr.cleanup()


if __name__ == "__main__":
    main()
