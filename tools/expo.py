"""ExPO weight extrapolation (the papers' weight-space baseline): from a student and one or more
teachers of the same architecture (e.g. RL-trained from the student),

    theta = theta_s + alpha * (mean_k theta_teacher_k - theta_s)

tensor by tensor in float32, written in the student's dtype. alpha = 1 is plain averaging of the
teachers; alpha > 1 extrapolates past them (ExPO). Checkpoints are HF safetensors directories; the
output copies the student's config, tokenizer and generation files beside the new weights.

    python -m tools.expo --student <hf_dir> --teachers <hf_dir> [<hf_dir> ...] --alpha 1.5 --out <hf_dir>
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def extrapolate(student: torch.Tensor, teachers: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """theta_s + alpha (mean(theta_teachers) - theta_s), computed in float32, in the student's dtype."""
    s = student.float()
    mean = torch.stack([t.float() for t in teachers]).mean(0)
    return (s + alpha * (mean - s)).to(student.dtype)


def expo(student_dir: str | Path, teacher_dirs: list[str | Path], alpha: float, out_dir: str | Path) -> Path:
    """Write the extrapolated checkpoint to `out_dir`; every teacher must hold the student's tensors
    with the same shapes (refused before anything is written)."""
    from safetensors.torch import save_file

    from megatron_opd.models.hf_mapping import HFCheckpoint

    if not teacher_dirs:
        raise ValueError("--teachers: give at least one teacher checkpoint")
    student = HFCheckpoint(student_dir)
    teachers = [HFCheckpoint(t) for t in teacher_dirs]
    names = sorted(student.keys())
    for path, ck in zip(teacher_dirs, teachers):
        missing = sorted(set(names) ^ set(ck.keys()))
        if missing:
            raise ValueError(f"teacher {path} does not hold the student's tensors (first difference: "
                             f"{missing[0]}); ExPO needs one architecture")
        for n in names:
            if ck.shape(n) != student.shape(n):
                raise ValueError(f"teacher {path}: {n} has shape {ck.shape(n)}, the student's is {student.shape(n)}")
    out = Path(out_dir)
    if out.resolve() in {Path(p).resolve() for p in [student_dir, *teacher_dirs]}:
        raise ValueError(f"--out {out} is one of the inputs; write the result elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: extrapolate(student.get(n), [t.get(n) for t in teachers], alpha).contiguous() for n in names}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(student_dir).iterdir():  # config, tokenizer, generation settings
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="HF checkpoint of the student (theta_s)")
    ap.add_argument("--teachers", required=True, nargs="+", help="HF checkpoints of the teachers")
    ap.add_argument("--alpha", type=float, required=True, help="1 = mean of the teachers; > 1 extrapolates")
    ap.add_argument("--out", required=True, help="output HF checkpoint directory")
    args = ap.parse_args(argv)
    out = expo(args.student, args.teachers, args.alpha, args.out)
    print(f"wrote {out} (alpha = {args.alpha}, {len(args.teachers)} teacher(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
