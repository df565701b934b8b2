"""Print what a checkpoint holds: HF safetensors or Megatron dist_checkpointing.

    python -m tools.inspect_checkpoint <dir>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def inspect(path: str | Path) -> dict:
    path = Path(path)
    if list(path.glob("*.safetensors")):
        from megatron_opd.models.hf_mapping import HFCheckpoint

        ck = HFCheckpoint(path)
        tensors = {n: list(ck.shape(n)) for n in ck.keys()}
        info = {"format": "hf-safetensors", "tensors": tensors}
        try:
            spec = ck.spec()
            info["spec"] = spec.__dict__
        except ValueError as exc:
            info["spec_error"] = str(exc)
    elif (path / "metadata.json").is_file():
        from megatron.core.dist_checkpointing import load_tensors_metadata

        meta = load_tensors_metadata(str(path))
        tensors = {k: list(v.global_shape) for k, v in meta.items() if hasattr(v, "global_shape")}
        info = {"format": "megatron-dist-checkpointing", "tensors": tensors}
        for extra in ("megatron_opd_spec.json", "meta.json"):
            if (path / extra).is_file():
                info[extra] = json.loads((path / extra).read_text())
    else:
        raise ValueError(f"{path}: neither *.safetensors nor a dist_checkpointing metadata.json")
    n = 0
    for shape in info["tensors"].values():
        c = 1
        for d in shape:
            c *= d
        n += c
    info["num_tensors"] = len(info["tensors"])
    info["num_elements"] = n
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--json", action="store_true", help="print everything as JSON")
    args = ap.parse_args(argv)
    info = inspect(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{args.path}: {info['format']}, {info['num_tensors']} tensors, {info['num_elements'] / 1e6:.2f}M elements")
    for name, shape in sorted(info["tensors"].items()):
        print(f"  {name:70s} {shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
