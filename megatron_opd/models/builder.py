"""Build Megatron-Core GPT models for the three roles (student, teacher, reference) from a ModelSpec.

All three share the process groups of `megatron_opd.parallel`. The student is trainable; teacher and
reference are frozen: eval mode, `requires_grad=False`, no DDP wrapper, no grad buffers, no optimizer
state, and (`offload: true`) parked in host memory between uses (`platform.offload` / `onload`).

Layer spec: Transformer Engine's (flash attention, fused kernels, FP8) when CUDA and TE are present,
else megatron-core's local spec, whose unfused attention materialises [b, heads/tp, s, s] scores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_opd import platform
from megatron_opd.models.spec import ModelSpec
from megatron_opd.parallel import ParallelConfig

ROLES = ("student", "teacher", "reference")
logger = logging.getLogger(__name__)


@dataclass
class PrecisionConfig:
    """Numerics of the Megatron models."""

    params_dtype: str = "float32"
    """Parameter/activation dtype: "float32" (CPU tests; exact comparisons) or "bfloat16"."""

    fp8: Optional[str] = None
    """GPU only: Transformer Engine FP8 recipe ("hybrid" or "e4m3") for the TE layer spec; None = off."""

    use_transformer_engine: Optional[bool] = None
    """Transformer Engine layer spec (flash attention, fused kernels, FP8). None (auto): on when CUDA
    and transformer_engine are present, off otherwise; true where TE cannot run is refused."""

    recompute: Optional[str] = None
    """Activation recompute: None (off) or "selective" (megatron-core's core-attention recompute: the
    attention scores are not kept for backward; only the student's backward pass is affected)."""

    def __post_init__(self):
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"precision.params_dtype={self.params_dtype!r}: use float32, bfloat16 or float16"
            )
        if self.fp8 is not None and self.fp8 not in ("hybrid", "e4m3"):
            raise ValueError(f"precision.fp8={self.fp8!r}: use null, 'hybrid' or 'e4m3'")
        if self.recompute not in (None, "selective"):
            raise ValueError(f"precision.recompute={self.recompute!r}: use null or 'selective'")
        if self.fp8 and self.use_transformer_engine is False:
            raise ValueError("precision.fp8 needs the Transformer Engine spec: set "
                             "precision.use_transformer_engine=null (auto) or true")
        platform.check_transformer_engine_request(self.use_transformer_engine, self.fp8)

    @property
    def transformer_engine(self) -> bool:
        """Whether models are built with the TE layer spec (auto-resolved)."""
        if self.use_transformer_engine is None:
            return platform.has_transformer_engine()
        return self.use_transformer_engine

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.params_dtype)


