"""Vocabulary-parallel token log-probs: dense references, padding, gradients, TP=2 == TP=1."""

import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_opd.logprobs import (
    auto_chunk_size,
    fused_chunk_bytes,
    fused_lm_head_token_logprobs,
    vocab_parallel_token_logprobs,
)
from mopd_testing import run_ranks


def dense(logits, target, V):
    logp = torch.log_softmax(logits[..., :V].double(), -1)
    return logp.gather(-1, target[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


@pytest.fixture
def case():
    torch.manual_seed(0)
    V, Vpad = 50, 64
    logits = torch.randn(6, 5, Vpad) * 2
    logits[..., V:] = 1e4  # huge padded logits: must not enter the softmax
    return logits, torch.randint(0, V, (6, 5)), V


def test_equals_dense_logsoftmax_gather_with_padded_vocab(case):
    logits, target, V = case
    lp, ent = vocab_parallel_token_logprobs(logits, target, valid_vocab_size=V, compute_entropy=True)
    ref_lp, ref_ent = dense(logits, target, V)
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_gradients_equal_dense_autograd(case, chunk):
    logits, target, V = case
    g_lp, g_ent = torch.randn(6, 5), torch.randn(6, 5)
    x = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_token_logprobs(x, target, valid_vocab_size=V, compute_entropy=True, chunk_size=chunk)
    (got,) = torch.autograd.grad((lp * g_lp + ent * g_ent).sum(), x)
    y = logits.clone().double().requires_grad_()
    r_lp, r_ent = dense(y, target, V)
    (ref,) = torch.autograd.grad((r_lp * g_lp + r_ent * g_ent).sum(), y)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)  # fp32 vs fp64
    assert torch.all(got[..., V:] == 0), "padded columns must get zero gradient"


def test_chunked_equals_unchunked(case):
    logits, target, V = case
    a = vocab_parallel_token_logprobs(logits, target, valid_vocab_size=V, compute_entropy=True, chunk_size=3)
    b = vocab_parallel_token_logprobs(logits, target, valid_vocab_size=V, compute_entropy=True, chunk_size=None)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)


def test_auto_chunk_is_bounded_by_bytes_and_matches_unchunked(case, monkeypatch):
    import megatron_opd.logprobs as lp_mod

    assert auto_chunk_size(151_936) == 8 * 2**20 // (4 * 151_936)  # 13 tokens of a Qwen3 vocab (CPU)
    assert auto_chunk_size(151_936, fused_chunk_bytes(151_936, 2560)) == 883  # fused: capped at 512 MiB
    assert fused_chunk_bytes(32_000, 512) == 2 * 32_000 * 512  # half the fp32 weight -> 256 tokens
    assert auto_chunk_size(10**12) == 1  # never zero
    logits, target, V = case
    seen = []
    real = lp_mod._chunk_stats
    monkeypatch.setattr(lp_mod, "_chunk_stats", lambda x, *a, **k: seen.append(x.shape[0]) or real(x, *a, **k))
    monkeypatch.setattr(lp_mod, "DEFAULT_CHUNK_BYTES", 4 * logits.shape[-1] * 2)  # budget: 2 tokens
    a = vocab_parallel_token_logprobs(logits, target, valid_vocab_size=V, compute_entropy=True)
    assert max(seen) == 2 and len(seen) == math.ceil(target.numel() / 2)
    b = vocab_parallel_token_logprobs(logits, target, valid_vocab_size=V, compute_entropy=True, chunk_size=None)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)


def test_fused_equals_unfused_values_and_grads():
    torch.manual_seed(1)
    V, Vpad, H = 50, 64, 12
    hidden = torch.randn(4, 6, H, requires_grad=True)
    weight = torch.randn(Vpad, H, requires_grad=True)
    target = torch.randint(0, V, (4, 6))
    g = torch.randn(4, 6)
    lp, ent = fused_lm_head_token_logprobs(hidden, weight, target, valid_vocab_size=V, compute_entropy=True, chunk_size=5)
    gh, gw = torch.autograd.grad((lp * g + ent).sum(), [hidden, weight])
    lp2, ent2 = vocab_parallel_token_logprobs(hidden @ weight.t(), target, valid_vocab_size=V, compute_entropy=True)
    gh2, gw2 = torch.autograd.grad((lp2 * g + ent2).sum(), [hidden, weight])
    torch.testing.assert_close(lp, lp2, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent2, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, gh2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw2, atol=1e-5, rtol=1e-5)


