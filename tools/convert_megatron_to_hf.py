"""Megatron dist_checkpointing checkpoint (from convert_hf_to_megatron or a training run) -> HF
safetensors checkpoint.

    python -m tools.convert_megatron_to_hf --megatron runs/tiny_opd --out runs/tiny_opd/hf
    torchrun --nproc_per_node 2 -m tools.convert_megatron_to_hf --megatron <dir> --out <dir> --pp 2 \
        [--spec configs/models/x.yaml] [--tokenizer <hf dir>] [--verify]

--megatron takes a checkpoint (`checkpoints/step_N`), a run's `checkpoints/` or the run directory itself
(its newest checkpoint). Both kinds of checkpoint carry their model spec and tokenizer files, so --spec
and --tokenizer are only needed for checkpoints written by other tools.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> int:
    from tools._common import add_layout_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron", required=True, help="Megatron checkpoint directory")
    ap.add_argument("--out", required=True, help="new directory for the HF checkpoint")
    ap.add_argument("--spec", default=None, help="model spec YAML (default: the checkpoint's own)")
    ap.add_argument("--tokenizer", default=None, help="directory whose tokenizer files to copy")
    add_layout_args(ap)
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_opd import parallel
    from megatron_opd.models.builder import PrecisionConfig, build_gpt_model
    from megatron_opd.models.hf_mapping import save_hf_checkpoint
    from megatron_opd.models.spec import ModelSpec
    from tools._common import copy_tokenizer, read_spec, refuse_existing, verify_against_transformers

    src, out = resolve_checkpoint(Path(args.megatron)), Path(args.out)
    spec = ModelSpec.from_yaml(args.spec) if args.spec else read_spec(src)
    spec.validate_parallel(args.tp, args.pp, args.ep)
    refuse_existing(out)
    pcfg = parallel.ParallelConfig(args.tp, args.pp, args.ep)
    parallel.initialize(pcfg)
    model = build_gpt_model(spec, pcfg, PrecisionConfig(params_dtype=args.dtype), role="teacher")
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(src))
    model.load_state_dict(state["model"])
    save_hf_checkpoint(model, spec, out, dtype=getattr(torch, args.dtype))
    if dist.get_rank() == 0 and (args.tokenizer or (src / "tokenizer.json").is_file()):
        copy_tokenizer(Path(args.tokenizer) if args.tokenizer else src, out)
    dist.barrier()
    if args.verify:
        err = verify_against_transformers(model, spec, out, atol=1e-4 if args.dtype == "float32" else 5e-2)
        if dist.get_rank() == 0:
            print(f"verify: max |logits - transformers| = {err:.3g}")
    if dist.get_rank() == 0:
        print(f"wrote {out} (from {src})")
    parallel.destroy()
    return 0


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or the newest complete one of a run (`<run>` or `<run>/checkpoints`)."""
    from megatron_opd.checkpoint import latest_checkpoint

    if (path / "metadata.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    raise FileNotFoundError(f"--megatron {path} is neither a dist_checkpointing checkpoint (no metadata.json) "
                            "nor a run directory with checkpoints/step_N")


if __name__ == "__main__":
    raise SystemExit(main())