def transformer_config(spec: ModelSpec, parallel: ParallelConfig, precision: PrecisionConfig):
    """Translate a ModelSpec into a megatron `TransformerConfig` (Qwen3 semantics)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(spec, parallel, precision))


def transformer_config_kwargs(spec: ModelSpec, parallel: ParallelConfig, precision: PrecisionConfig) -> dict:
    """The `TransformerConfig` fields of a model (pure: what a GPU run would build can be checked here)."""
    spec.validate_parallel(
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.expert_model_parallel_size,
        parallel.etp,
    )
    dtype = precision.torch_dtype
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        # A dense model shares the layout of an MoE teacher but has no experts to split.
        expert_model_parallel_size=parallel.expert_model_parallel_size if spec.is_moe else 1,
        expert_tensor_parallel_size=parallel.etp if spec.is_moe else None,
        # Sequence parallelism shards the norms' and dropouts' activations over TP (TE spec only here).
        sequence_parallel=precision.transformer_engine and parallel.tensor_model_parallel_size > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Same weights for any TP size from one seed, and no CUDA needed at init.
        use_cpu_initialization=platform.model_init_on_cpu(),
        # Fused kernels need CUDA; on CPU the plain paths run (and are exact). With no linear bias
        # the "bias" fusions are SwiGLU and residual-add fusions. RoPE fusion needs TE's kernels;
        # gradient-accumulation fusion needs TE's and Apex's wgrad kernels, so it stays off.
        bias_activation_fusion=platform.fused_kernels_available(),
        masked_softmax_fusion=False,  # the local spec's softmax; the TE spec has its own attention
        persist_layer_norm=False,
        bias_dropout_fusion=platform.fused_kernels_available(),
        apply_rope_fusion=precision.transformer_engine,
        gradient_accumulation_fusion=False,
        recompute_granularity=precision.recompute,
        deallocate_pipeline_outputs=False,
        # Our losses are normalised by global token counts already (models/forward.py).
        calculate_per_token_loss=True,
    )
    if spec.is_moe:
        kwargs.update(
            num_moe_experts=spec.num_experts,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
            moe_router_topk=spec.moe_router_topk,
            # Qwen3-MoE: softmax over all experts, top-k, renormalise (norm_topk_prob) == top-k on
            # logits then softmax over the k (pre_softmax=False). Without renormalisation the
            # probabilities must come from the full softmax.
            moe_router_pre_softmax=not spec.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            # The TE spec's experts are grouped-GEMM (TEGroupedMLP), dispatched all-to-all over EP as
            # every Megatron recipe at scale runs them; the local spec (CPU) runs one MLP per expert
            # with the all-gather dispatcher (gloo has all-to-all, but only the latter is tested here).
            moe_token_dispatcher_type="alltoall" if precision.transformer_engine else "allgather",
            moe_grouped_gemm=precision.transformer_engine,
            moe_expert_capacity_factor=None,  # dropless: logits must match HF exactly
            moe_router_dtype="fp32",
        )
    if precision.fp8:
        kwargs.update(fp8=precision.fp8, fp8_recipe="delayed", fp8_param=False)
    return kwargs


def layer_spec(spec: ModelSpec, config, precision: PrecisionConfig):
    """Megatron layer spec: Transformer Engine's when available (see `PrecisionConfig.transformer_engine`),
    else the local (pure-PyTorch) spec."""
    from megatron.core.models.gpt import gpt_layer_specs

    num_experts = spec.num_experts if spec.is_moe else None
    if precision.transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=spec.is_moe, qk_layernorm=True
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )


_WARNED: set = set()


def warn_unfused_attention(spec: ModelSpec, parallel: ParallelConfig, precision: PrecisionConfig) -> None:
    """On an accelerator without Transformer Engine, say once what the local spec's attention costs:
    megatron-core 0.16.1's local spec has no flash/SDPA attention (only NVIDIA's internal "kitchen"
    backend), so it keeps [b, heads/tp, s, s] scores for backward in every layer."""
    if not platform.on_gpu() or precision.transformer_engine or spec.name in _WARNED:
        return
    _WARNED.add(spec.name)
    s, heads = spec.max_position_embeddings, spec.num_attention_heads / parallel.tensor_model_parallel_size
    gib = 2 * heads * s * s * precision.torch_dtype.itemsize / 2**30
    logger.warning(
        "%s: no Transformer Engine, so attention is unfused: %.1f GiB of scores per layer and sequence at "
        "%d tokens, kept by every layer unless precision.recompute=selective (pip install -e .[gpu])",
        spec.name, gib, s)


def build_gpt_model(
    spec: ModelSpec,
    parallel: ParallelConfig,
    precision: Optional[PrecisionConfig] = None,
    role: str = "student",
):
    """Build this rank's pipeline stage of a GPT model for `role` (parallel state must be set up).

    Returns:
        The `GPTModel` chunk of this rank (no virtual pipeline stages).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if role not in ROLES:
        raise ValueError(f"role={role!r}: use one of {ROLES}")
    precision = precision or PrecisionConfig()
    config = transformer_config(spec, parallel, precision)
    warn_unfused_attention(spec, parallel, precision)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, config, precision),
        vocab_size=spec.padded_vocab_size(parallel.tensor_model_parallel_size),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,  # logits stay vocab-parallel: [s, b, V/tp]
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta),
    )
    model.to(precision.torch_dtype)
    platform.place_model(model)
    model.spec = spec  # the mapping and refit read shapes from here
    if role != "student":
        freeze(model)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teacher/reference: eval mode, no grads, so no grad buffers or optimizer state can exist."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return model

