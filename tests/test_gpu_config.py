"""The GPU configuration agrees with itself: what a GPU run with Transformer Engine would build, checked
here with the GPU answers patched in (no CUDA, no TE on these machines)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_opd import platform


@pytest.fixture
def with_te(monkeypatch):
    monkeypatch.setattr(platform, "has_transformer_engine", lambda: True)


def test_moe_under_the_te_spec_uses_grouped_gemm_and_the_alltoall_dispatcher(with_te, monkeypatch):
    """The TE layer spec builds grouped-GEMM experts (TEGroupedMLP); the TransformerConfig must say so,
    and dispatch tokens all-to-all over EP. Without TE (CPU) both stay off / all-gather."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_opd.models.builder import PrecisionConfig, layer_spec, transformer_config_kwargs
    from megatron_opd.models.spec import ModelSpec
    from megatron_opd.parallel import ParallelConfig
    from mopd_testing import REPO_ROOT

    spec = ModelSpec.from_yaml(REPO_ROOT / "configs" / "models" / "tiny_qwen3_moe.yaml")
    layout = ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2)
    te = PrecisionConfig(params_dtype="bfloat16")
    assert te.transformer_engine
    kw = transformer_config_kwargs(spec, layout, te)
    assert kw["moe_grouped_gemm"] is True and kw["moe_token_dispatcher_type"] == "alltoall"
    assert kw["bf16"] and kw["sequence_parallel"]
    asked = {}
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda **k: asked.update(k) or "te-spec")
    assert layer_spec(spec, None, te) == "te-spec" and asked["moe_grouped_gemm"] is True
    local = PrecisionConfig(use_transformer_engine=False)
    kw = transformer_config_kwargs(spec, layout, local)
    assert kw["moe_grouped_gemm"] is False and kw["moe_token_dispatcher_type"] == "allgather"


def test_precision_fp8_reaches_the_fused_lm_head(monkeypatch):
    """`precision.fp8` runs the LM-head GEMM of the sampled-token log-probs in FP8 (the fused path; with
    materialised logits megatron's output layer owns the GEMM and fp8 is refused there)."""
    from megatron_opd import logprobs
    from megatron_opd.models import forward

    assert forward.uses_fp8_lm_head("hybrid", "fused") and not forward.uses_fp8_lm_head(None, "fused")
    assert not forward.uses_fp8_lm_head("hybrid", "logits")
    calls = []
    monkeypatch.setattr(logprobs, "_transformer_engine_installed", lambda: True)
    monkeypatch.setattr(logprobs, "_te_fp8_lm_head", lambda h, w: calls.append(h.shape) or h @ w.t())
    torch.manual_seed(0)
    weight = torch.randn(32, 8)
    model = SimpleNamespace(share_embeddings_and_output_weights=False, output_layer=SimpleNamespace(weight=weight))
    from megatron_opd.batching import ForwardBatch

    mb = ForwardBatch(input_ids=torch.randint(0, 32, (2, 6)), mask=torch.tensor([[0, 0, 1, 1, 1]] * 2))
    hidden = torch.randn(2, 6, 8)
    lp, _ = forward.response_logprobs(model, hidden, mb, "fused", fp8=True)
    assert calls and sum(c[0] for c in calls) == 6  # the 6 response positions went through the FP8 GEMM
    ref, _ = forward.response_logprobs(model, hidden, mb, "fused", fp8=False)
    torch.testing.assert_close(lp, ref)
    with pytest.raises(ValueError, match="fused path"):
        forward.response_logprobs(model, hidden @ weight.t(), mb, "logits", fp8=True)


def test_offloaded_models_reuse_one_pinned_host_buffer_per_tensor():
    """Offloading a frozen model every step pins its host copy once: later offloads copy into it."""
    allocations = []

    def allocate(shape, dtype):
        allocations.append(shape)
        return torch.empty(shape, dtype=dtype)

    t = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)
    for step in range(3):
        on_device = torch.randn(4, 3)  # what onload would have put there
        t.data = on_device
        platform.park_in_host(t, allocate)
        assert torch.equal(t.data, on_device) and t.data.data_ptr() != on_device.data_ptr()
    assert allocations == [torch.Size([4, 3])]
