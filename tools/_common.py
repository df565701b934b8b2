"""Shared pieces of the conversion tools: argument validation and logit verification."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.checkpoint import SPEC_FILE, TOKENIZER_FILES, copy_tokenizer, read_spec, write_spec  # noqa: F401


def add_layout_args(ap) -> None:
    """--tp/--pp/--ep/--dtype/--verify, shared by both conversion directions."""
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the conversion")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the conversion")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size of the conversion (MoE)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--verify", action="store_true", help="compare logits with transformers")


def refuse_existing(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new directory")



def megatron_logits(model, spec, input_ids: torch.Tensor):
    """Full-vocabulary logits [b, s, V] gathered over TP, on the last pipeline stage (else None)."""
    from megatron.core import parallel_state as ps

    from megatron_opd.batching import ForwardBatch
    from megatron_opd.models.forward import run_micro_batches

    got = []

    def fn(mb, logits):
        tp = ps.get_tensor_model_parallel_world_size()
        shards = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        got.append(torch.cat(shards, -1)[..., : spec.vocab_size].float())
        return logits.sum() * 0, {}

    run_micro_batches(model, [ForwardBatch(input_ids=input_ids)], fn, forward_only=True)
    return got[0] if got else None


def verify_against_transformers(model, spec, hf_dir: Path, atol: float = 1e-4) -> float:
    """Max |Megatron - transformers| logits on a few fixed prompts (collective; checked on the last
    stage, reported on every rank)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (2, 16))
    mine = megatron_logits(model, spec, ids)
    err = torch.tensor([0.0])
    if mine is not None:
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            err[0] = (mine - hf(ids).logits).abs().max()
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    if err.item() > atol:
        raise RuntimeError(f"--verify failed: logits differ from transformers by {err.item():.3g} > {atol}")
    return err.item()
