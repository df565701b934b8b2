"""Worker (torchrun, 1 rank): count the host synchronisations of one training step's scoring and update
(the phases that run on the device), with the same batch cut into few and into many micro-batches.

A host synchronisation is any read of device data by the host: `.item()`, `.tolist()`, `bool()` /
`float()` / `int()` of a tensor, `.cpu()` / `.numpy()`, `nonzero` and boolean-mask indexing (their
output size lives on the device). They are counted with a torch-function mode over the step (on CPU
none of them waits, but the same code on a GPU would)."""

import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--micro", default="4,1", help="micro_batch_size values to compare")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    from torch.overrides import TorchFunctionMode

    from megatron_opd import checks
    from step_parity import engine_free_trainer

    class HostReads(TorchFunctionMode):
        READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
                 torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
                 torch.Tensor.nonzero, torch.nonzero, torch.masked_select, torch.Tensor.masked_select}

        def __init__(self):
            super().__init__()
            self.count, self.where = 0, {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            read = func in self.READS
            if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                read = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
            if read:
                import traceback

                self.count += 1
                frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                              if "megatron" in f.filename and "platform/cpu.py" not in f.filename), None)
                key = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} {func.__name__}" if frame else "?"
                self.where[key] = self.where.get(key, 0) + 1
            return func(*args, **kwargs)

    def kind(where: str) -> str:
        if "megatron_opd/" in where:
            return "ours"
        # megatron's optimizer step (once per step): torch Adam's per-parameter step counter and the
        # local multi-tensor fallbacks (on GPU, TE's fused Adam and kernels read nothing per parameter)
        if "megatron/core/optimizer/" in where or "megatron/core/utils.py" in where:
            return "optimizer_step"
        # the RNG tracker compares torch.get_rng_state() tensors: host tensors on a GPU too
        if "megatron/core/tensor_parallel/random.py" in where:
            return "rng_tracker"
        return "megatron_other"

    tr, _ = engine_free_trainer(args.config, args.overrides)
    del tr.optimizer.step, tr.scheduler.step  # the real optimizer step (its reads are per step too)
    result = {}
    try:
        batch, _ = tr.rollout()
        for size in map(int, args.micro.split(",")):
            tr.cfg.train.micro_batch_size = size
            micro = tr.micro_batches(batch)  # host-side construction: before the device work
            with HostReads() as counter:
                with checks.deferred():
                    micro, _ = tr.score(micro)
                with checks.deferred():
                    tr.update(micro)
            by_kind = {"ours": 0, "optimizer_step": 0, "rng_tracker": 0, "megatron_other": 0}
            for key, n in counter.where.items():
                by_kind[kind(key)] += n
            result[str(len(micro))] = {**by_kind, "where": counter.where}
        print(json.dumps({"host_syncs": result}), flush=True)
    finally:
        tr.cleanup()


if __name__ == "__main__":
    main()
