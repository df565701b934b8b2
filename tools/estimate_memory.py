"""Per-GPU memory estimate of an OPD recipe, phase by phase, for what the code does: the student's
weights, gradients and optimizer state, frozen teacher(s) and reference (offloaded or resident),
activations, attention scores (unfused kernel only), the LM-head log-prob chunk, and the colocated
vLLM engine (asleep while the models compute, awake for rollout and refit).

    python -m tools.estimate_memory --recipe configs/recipes/exopd_30b_a3b_to_4b.yaml

Formulas (bytes per GPU; P_local = the parameters one rank holds):
  weights      P_local x bytes(dtype)
  gradients    P_local x 4          (Megatron DDP reduces gradients in fp32)
  optimizer    P_local x 12         (fp32 master copy + Adam m and v; 8 when the model is fp32),
               / DP with optim.use_distributed_optimizer (each data-parallel rank holds its shard)
  frozen       sum over teacher(s)/reference of P_local x bytes(dtype); with `offload: true` a model
               is on the GPU only while it scores, so the score phase holds the largest one
  activations  micro_batch x seq x hidden x (layers / pp) x 34 x bytes / tp  (Korthikanti et al. 2022,
               attention scores excluded)
  attention    flash (Transformer Engine spec): 0; unfused (local spec): scores + softmax,
               2 x micro_batch x heads/tp x seq^2 x bytes per layer, kept for backward by every layer
               of the stage (layers / pp), or by one layer at a time with precision.recompute=selective
  logits       micro_batch x seq x V/tp x (bytes + 4): the model's vocab-parallel logits, kept for
               backward, and their fp32 gradient (the trainer scores from the logits)
  logprobs     2 x chunk x V/tp x 4  (fp32 chunk of the vocab-parallel log-softmax and its gradient;
               chunk from the byte budget of chunk_size="auto": 512 MiB on GPU, 8 MiB on CPU)
  engine       colocated: rollout.gpu_memory_utilization x GPU memory (vLLM's own budget, weights and
               KV cache included) while awake; ~0 asleep (sleep level 1). rollout.placement=dedicated:
               0 on a trainer GPU; the engine GPUs (the second kind) are priced apart: engine_gpu =
               gpu_memory_utilization x GPU memory, of which the whole student (TP 1) in rollout.dtype
               is engine_gpu_weights and the rest the KV cache
Phases: train = weights + gradients + optimizer + frozen + activations + attention + logits + logprobs
(engine asleep); rollout = weights + gradients + optimizer + resident frozen + engine. total = the larger.
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
    frozen_offloaded: Optional[list[bool]] = None,
    etp: Optional[int] = None,
    attention: str = "flash",
    recompute: Optional[str] = None,
    engine_gib: float = 0.0,
    chunk_budget_bytes: int = FUSED_CHUNK_BYTES_MAX,
    dp: int = 1,
    distributed_optimizer: bool = False,
) -> dict:
    """Per-GPU GiB of each component, of the train and rollout phases, and their maximum ("total").

    Args:
        frozen_offloaded: per frozen model, whether it is parked in host memory between its uses.
        attention: "flash" (TE spec) or "unfused" (local spec: [b, heads/tp, s, s] scores kept).
        recompute: None or "selective" (attention recomputed in backward: one layer's scores live).
        engine_gib: the colocated vLLM engine's budget while awake.
        chunk_budget_bytes: the log-prob chunk's byte budget (GPU: FUSED_CHUNK_BYTES_MAX; CPU:
            megatron_opd.logprobs.DEFAULT_CHUNK_BYTES).
        dp, distributed_optimizer: the optimizer state is sharded over the `dp` data-parallel ranks
            when distributed (gradient buffers stay whole: megatron reduce-scatters into them).
    """
    if attention not in ("flash", "unfused"):
        raise ValueError(f"attention={attention!r}: use 'flash' or 'unfused'")
    b = _BYTES[dtype]
    p_student = local_params(student, tp, pp, ep, etp)
    out = {
        "student_weights": p_student * b,
        "gradients": p_student * 4,
        "optimizer": p_student * (12 if b != 4 else 8) / (dp if distributed_optimizer else 1),
    }
    offloaded = frozen_offloaded or [False] * len(frozen)
    frozen_bytes = [local_params(s, tp, pp, ep, etp) * b for s in frozen]
    resident = sum(x for x, off in zip(frozen_bytes, offloaded) if not off)
    parked = [x for x, off in zip(frozen_bytes, offloaded) if off]
    out["frozen_models"] = resident + (max(parked) if parked else 0.0)  # while scoring
    big = max([student, *frozen], key=lambda s: s.hidden_size * s.num_layers)
    out["activations"] = micro_batch * seq_len * big.hidden_size * (big.num_layers / pp) * 34 * b / tp
    per_layer = 2 * micro_batch * (big.num_attention_heads / tp) * seq_len**2 * b
    layers_kept = 1 if recompute == "selective" else big.num_layers / pp
    out["attention_scores"] = per_layer * layers_kept if attention == "unfused" else 0.0
    local_vocab = student.padded_vocab_size(tp) / tp
    out["logits"] = micro_batch * seq_len * local_vocab * (b + 4)
    # forward chunk + its gradient in backward
    chunk = min(auto_chunk_size(int(local_vocab), chunk_budget_bytes), micro_batch * seq_len)
    out["logprob_chunk"] = 2 * chunk * local_vocab * 4
    state = out["student_weights"] + out["gradients"] + out["optimizer"]
    out["engine_awake"] = engine_gib * GIB
    out["train_phase"] = state + out["frozen_models"] + out["activations"] + out["attention_scores"] \
        + out["logits"] + out["logprob_chunk"]
    out["rollout_phase"] = state + resident + out["engine_awake"]
    out["total"] = max(out["train_phase"], out["rollout_phase"])
    return {k: v / GIB for k, v in out.items()}


def estimate_recipe(recipe: str, overrides: Optional[list[str]] = None, gpu_gib: float = 80.0) -> dict:
    """The recipe's estimate on GPUs of `gpu_gib` GiB (vLLM's budget is a fraction of it)."""
    from megatron_opd.config import load_config

    from megatron_opd.parallel import validate_layout

    from megatron_opd.rollout.placement import plan_for_config

    from megatron_opd.rollout.dedicated import trainer_world

    cfg = load_config(recipe, overrides)
    dedicated = cfg.rollout.placement == "dedicated"
    world = trainer_world(cfg, cfg.launch.nodes * cfg.launch.gpus_per_node)  # the trainer's GPUs
    validate_layout(cfg.parallel, world)
    student = ModelSpec.from_yaml(cfg.student.spec)
    if not dedicated:
        plan_for_config(cfg, world, cfg.launch.gpus_per_node, student)
    frozen = [ModelSpec.from_yaml(t.spec) for t in cfg.teachers]
    if cfg.needs_reference and cfg.reference is not None and cfg.reference.spec:
        frozen.append(ModelSpec.from_yaml(cfg.reference.spec))
    offloaded = [t.offload for t in cfg.teachers]
    if len(frozen) > len(offloaded):
        offloaded.append(bool(cfg.reference.offload))
    p = cfg.parallel
    # The GPU build uses the TE spec (flash attention) unless the recipe turns it off; the estimate is
    # for the cluster, so "auto" means the `gpu` extra (transformer-engine) is installed there.
    attention = "unfused" if cfg.precision.use_transformer_engine is False else "flash"
    engine = 0.0 if dedicated else cfg.rollout.gpu_memory_utilization * gpu_gib  # colocated: shares the GPU
    est = estimate_memory(
        student, frozen, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
        p.expert_model_parallel_size, cfg.precision.params_dtype, cfg.train.micro_batch_size,
        cfg.rollout.max_model_len, frozen_offloaded=offloaded, etp=p.etp, attention=attention,
        recompute=cfg.precision.recompute, engine_gib=engine,
        dp=world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size),
        distributed_optimizer=cfg.optim.use_distributed_optimizer,
    )
    if dedicated:  # the second kind of GPU: one engine (TP 1) with the whole student and its KV cache
        weights = student.num_parameters() * _BYTES[cfg.rollout.dtype] / GIB
        budget = cfg.rollout.gpu_memory_utilization * gpu_gib
        if weights >= budget:
            raise ValueError(
                f"a dedicated engine holds the whole student ({weights:.1f} GiB in {cfg.rollout.dtype}) but "
                f"rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization} gives vLLM {budget:.1f} GiB "
                "of the GPU; raise it (a dedicated engine has its GPU to itself: 0.9 is usual)")
        est.update(engine_gpu_weights=weights, engine_gpu_kv_cache=budget - weights, engine_gpu=budget)
    return est


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory (H100 80GB: 80)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    est = estimate_recipe(args.recipe, args.overrides, gpu_gib=args.gpu_gib)
    for k, v in est.items():
        print(f"{k:18s} {v:8.2f} GiB")
    if est["total"] > args.gpu_gib:
        print(f"over budget: {est['total']:.1f} GiB > {args.gpu_gib:.0f} GiB per trainer GPU")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
