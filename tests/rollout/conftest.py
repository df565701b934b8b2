"""A tiny Qwen3 (and Qwen3-MoE) HF checkpoint with a locally trained tokenizer, for vLLM tests."""

import pytest

from megatron_opd.data.tokenizer import train_tokenizer
from megatron_opd.models.hf_tiny import save_tiny_checkpoint
from mopd_testing import tiny_spec


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def vllm_dense_ckpt(tmp_path_factory, tokenizer_dir):
    return save_tiny_checkpoint(tiny_spec("tiny_qwen3"), tmp_path_factory.mktemp("vd"),
                                tokenizer_dir=tokenizer_dir, init_std=0.1)


@pytest.fixture(scope="session")
def vllm_moe_ckpt(tmp_path_factory, tokenizer_dir):
    return save_tiny_checkpoint(tiny_spec("tiny_qwen3_moe"), tmp_path_factory.mktemp("vm"),
                                tokenizer_dir=tokenizer_dir, init_std=0.1)


@pytest.fixture(scope="session")
def vllm_tied_ckpt(tmp_path_factory, tokenizer_dir):
    """Tied input/output embeddings, like Qwen3-1.7B and Qwen3-4B (the cluster recipes' students)."""
    return save_tiny_checkpoint(tiny_spec("tiny_qwen3", tie_word_embeddings=True), tmp_path_factory.mktemp("vt"),
                                tokenizer_dir=tokenizer_dir, init_std=0.1)
