"""Worker (run under torchrun): load a HF checkpoint into a sharded Megatron model and compare.

Modes:
  logits  - Megatron logits (gathered over TP, valid vocab) equal transformers' to --atol.
  export  - exporting the sharded model reproduces every HF tensor exactly.
"""

import argparse
import json

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--mode", default="logits")
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps

    from megatron_opd import parallel
    from megatron_opd.models.builder import build_gpt_model
    from megatron_opd.batching import ForwardBatch
    from megatron_opd.models.forward import run_micro_batches
    from megatron_opd.models.hf_mapping import HFCheckpoint, export_hf_weights, load_hf_into_megatron

    pcfg = parallel.ParallelConfig(args.tp, args.pp, args.ep)
    parallel.initialize(pcfg)
    ckpt = HFCheckpoint(args.ckpt)
    spec = ckpt.spec()
    model = build_gpt_model(spec, pcfg, role="teacher")
    load_hf_into_megatron(model, spec, ckpt)

    if args.mode == "logits":
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        ids = torch.randint(0, spec.vocab_size, (2, 12))
        got = []

        def loss_fn(mb, logits):  # [b, s, V/tp]
            shards = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
            got.append(torch.cat(shards, dim=-1)[..., : spec.vocab_size])
            return logits.sum() * 0, {}

        run_micro_batches(model, [ForwardBatch(input_ids=ids)], loss_fn, forward_only=True)
        if ps.is_pipeline_last_stage():
            hf = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
            with torch.no_grad():
                ref = hf(ids).logits
            err = (got[0] - ref).abs().max().item()
            print(json.dumps({"rank": dist.get_rank(), "max_abs_err": err}), flush=True)
            assert err <= args.atol, f"logits differ by {err} > {args.atol}"
    elif args.mode == "export":
        from megatron_opd.models.hf_mapping import bucket_plan, replica_leaders

        # Count the export's tensor collectives: one per bucket and kind of sharding, not per parameter.
        calls = {"n": 0}
        originals = {}
        for fn in ("all_gather", "all_gather_into_tensor", "broadcast", "send", "recv"):
            originals[fn] = getattr(dist, fn)

            def counted(*a, _fn=originals[fn], **k):
                calls["n"] += 1
                return _fn(*a, **k)

            setattr(dist, fn, counted)
        receivers = replica_leaders()
        exported, buckets = {}, 0
        for bucket in export_hf_weights(model, spec, bucket_bytes=64 * 1024, receivers=receivers):
            buckets += 1
            for name, t in bucket:
                assert name not in exported, f"{name} exported twice"
                exported[name] = t.clone()
        for fn, original in originals.items():
            setattr(dist, fn, original)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, calls["n"])
        params = sum(len(bucket) for bucket in bucket_plan(spec, args.pp, 64 * 1024, 4))
        if dist.get_rank() == 0:
            print(json.dumps({"collectives_per_rank": per_rank, "buckets": buckets, "parameters": params}),
                  flush=True)
            keys = set(ckpt.keys())
            assert set(exported) == keys, (sorted(keys - set(exported)), sorted(set(exported) - keys))
            for name in keys:
                assert torch.equal(exported[name], ckpt.get(name)), f"{name} differs after export"
            print(json.dumps({"exported": len(exported)}), flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
