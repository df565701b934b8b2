"""Worker (torchrun): run the OPD trainer on a recipe, optionally with an injected fault.

--inject-nan-step N   the objective returns a NaN loss at step N (the step must be skipped and counted)
--crash-save-step N   the checkpoint save of step N dies half-way (previous checkpoint must survive)
"""

import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--inject-nan-step", type=int, default=None)
    ap.add_argument("--crash-save-step", type=int, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    from megatron_opd import checkpoint, loss
    from megatron_opd.config import load_config
    from megatron_opd.trainer import OPDTrainer

    if args.inject_nan_step is not None:
        real = loss.objective_loss

        def nan_at_step(cfg, mb, logprobs, entropy, step):
            value, metrics = real(cfg, mb, logprobs, entropy, step)
            return (value * float("nan") if step == args.inject_nan_step else value), metrics

        loss.objective_loss = nan_at_step
    if args.crash_save_step is not None:
        from megatron.core import dist_checkpointing

        real_save = dist_checkpointing.save

        def crashing_save(state, path, *a, **k):
            if path.endswith(f"step_{args.crash_save_step}.tmp"):
                real_save(state, path, *a, **k)  # files half-written...
                raise OSError("injected crash while saving")  # ...then the node dies
            return real_save(state, path, *a, **k)

        dist_checkpointing.save = crashing_save

    cfg = load_config(args.config, args.overrides)
    trainer = OPDTrainer(cfg)
    try:
        trainer.setup()
        trainer.train()
        if trainer.rank0:
            print(json.dumps({"step": trainer.step, "skipped_steps": trainer.skipped_steps}), flush=True)
    finally:
        trainer.cleanup()


if __name__ == "__main__":
    main()
