"""Model specifications: the architecture facts of a checkpoint family, loaded from
`configs/models/*.yaml` or read off a Hugging Face `config.json`, and translated into a Megatron
`TransformerConfig`.

A `ModelSpec` is the single source of truth for shapes: the HF<->Megatron mapping, the vLLM refit and
the memory estimator all read it, so a checkpoint whose shapes disagree with it is refused before any
weights are touched.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

#: Architectures we can build, map to HF and refit into vLLM. Keys are `ModelSpec.architecture`,
#: values the HF `architectures[0]` string.
SUPPORTED_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_HF_TO_ARCH = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}


@dataclass
class ModelSpec:
    """Architecture of a Qwen3 dense or Qwen3-MoE model (the families megatron_opd supports)."""

    name: str
    """Human-readable name (for logs and the memory estimator)."""

    architecture: str
    """One of `SUPPORTED_ARCHITECTURES`: "qwen3" (dense) or "qwen3_moe"."""

    vocab_size: int
    """True vocabulary size of the tokenizer/checkpoint (before Megatron's padding)."""

    hidden_size: int
    """Model width H."""

    num_layers: int
    """Number of transformer layers; must be divisible by the pipeline-parallel size."""

    num_attention_heads: int
    """Query heads; must be divisible by the tensor-parallel size."""

    num_query_groups: int
    """Key/value heads (GQA groups); must be divisible by the tensor-parallel size."""

    head_dim: int
    """Per-head width (Qwen3 sets it explicitly; it is not hidden_size / heads)."""

    ffn_hidden_size: int
    """Dense MLP intermediate size (unused by MoE layers)."""

    rope_theta: float = 1_000_000.0
    """RoPE base."""

    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""

    tie_word_embeddings: bool = False
    """Share the input embedding with the LM head (Qwen3-1.7B/4B do; the 30B MoE does not)."""

    max_position_embeddings: int = 40960
    """Longest sequence the model supports."""

    num_experts: Optional[int] = None
    """MoE: number of routed experts (None for dense). Must be divisible by the expert-parallel size."""

    moe_ffn_hidden_size: Optional[int] = None
    """MoE: per-expert intermediate size."""

    moe_router_topk: int = 8
    """MoE: experts per token."""

    moe_norm_topk_prob: bool = True
    """MoE: renormalise the top-k router probabilities (Qwen3-MoE `norm_topk_prob`)."""

    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this times TP; padded rows never enter softmax."""

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"ModelSpec.architecture={self.architecture!r} is not supported; "
                f"use one of {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        for field in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                      "num_query_groups", "head_dim", "ffn_hidden_size"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"ModelSpec.{field} must be a positive integer, got {getattr(self, field)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"ModelSpec.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.is_moe:
            if not self.num_experts or not self.moe_ffn_hidden_size:
                raise ValueError(
                    "ModelSpec: architecture 'qwen3_moe' needs num_experts and moe_ffn_hidden_size"
                )
            if not 0 < self.moe_router_topk <= self.num_experts:
                raise ValueError(
                    f"ModelSpec.moe_router_topk={self.moe_router_topk} must be in [1, num_experts]"
                )
        elif self.num_experts:
            raise ValueError("ModelSpec.num_experts is set but architecture is 'qwen3' (dense); "
                             "use architecture 'qwen3_moe'")

    @property
    def is_moe(self) -> bool:
        return self.architecture == "qwen3_moe"

    def padded_vocab_size(self, tp_size: int) -> int:
        """Megatron's padded vocabulary: a multiple of make_vocab_size_divisible_by * tp_size."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return ((self.vocab_size + multiple - 1) // multiple) * multiple

    def validate_parallel(self, tp: int, pp: int, ep: int, etp: Optional[int] = None) -> None:
        """Refuse a layout the model cannot be split into, naming the field and the fix
        (`etp`: expert-tensor-parallel size, None = tp)."""
        if self.num_attention_heads % tp:
            raise ValueError(
                f"parallel.tensor_model_parallel_size={tp} does not divide "
                f"{self.name}.num_attention_heads={self.num_attention_heads}; choose a divisor"
            )
        if self.num_query_groups % tp:
            raise ValueError(
                f"parallel.tensor_model_parallel_size={tp} does not divide "
                f"{self.name}.num_query_groups={self.num_query_groups}; choose a divisor"
            )
        if self.num_layers % pp:
            raise ValueError(
                f"parallel.pipeline_model_parallel_size={pp} does not divide "
                f"{self.name}.num_layers={self.num_layers}; choose a divisor"
            )
        # A dense model ignores EP: the student is dense while its MoE teacher shares the layout.
        if self.is_moe and self.num_experts % ep:
            raise ValueError(
                f"parallel.expert_model_parallel_size={ep} does not divide "
                f"{self.name}.num_experts={self.num_experts}; choose a divisor"
            )
        etp = etp or tp
        if self.is_moe and self.moe_ffn_hidden_size % etp:
            raise ValueError(
                f"parallel.expert_tensor_parallel_size={etp} does not divide "
                f"{self.name}.moe_ffn_hidden_size={self.moe_ffn_hidden_size}; choose a divisor"
            )
        if not self.is_moe and self.ffn_hidden_size % tp:
            raise ValueError(
                f"parallel.tensor_model_parallel_size={tp} does not divide "
                f"{self.name}.ffn_hidden_size={self.ffn_hidden_size}"
            )

    # --- I/O ---------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelSpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model spec {path} does not exist (see configs/models/)")
        data = yaml.safe_load(path.read_text()) or {}
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown model spec field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, hf_config: dict | str | Path, name: Optional[str] = None) -> "ModelSpec":
        """Read a HF `config.json` (dict, file or checkpoint directory)."""
        if not isinstance(hf_config, dict):
            p = Path(hf_config)
            p = p / "config.json" if p.is_dir() else p
            if not p.is_file():
                raise FileNotFoundError(f"no HF config.json at {p}")
            hf_config = json.loads(p.read_text())
        archs = hf_config.get("architectures") or []
        hf_arch = archs[0] if archs else None
        if hf_arch not in _HF_TO_ARCH:
            raise ValueError(
                f"HF architecture {hf_arch!r} is not supported; supported: "
                f"{sorted(_HF_TO_ARCH)}"
            )
        arch = _HF_TO_ARCH[hf_arch]
        rope = hf_config.get("rope_theta")
        if rope is None:  # transformers 5 moved it under rope_parameters
            rope = (hf_config.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
        heads = hf_config["num_attention_heads"]
        fields = dict(
            name=name or hf_config.get("_name_or_path") or hf_arch,
            architecture=arch,
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            num_layers=hf_config["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=hf_config.get("num_key_value_heads", heads),
            head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
            ffn_hidden_size=hf_config["intermediate_size"],
            rope_theta=float(rope),
            norm_epsilon=hf_config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            max_position_embeddings=hf_config.get("max_position_embeddings", 40960),
        )
        if arch == "qwen3_moe":
            fields.update(
                # transformers 5 writes `num_local_experts`; older configs `num_experts`.
                num_experts=hf_config.get("num_experts") or hf_config["num_local_experts"],
                moe_ffn_hidden_size=hf_config["moe_intermediate_size"],
                moe_router_topk=hf_config["num_experts_per_tok"],
                moe_norm_topk_prob=bool(hf_config.get("norm_topk_prob", True)),
            )
        return cls(**fields)

    def to_hf_config(self) -> dict:
        """The HF `config.json` fields of this spec (for building tiny test checkpoints)."""
        cfg = dict(
            architectures=[SUPPORTED_ARCHITECTURES[self.architecture]],
            model_type=self.architecture,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.head_dim,
            intermediate_size=self.ffn_hidden_size,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.norm_epsilon,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
            attention_bias=False,
        )
        if self.is_moe:
            cfg.update(
                num_experts=self.num_experts,
                moe_intermediate_size=self.moe_ffn_hidden_size,
                num_experts_per_tok=self.moe_router_topk,
                norm_topk_prob=self.moe_norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        return cfg

    def num_parameters(self) -> int:
        """Total parameter count (embedding and LM head counted once each unless tied)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_query_groups * 2) + 2 * d
        if self.is_moe:
            mlp = self.num_experts * 3 * h * self.moe_ffn_hidden_size + self.num_experts * h
        else:
            mlp = 3 * h * self.ffn_hidden_size
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h
