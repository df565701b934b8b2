"""Worker (torchrun): one step of objective.gopd.estimator=full (or topk) through the trainer's own score
and update, without a rollout engine, against two dense references (rank 0 prints one JSON line):

- the same step with the KL computed densely: both models' logits all-gathered over TP to the whole
  vocabulary, log_softmax, KL, autograd (loss and every gradient of the student);
- the loss from transformers' own forward of the HF checkpoints (float64 log_softmax over the
  vocabulary at the response positions), an implementation that shares no code with ours;
- with several teachers (routed by domain), the same step with every teacher scoring every sample and
  each position keeping its own teacher's hidden states (the path where expert groups span replicas),
  and the HF reference computing every teacher's KL and selecting each sample's own.
"""

import argparse
import json
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from megatron_opd import loss as loss_mod
    from megatron_opd import parallel
    from step_parity import engine_free_trainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared test helpers
    from mopd_testing import coarsen_to_top_k

    class DenseKL(loss_mod.GOPDObjective):
        """The exact KL with [n, V] logits materialised and autograd through log_softmax."""

        def _exact_kl_loss(self, mb, out):
            from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                                gather_from_tensor_model_parallel_region)

            def full_logits(hidden, weight):  # [n, V] (valid vocabulary only), autograd across TP
                # megatron's ColumnParallelLinear: identity forward, all-reduced input gradient
                local = copy_to_tensor_model_parallel_region(hidden) @ weight.t()  # [n, V/tp]
                return gather_from_tensor_model_parallel_region(local)[:, :self.vocab_size].double()

            z_s = full_logits(out.hidden, out.lm_head)  # [n, V]
            if mb.teacher_positions:  # several teachers: each position's teacher's logits, put in place
                z_t = torch.zeros_like(z_s)
                for h, w, pos in zip(mb.teacher_hidden, mb.teacher_lm_head, mb.teacher_positions):
                    if h is not None:
                        z_t = z_t.index_copy(0, pos, full_logits(h, w))
            else:
                z_t = full_logits(mb.teacher_hidden[0], mb.teacher_lm_head[0])
            ls, lt = z_s.log_softmax(-1), z_t.log_softmax(-1)
            if self.cfg.top_k is not None:  # the teacher's top-k and one tail bucket
                ls, lt = coarsen_to_top_k(ls, lt, self.cfg.top_k)
            log_p, log_q = (ls, lt) if self.cfg.direction == "reverse" else (lt, ls)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1).float()  # [n]
            mask = mb.mask.bool()
            per_token = torch.zeros(mask.shape, dtype=kl.dtype).masked_scatter(mask, kl)
            m = mask.float()
            return loss_mod.aggregate_loss(per_token, m, self.cfg.loss_agg_mode, mb.global_tokens,
                                           mb.global_seqs), {}

    tr, captured = engine_free_trainer(args.config, args.overrides)
    cfg = tr.cfg
    try:
        batch, _ = tr.rollout()

        def run(route=True):
            micro = tr.micro_batches(batch)
            span = tr.experts_span_replicas
            tr.experts_span_replicas = not route  # every teacher scores every sample where groups span
            micro, _ = tr.score(micro)
            tr.experts_span_replicas = span
            metrics = tr.update(micro)
            return metrics.get("loss"), captured["grads"].clone(), tr.teacher_sequences

        def rel(a, b):
            return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

        loss_ours, grads_ours, sequences = run()
        loss_unrouted, grads_unrouted, sequences_unrouted = run(route=False)
        ours = tr.objective
        tr.objective = DenseKL(ours.cfg, parallel.tp_group(), ours.vocab_size)
        loss_dense, grads_dense, _ = run()
        t = torch.tensor([rel(grads_ours, grads_dense), rel(grads_ours, grads_unrouted)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            from transformers import AutoModelForCausalLM

            def hf_logprobs(path):  # [B, S-1, V] float64
                model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
                with torch.no_grad():
                    return model(input_ids=batch.input_ids).logits[:, :-1].double().log_softmax(-1)

            ls = hf_logprobs(cfg.student.checkpoint)
            each = torch.stack([hf_logprobs(t.checkpoint) for t in cfg.teachers])  # [K, B, S-1, V]
            lt = each[batch.teacher_index, torch.arange(each.shape[1])]  # each sample's own teacher
            settings = cfg.objective.settings
            if settings.top_k is not None:  # [B, S-1, V] -> [B, S-1, k + 1]: top-k and the tail bucket
                shape = ls.shape
                ls, lt = coarsen_to_top_k(ls.reshape(-1, shape[-1]), lt.reshape(-1, shape[-1]), settings.top_k)
                ls, lt = ls.reshape(*shape[:-1], -1), lt.reshape(*shape[:-1], -1)
            log_p, log_q = (ls, lt) if settings.direction == "reverse" else (lt, ls)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, S-1]
            mask = batch.response_mask.double()
            loss_hf = float((kl * mask).sum() / mask.sum())
            print(json.dumps({"exact_kl": {
                "loss": loss_ours, "loss_dense": loss_dense, "loss_hf": loss_hf, "loss_unrouted": loss_unrouted,
                "grad_rel": t[0].item(), "routed_vs_all_grad": t[1].item(),
                "grad_max": grads_dense.abs().max().item(), "tokens": int(mask.sum()),
                "teacher_index": batch.teacher_index.tolist(), "sequences": sequences,
                "sequences_unrouted": sequences_unrouted}}), flush=True)
    finally:
        tr.cleanup()


if __name__ == "__main__":
    main()
