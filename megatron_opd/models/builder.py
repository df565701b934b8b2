"""Build Megatron-Core GPT models for the three roles (student, teacher, reference) from a ModelSpec.

All three share the process groups of `megatron_opd.parallel`. The student is trainable; teacher and
reference are frozen: eval mode, `requires_grad=False`, no DDP wrapper, no grad buffers, no optimizer
state, and optionally parked on the CPU between uses (`FrozenModel.offload()` / `onload()`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_opd.models.spec import ModelSpec
from megatron_opd.parallel import ParallelConfig

ROLES = ("student", "teacher", "reference")


@dataclass
class PrecisionConfig:
    """Numerics of the Megatron models."""

    params_dtype: str = "float32"
    """Parameter/activation dtype: "float32" (CPU tests; exact comparisons) or "bfloat16"."""

    fp8: Optional[str] = None
    """GPU only: Transformer Engine FP8 recipe ("hybrid" or "e4m3") for the TE layer spec; None = off."""

    use_transformer_engine: bool = False
    """GPU only: build with the Transformer Engine layer spec (fused kernels, FP8). CPU: must be False."""

    def __post_init__(self):
        if self.params_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"precision.params_dtype={self.params_dtype!r}: use float32, bfloat16 or float16"
            )
        if self.fp8 is not None and self.fp8 not in ("hybrid", "e4m3"):
            raise ValueError(f"precision.fp8={self.fp8!r}: use null, 'hybrid' or 'e4m3'")
        if (self.fp8 or self.use_transformer_engine) and not torch.cuda.is_available():
            raise ValueError(
                "precision.fp8 / precision.use_transformer_engine need CUDA and Transformer Engine; "
                "set precision.fp8=null and precision.use_transformer_engine=false on CPU"
            )
        if self.fp8 and not self.use_transformer_engine:
            raise ValueError("precision.fp8 needs precision.use_transformer_engine=true")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.params_dtype)


def transformer_config(spec: ModelSpec, parallel: ParallelConfig, precision: PrecisionConfig):
    """Translate a ModelSpec into a megatron `TransformerConfig` (Qwen3 semantics)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

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
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Same weights for any TP size from one seed, and no CUDA needed at init.
        use_cpu_initialization=not torch.cuda.is_available(),
        # Fused CUDA kernels are unavailable (CPU) or optional; the plain paths are exact.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
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
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            moe_expert_capacity_factor=None,  # dropless: logits must match HF exactly
            moe_router_dtype="fp32",
        )
    if precision.fp8:
        kwargs.update(fp8=precision.fp8, fp8_recipe="delayed", fp8_param=False)
    return TransformerConfig(**kwargs)


def layer_spec(spec: ModelSpec, config, precision: PrecisionConfig):
    """Megatron layer spec: the local (pure-PyTorch) spec on CPU, the TE spec on GPU."""
    from megatron.core.models.gpt import gpt_layer_specs

    num_experts = spec.num_experts if spec.is_moe else None
    if precision.use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=spec.is_moe, qk_layernorm=True
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )


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
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
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


def offload(model: torch.nn.Module) -> None:
    """Park a frozen model's weights in CPU memory between uses (GPU only; a no-op on CPU)."""
    if torch.cuda.is_available():
        model.to("cpu", non_blocking=True)


def onload(model: torch.nn.Module) -> None:
    """Bring a frozen model back to the GPU before its forward pass (a no-op on CPU)."""
    if torch.cuda.is_available():
        model.to(torch.cuda.current_device(), non_blocking=True)
