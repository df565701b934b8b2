"""Per-GPU memory estimate of an OPD recipe: student weights, gradients and optimizer state, frozen
teacher(s) and reference, activations, LM-head log-prob chunk, and the colocated vLLM KV cache.

    python -m tools.estimate_memory --recipe configs/recipes/exopd_30b_a3b_to_4b.yaml

Formulas (bytes per GPU; P_local = the parameters one rank holds):
  weights      P_local x bytes(dtype)
  gradients    P_local x 4          (Megatron DDP reduces gradients in fp32)
  optimizer    P_local x 12         (fp32 master copy + Adam m and v; 8 when the model is fp32)
  frozen       sum over teacher(s)/reference of P_local x bytes(dtype) (0 if offloaded, peak 1 model)
  activations  micro_batch x seq x hidden x (layers / pp) x 34 x bytes / tp  (Korthikanti et al. 2022,
               full attention scores dropped: flash/fused attention)
  logprobs     2 x chunk(1024) x V/tp x 4        (fp32 chunk of the vocab-parallel log-softmax)
  kv_cache     2 x layers x kv_heads x head_dim x bytes x max_model_len x sequences_per_gpu / tp
P_local: dense params / (tp x pp); MoE experts / (ep x etp x pp) plus the dense part / (tp x pp).
The layout is first checked against megatron-core's rules for the recipe's GPU count
(launch.nodes x launch.gpus_per_node), so a layout that cannot start is refused, not priced.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_opd.logprobs import FUSED_CHUNK_BYTES_MAX, auto_chunk_size
from megatron_opd.models.spec import ModelSpec

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


def local_params(spec: ModelSpec, tp: int, pp: int, ep: int, etp: Optional[int] = None) -> float:
    """Parameters one rank holds under the layout (etp: expert-tensor-parallel size, None = tp)."""
    h = spec.hidden_size
    total = spec.num_parameters()
    if not spec.is_moe:
        return total / (tp * pp)
    experts = spec.num_layers * spec.num_experts * 3 * h * spec.moe_ffn_hidden_size
    return (total - experts) / (tp * pp) + experts / (ep * (etp or tp) * pp)


def estimate_memory(
    student: ModelSpec,
    frozen: list[ModelSpec],
    tp: int,
    pp: int,
    ep: int,
    dtype: str = "bfloat16",
    micro_batch: int = 1,
    seq_len: int = 4096,
    frozen_offloaded: bool = False,
    kv_sequences_per_gpu: int = 8,
    kv_max_len: Optional[int] = None,
    etp: Optional[int] = None,
) -> dict:
    """Per-GPU bytes of each component and their total (GiB)."""
    b = _BYTES[dtype]
    p_student = local_params(student, tp, pp, ep, etp)
    out = {
        "student_weights": p_student * b,
        "gradients": p_student * 4,
        "optimizer": p_student * (12 if b != 4 else 8),
    }
    frozen_bytes = [local_params(s, tp, pp, ep, etp) * b for s in frozen]
    # offloaded: only one frozen model is on the GPU at a time (the one scoring)
    out["frozen_models"] = (max(frozen_bytes) if frozen_offloaded else sum(frozen_bytes)) if frozen else 0.0
    big = max([student, *frozen], key=lambda s: s.hidden_size * s.num_layers)
    out["activations"] = micro_batch * seq_len * big.hidden_size * (big.num_layers / pp) * 34 * b / tp
    # forward chunk + its gradient in backward; chunk_size="auto" on GPU budgets FUSED_CHUNK_BYTES_MAX each
    local_vocab = student.padded_vocab_size(tp) / tp
    chunk = min(auto_chunk_size(int(local_vocab), FUSED_CHUNK_BYTES_MAX), micro_batch * seq_len)
    out["logprob_chunk"] = 2 * chunk * local_vocab * 4
    kv_len = kv_max_len or seq_len
    out["kv_cache"] = (2 * student.num_layers * student.num_query_groups * student.head_dim * b * kv_len
                       * kv_sequences_per_gpu / tp)
    out["total"] = sum(out.values())
    return {k: v / GIB for k, v in out.items()}


def estimate_recipe(recipe: str, overrides: Optional[list[str]] = None) -> dict:
    from megatron_opd.config import load_config

    from megatron_opd.parallel import validate_layout

    cfg = load_config(recipe, overrides)
    validate_layout(cfg.parallel, cfg.launch.nodes * cfg.launch.gpus_per_node)
    student = ModelSpec.from_yaml(cfg.student.spec)
    frozen = [ModelSpec.from_yaml(t.spec) for t in cfg.teachers]
    if cfg.needs_reference and cfg.reference is not None and cfg.reference.spec:
        frozen.append(ModelSpec.from_yaml(cfg.reference.spec))
    p = cfg.parallel
    return estimate_memory(
        student, frozen, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
        p.expert_model_parallel_size, cfg.precision.params_dtype, cfg.train.micro_batch_size,
        cfg.rollout.max_model_len, frozen_offloaded=all(t.offload for t in cfg.teachers),
        kv_max_len=cfg.rollout.max_model_len, etp=p.etp,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    est = estimate_recipe(args.recipe, args.overrides)
    for k, v in est.items():
        print(f"{k:16s} {v:8.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
