"""Worker: precision.recompute=selective (megatron-core's core-attention recompute) gives the same
gradients as keeping the attention activations (one process, local spec)."""

import json

import torch


def main():
    from megatron_opd import parallel
    from megatron_opd.models.builder import PrecisionConfig, build_gpt_model
    from megatron_opd.batching import ForwardBatch
    from megatron_opd.models.forward import run_micro_batches
    from megatron_opd.models.student import wrap_ddp
    from megatron_opd.models.spec import ModelSpec

    parallel.initialize(parallel.ParallelConfig(), seed=0)
    from pathlib import Path

    spec = ModelSpec.from_yaml(Path(__file__).resolve().parents[3] / "configs" / "models" / "tiny_qwen3.yaml")
    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    # Count the core-attention forwards: selective recompute runs each layer's again in backward.
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    calls = {"n": 0}
    real_forward = DotProductAttention.forward

    def counted(self, *a, **k):
        calls["n"] += 1
        return real_forward(self, *a, **k)

    DotProductAttention.forward = counted
    grads, modes, attention_calls = [], [], []
    for recompute in (None, "selective"):
        calls["n"] = 0
        torch.manual_seed(0)
        model = wrap_ddp(build_gpt_model(spec, parallel.ParallelConfig(), PrecisionConfig(recompute=recompute)))
        modes.append(model.module.config.recompute_granularity)
        model.zero_grad_buffer()
        run_micro_batches(model, [ForwardBatch(input_ids=ids)], lambda mb, logits: (logits.float().pow(2).mean(), {}),
                          forward_only=False)
        grads.append(torch.cat([b.grad_data.clone() for b in model.buffers]))
        attention_calls.append(calls["n"])
    print(json.dumps({"modes": modes, "max_diff": (grads[0] - grads[1]).abs().max().item(),
                      "grad_norm": grads[0].norm().item(), "attention_calls": attention_calls,
                      "layers": spec.num_layers}), flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
