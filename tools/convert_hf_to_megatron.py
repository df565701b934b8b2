"""HF safetensors checkpoint -> Megatron dist_checkpointing checkpoint (layout-independent).

    torchrun --nproc_per_node 2 -m tools.convert_hf_to_megatron --hf <dir> --out <dir> --tp 2 [--verify]

The output loads at any TP/PP/EP (dist_checkpointing reshards); --tp/--pp/--ep only choose the layout
used for the conversion itself (pick one that fits the model in memory). Everything is validated
before anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv=None) -> int:
    from tools._common import add_layout_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", required=True, help="HF checkpoint directory")
    ap.add_argument("--out", required=True, help="new directory for the Megatron checkpoint")
    add_layout_args(ap)
    args = ap.parse_args(argv)

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_opd import parallel
    from megatron_opd.models.builder import PrecisionConfig, build_gpt_model
    from megatron_opd.models.hf_mapping import HFCheckpoint, check_checkpoint_matches, load_hf_into_megatron
    from tools._common import copy_tokenizer, refuse_existing, verify_against_transformers, write_spec

    from megatron_opd.models.spec import ModelSpec

    out = Path(args.out)
    spec = ModelSpec.from_hf_config(args.hf)  # an unknown architecture fails here, before any I/O
    ckpt = HFCheckpoint(args.hf)
    check_checkpoint_matches(spec, ckpt)
    spec.validate_parallel(args.tp, args.pp, args.ep)
    refuse_existing(out)
    pcfg = parallel.ParallelConfig(args.tp, args.pp, args.ep)
    parallel.initialize(pcfg)
    model = build_gpt_model(spec, pcfg, PrecisionConfig(params_dtype=args.dtype), role="teacher")
    load_hf_into_megatron(model, spec, ckpt)
    if args.verify:
        err = verify_against_transformers(model, spec, Path(args.hf), atol=1e-4 if args.dtype == "float32" else 5e-2)
        if dist.get_rank() == 0:
            print(f"verify: max |logits - transformers| = {err:.3g}")
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(out))
    if dist.get_rank() == 0:
        write_spec(out, spec)
        copy_tokenizer(Path(args.hf), out)
        print(f"wrote {out} ({spec.name}, {spec.num_parameters() / 1e6:.1f}M parameters)")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