def test_no_grad_path_builds_no_graph(case):
    logits, target, V = case
    x = logits.clone().requires_grad_()
    with torch.no_grad():
        lp, ent = vocab_parallel_token_logprobs(x, target, valid_vocab_size=V, compute_entropy=True)
    assert lp.grad_fn is None and not lp.requires_grad


def test_bf16_logits_reduce_in_fp32(case):
    logits, target, V = case
    lp, _ = vocab_parallel_token_logprobs(logits.bfloat16(), target, valid_vocab_size=V)
    ref, _ = dense(logits.bfloat16().float(), target, V)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=0)


def test_bad_inputs_name_the_argument(case):
    logits, target, V = case
    with pytest.raises(ValueError, match="target_ids has shape"):
        vocab_parallel_token_logprobs(logits, target[:, :2])
    with pytest.raises(ValueError, match="target_ids out of range"):
        vocab_parallel_token_logprobs(logits, target + V, valid_vocab_size=V)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_token_logprobs(logits, target, chunk_size=0)
    with pytest.raises(ValueError, match="'auto' or None"):
        vocab_parallel_token_logprobs(logits, target, chunk_size="big")
    with pytest.raises(ValueError, match="lm_head_weight has shape"):
        fused_lm_head_token_logprobs(torch.randn(3, 8), torch.randn(10, 9), torch.zeros(3, dtype=torch.long))


@pytest.mark.skipif(torch.cuda.is_available(), reason="where CUDA and TE exist, fp8=True is allowed")
def test_fp8_without_transformer_engine_is_refused():
    with pytest.raises(ValueError, match="fp8"):
        fused_lm_head_token_logprobs(torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long), fp8=True)


class Fp32WeightSized(TorchDispatchMode):
    """Counts the distinct fp32 buffers of a given size that ops produce (in-place updates of one
    buffer count once)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.buffers = numel, set()

    @property
    def count(self):
        return len(self.buffers)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() == self.numel:
                self.buffers.add(t.untyped_storage().data_ptr())
        return out


def test_bf16_lm_head_matches_fp32_and_never_copies_the_shard_to_fp32():
    """bf16 hidden states and LM-head shard: log-probs and gradients within bf16 rounding of the fp32
    computation on the same (bf16-representable) values, and the backward's GEMMs run in bf16: the only
    fp32 tensor of the shard's size is the one gradient accumulator, whatever the number of chunks
    (casting the shard per chunk made 2 more per chunk)."""
    torch.manual_seed(3)
    V, Vpad, H, chunk = 500, 512, 64, 8
    hidden = (torch.randn(32, H) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(Vpad, H) * 0.2).bfloat16().requires_grad_()
    target = torch.randint(0, V, (32,))
    g = torch.randn(32)
    with Fp32WeightSized(Vpad * H) as probe:
        lp, _ = fused_lm_head_token_logprobs(hidden, weight, target, valid_vocab_size=V, chunk_size=chunk)
        gh, gw = torch.autograd.grad((lp * g).sum(), [hidden, weight])
    assert probe.count == 1, probe.count
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    lp32, _ = fused_lm_head_token_logprobs(h32, w32, target, valid_vocab_size=V, chunk_size=chunk)
    gh32, gw32 = torch.autograd.grad((lp32 * g).sum(), [h32, w32])
    # bf16 logits (8 mantissa bits) at |logit| ~ 3: ~0.01 absolute; gradients relative to their scale
    assert (lp.float() - lp32).abs().max() < 0.05
    for a, b in ((gh, gh32), (gw, gw32)):
        assert ((a.float() - b).abs().max() / b.abs().max()) < 2e-2


def test_tp2_logprobs_entropy_and_grads_equal_tp1():
    out = run_ranks(Path(__file__).parent / "workers" / "logprobs_tp.py", 2)
    assert out.count('"rank"') == 2


@pytest.mark.gpu
def test_fp8_lm_head_close_to_bf16():
    torch.manual_seed(0)
    hidden = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16) * 0.05
    target = torch.randint(0, 1000, (64,), device="cuda")
    a, _ = fused_lm_head_token_logprobs(hidden, weight, target, valid_vocab_size=1000, fp8=True)
    b, _ = fused_lm_head_token_logprobs(hidden, weight, target, valid_vocab_size=1000, fp8=False)
    assert (a - b).abs().max() < 0.25
