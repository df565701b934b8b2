"""Worker (run under torchrun): forward+backward of a sharded student equals the TP=1/PP=1 result.

Writes (rank 0) the loss and every gradient, gathered to HF names through the shared mapping, to
--out; then takes a Megatron optimizer step and checks the student changed while a frozen teacher
holds no grads and no optimizer state.
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
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_opd import parallel
    from megatron_opd.models.builder import build_gpt_model
    from megatron_opd.batching import ForwardBatch
    from megatron_opd.models.forward import run_micro_batches
    from megatron_opd.models.hf_mapping import HFCheckpoint, export_hf_weights, load_hf_into_megatron
    from megatron_opd.models.student import OptimConfig, build_optimizer, wrap_ddp

    pcfg = parallel.ParallelConfig(args.tp, args.pp)
    parallel.initialize(pcfg)
    ckpt = HFCheckpoint(args.ckpt)
    spec = ckpt.spec()
    student = build_gpt_model(spec, pcfg, role="student")
    load_hf_into_megatron(student, spec, ckpt)
    student = wrap_ddp(student)
    teacher = build_gpt_model(spec, pcfg, role="teacher")
    load_hf_into_megatron(teacher, spec, ckpt)
    optimizer, scheduler = build_optimizer(student, OptimConfig(lr=1e-2, clip_grad=0.0), 10)

    torch.manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (4, 10))
    mask = torch.ones(4, 9)
    mask[1, 6:] = 0  # unequal lengths across micro-batches
    mask[3, 3:] = 0
    total_tokens = mask.sum()
    micro = [ForwardBatch(input_ids=ids[i : i + 2], mask=mask[i : i + 2]) for i in (0, 2)]

    def loss_fn(mb, logits):  # logits [b, s, V/tp]
        nll = vocab_parallel_cross_entropy(
            logits[:, :-1].transpose(0, 1).contiguous().float(), mb.input_ids[:, 1:].t().contiguous()
        ).t()  # [b, s-1]
        loss = (nll * mb.mask).sum() / total_tokens
        return loss, {"loss": loss.detach()}

    student.zero_grad_buffer()
    optimizer.zero_grad()
    outs = run_micro_batches(student, micro, loss_fn, forward_only=False)
    loss = sum(o["loss"] for o in outs) if outs else torch.zeros(())
    # The loss lives on the last stage; bring it to rank 0.
    if args.pp > 1:
        pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
        dist.broadcast(loss, src=pp_ranks[-1], group=ps.get_pipeline_model_parallel_group())

    # Gradients as HF-named tensors: swap each parameter with its (fp32) main_grad and export.
    module = student.module
    saved = {n: p.data for n, p in module.named_parameters()}
    for _, p in module.named_parameters():
        p.data = p.main_grad.to(p.dtype)
    grads = {}
    for bucket in export_hf_weights(module, spec):
        grads.update({n: t.clone() for n, t in bucket})
    for n, p in module.named_parameters():
        p.data = saved[n]

    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    success, grad_norm, _ = optimizer.step()
    scheduler.step(1)
    assert success, "optimizer step failed"
    changed = sum(int(not torch.equal(before[n], p)) for n, p in module.named_parameters())
    assert changed == len(before), f"only {changed}/{len(before)} student tensors changed"
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not hasattr(teacher, "main_grad") and all(not hasattr(p, "main_grad") for p in teacher.parameters())
    opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in teacher.parameters()), "teacher in optimizer"
    if dist.get_rank() == 0:
        torch.save({"loss": loss.item(), "grads": grads, "grad_norm": float(grad_norm)}, args.out)
        print(json.dumps({"loss": loss.item(), "grad_norm": float(grad_norm), "changed": changed}))
    parallel.destroy()


if __name__ == "__main__":
    main()
