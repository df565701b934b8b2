"""Worker: the peak memory of one OPD train phase (teacher scoring, student forward + backward through
the trainer's log-prob path, optimizer step) against `tools.estimate_memory`'s train-phase prediction.

One process, world size 1, fp32 or bf16 (--dtype), local spec (unfused attention): the CPU counterpart of one GPU's
training phase. Peak = the process's VmHWM after the phase minus its RSS before any model exists
(Linux: writing 5 to /proc/self/clear_refs resets VmHWM), so the Python / torch / megatron-core
baseline the estimator does not price is excluded.

    python tests/tools/workers/peak_memory.py --hidden 512 --layers 4 --vocab 16384 --seq 256 --batch 2
"""

import argparse
import gc
import json
import re


def _status_kib(field: str) -> int:
    text = open("/proc/self/status").read()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    import torch

    from megatron_opd import parallel
    from megatron_opd.logprobs import DEFAULT_CHUNK_BYTES, vocab_parallel_token_logprobs
    from megatron_opd.models.builder import PrecisionConfig, build_gpt_model
    from megatron_opd.batching import ForwardBatch
    from megatron_opd.models.forward import run_micro_batches
    from megatron_opd.models.spec import ModelSpec
    from megatron_opd.models.student import OptimConfig, build_optimizer, wrap_ddp
    from tools.estimate_memory import estimate_memory

    torch.set_num_threads(1)
    head_dim = args.hidden // args.heads
    spec = ModelSpec(name="mem", architecture="qwen3", vocab_size=args.vocab, hidden_size=args.hidden,
                     num_layers=args.layers, num_attention_heads=args.heads, num_query_groups=args.heads // 2,
                     head_dim=head_dim, ffn_hidden_size=3 * args.hidden, rope_theta=10000.0,
                     norm_epsilon=1e-6, tie_word_embeddings=False, max_position_embeddings=args.seq)
    pcfg = parallel.ParallelConfig()
    parallel.initialize(pcfg, seed=0)
    precision = PrecisionConfig(params_dtype=args.dtype, use_transformer_engine=False)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    mb = ForwardBatch(input_ids=ids, mask=torch.ones(ids.shape[0], ids.shape[1] - 1))

    gc.collect()
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS

    teacher = build_gpt_model(spec, pcfg, precision, role="teacher")
    student = wrap_ddp(build_gpt_model(spec, pcfg, precision, role="student"))
    optimizer, _ = build_optimizer(student, OptimConfig(lr=1e-4, lr_warmup_steps=0), total_steps=10)

    def logprobs(mb, logits):  # the trainer's path: [b, s, V/tp] logits -> token log-probs
        lp, _ = vocab_parallel_token_logprobs(logits[:, :-1], mb.input_ids[:, 1:], valid_vocab_size=args.vocab)
        return lp.float().mean(), {"lp": lp.detach()}

    with torch.no_grad():
        run_micro_batches(teacher, [mb], logprobs, forward_only=True)  # score
    student.zero_grad_buffer()
    run_micro_batches(student, [mb], logprobs, forward_only=False)  # update
    optimizer.step()
    peak = _status_kib("VmHWM") - baseline

    est = estimate_memory(spec, [spec], tp=1, pp=1, ep=1, dtype=args.dtype, micro_batch=args.batch,
                          seq_len=args.seq, attention="unfused",
                          chunk_budget_bytes=DEFAULT_CHUNK_BYTES)
    print(json.dumps({"measured_gib": peak / 2**20, "predicted_gib": est["train_phase"],
                      "components": {k: v for k, v in est.items()}}), flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
