"""Tiny random-weight HF checkpoints built locally with transformers (no downloads possible here).

Tests, benchmarks and the demo build their models from `configs/models/tiny_*.yaml` through this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_opd.models.spec import ModelSpec


def build_hf_model(spec: ModelSpec, seed: int = 0, init_std: float = 0.02):
    """A randomly initialised transformers model of `spec` (Qwen3ForCausalLM / Qwen3MoeForCausalLM)."""
    import transformers

    hf_cfg = spec.to_hf_config()
    arch = hf_cfg.pop("architectures")[0]
    hf_cfg.pop("model_type")
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(initializer_range=init_std, **hf_cfg)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config)
    with torch.no_grad():
        # Non-trivial norm weights, so a mapping that swaps or drops them changes the logits.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
    return model.float().eval()


def save_tiny_checkpoint(
    spec: ModelSpec,
    out_dir: str | Path,
    seed: int = 0,
    tokenizer_dir: Optional[str | Path] = None,
    init_std: float = 0.02,
) -> Path:
    """Write a random HF checkpoint of `spec` (and optionally a tokenizer) to `out_dir`."""
    out_dir = Path(out_dir)
    model = build_hf_model(spec, seed=seed, init_std=init_std)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        tok.save_pretrained(str(out_dir))
    model.save_pretrained(str(out_dir))
    return out_dir
