"""Refit speed and memory: a Megatron student into a live vLLM engine, against a plain copy of the same
tensors and against the file transport the torchrun path used before (commit 81e87ef).

    .venv/bin/python benchmarks/bench_refit.py [--sizes 50m,200m] [--repeats 3]

One trainer process (TP = 1, fp32), three engines in turn:
- in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, single-process runs): the transport slots are
  handed over as tensors;
- engine-core subprocess (the path every torchrun job takes): the slots are shared-memory tensors whose
  handles the worker maps once (rollout/transport.py), bucket k loading while bucket k+1 is packed;
- transport: the subprocess path with vLLM's part taken out — the worker maps the slots at the start
  (`_map_slots`, instead of starting vLLM's layer-wise reload), reads every byte of each bucket's views
  instead of loading them (`_touch_bucket`) and finalises nothing: export + checks + packing +
  hand-over;
- the baseline: the same subprocess engine fed the way it was before — every bucket exported and
  written to a /dev/shm safetensors file, the whole model staged, then one `reload_weights` reading
  them — driven from here through `collective_rpc` with a function (the project no longer ships it).
The copy baseline copies every HF-named tensor into preallocated buffers (`dst.copy_(src)`): the
memory traffic any refit must do at least once.

Ends with `name: value` lines, for the largest size:
- refit_rate_ratio_vs_copy: in-process refit, whole (vLLM's own load included);
- refit_transport_rate_ratio_vs_copy: the transport mode's rate against the copy;
- refit_peak_extra_mib: the peak rise of the machine's used memory (total - available, which counts
  /dev/shm) during the subprocess path's first refit, slots included; refit_peak_extra_bound_mib is
  two slots plus the engine's weights; refit_files_peak_extra_mib the same for the file baseline;
- refit_subprocess_time_ratio_vs_files: the subprocess path's refit time / the file baseline's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

SIZES = {  # ~parameters with the 384-token demo tokenizer's vocabulary padded to 512
    "50m": dict(hidden_size=512, num_layers=14, num_attention_heads=8, num_query_groups=4, head_dim=64,
                ffn_hidden_size=1536),
    "200m": dict(hidden_size=1024, num_layers=14, num_attention_heads=16, num_query_groups=8, head_dim=64,
                 ffn_hidden_size=3072),
}


def _reload_files(worker, paths):
    """The file transport's worker side, as the project had it (baseline only)."""
    from safetensors import safe_open

    def tensors():
        for path in paths:
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    worker.model_runner.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
    return len(paths)


def _map_slots(worker, handles):
    """Transport mode's refit start: map the trainer's slots, start no reload."""
    from megatron_opd.rollout.transport import open_handle

    worker._mopd_slots = [open_handle(h) for h in handles]


def _touch_bucket(worker, index, rows):
    """Transport mode's worker side: read every byte of the bucket's views, load nothing."""
    from megatron_opd.rollout.transport import slot_views

    return sum(float(t.sum()) for _, t in slot_views(worker._mopd_slots[index], rows))


def files_refit(engine, model, spec, bucket_mb: float, shm_dir: str) -> float:
    """The baseline: buckets to /dev/shm files (all staged), one reload, prefix-cache reset."""
    from safetensors.torch import save_file

    from megatron_opd.models.hf_mapping import export_hf_weights

    t0 = time.perf_counter()
    paths = []
    for k, bucket in enumerate(export_hf_weights(model, spec, bucket_bytes=int(bucket_mb * 2**20))):
        path = os.path.join(shm_dir, f"bucket_{k:05d}.safetensors")
        save_file({n: t.contiguous() for n, t in bucket}, path)
        paths.append(path)
    engine.llm.collective_rpc(_reload_files, args=(paths,))
    engine.reset_prefix_cache()
    for p in paths:
        os.unlink(p)
    return time.perf_counter() - t0


class PeakMemory:
    """Samples the machine's used memory (total - available: process memory and /dev/shm) every 5 ms."""

    def __enter__(self):
        import psutil

        self._vm = psutil.virtual_memory
        self.base = self._used()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _used(self) -> int:
        vm = self._vm()
        return vm.total - vm.available

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._used())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def bench(size: str, repeats: int, workdir: str, mode: str) -> dict:
    import torch

    from megatron_opd import parallel
    from megatron_opd.config import RolloutConfig
    from megatron_opd.data.tokenizer import train_tokenizer
    from megatron_opd.models.builder import build_gpt_model
    from megatron_opd.models.hf_mapping import bucket_bytes_of, bucket_plan, export_hf_weights, load_hf_into_megatron
    from megatron_opd.models.hf_tiny import save_tiny_checkpoint
    from megatron_opd.models.spec import ModelSpec
    from megatron_opd.rollout.engine import RolloutEngine
    from megatron_opd.rollout.refit import refit
    from megatron_opd.rollout.transport import slot_bytes

    tok = os.path.join(workdir, "tok")
    if not os.path.isdir(tok):
        train_tokenizer(tok)
    spec = ModelSpec(name=f"bench-{size}", architecture="qwen3", vocab_size=512, rope_theta=10000.0,
                     max_position_embeddings=256, **SIZES[size])
    ckpt = os.path.join(workdir, size)
    if not os.path.isdir(ckpt):
        ckpt = save_tiny_checkpoint(spec, ckpt, tokenizer_dir=tok)
    pcfg = parallel.ParallelConfig()
    parallel.initialize(pcfg)
    model = build_gpt_model(spec, pcfg, role="teacher")
    load_hf_into_megatron(model, spec, ckpt)
    bucket_mb = 256
    if mode in ("files", "transport"):
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # these modes send a function
    engine = RolloutEngine(RolloutConfig(max_new_tokens=4, max_model_len=128), ckpt, in_process=(mode == "inproc"))
    if mode == "transport":
        def touch(bucket, layout):
            index = bucket % len(engine._slots)
            engine._loads[index] = engine._loader.submit(
                engine.llm.collective_rpc, _touch_bucket, args=(index, [s.as_tuple() for s in layout]))

        engine.load_bucket = touch
        rpc = engine.llm.collective_rpc
        vllm_part = {"megatron_opd_refit_begin": _map_slots, "megatron_opd_refit_end": lambda worker: None}
        engine.llm.collective_rpc = lambda method, *a, **k: rpc(vllm_part.get(method, method), *a, **k)
    tensors = [t.clone() for b in export_hf_weights(model, spec) for _, t in b]
    buffers = [torch.empty_like(t) for t in tensors]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    plan = bucket_plan(spec, 1, bucket_mb * 2**20, 4)
    slots = (1 if len(plan) == 1 or mode == "inproc" else 2) * slot_bytes([[b for _, b in bucket_bytes_of(spec, bucket, 4)] for bucket in plan])
    copy_s, refit_s, wait_s, peak = [], [], [], None
    shm = tempfile.mkdtemp(prefix="mopd_bench_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    for i in range(repeats):
        t0 = time.perf_counter()
        for d, s in zip(buffers, tensors):
            d.copy_(s)
        copy_s.append(time.perf_counter() - t0)
        with PeakMemory() as mem:
            if mode == "files":
                refit_s.append(files_refit(engine, model, spec, bucket_mb, shm))
                wait_s.append(0.0)
            else:
                stats = refit(engine, model, spec, bucket_mb=bucket_mb)
                refit_s.append(stats.seconds)
                wait_s.append(stats.load_seconds)
        if i == 0:
            peak = mem.extra_mib  # the first refit allocates the slots: counted
    engine.shutdown()
    os.rmdir(shm)
    parallel.destroy()
    best = min(range(repeats), key=refit_s.__getitem__)
    return {"params": spec.num_parameters(), "bytes": nbytes, "copy_s": min(copy_s), "refit_s": refit_s[best],
            "wait_s": wait_s[best], "peak_extra_mib": peak, "slot_mib": slots / 2**20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="50m,200m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="inproc,subprocess,transport,files")
    args = ap.parse_args()
    lines = {}
    with tempfile.TemporaryDirectory() as work:
        for size in args.sizes.split(","):
            r = {mode: bench(size, args.repeats, work, mode)
                 for mode in args.modes.split(",")}
            mib = next(iter(r.values()))["bytes"] / 2**20
            for mode, x in r.items():
                print(f"{size} {mode}: {x['params'] / 1e6:.0f}M params, {mib:.0f} MiB, refit {x['refit_s']:.3f} s, "
                      f"waiting for vLLM's load {x['wait_s']:.3f} s, copy {x['copy_s']:.3f} s, peak extra "
                      f"memory {x['peak_extra_mib']:.0f} MiB (slots {x['slot_mib']:.0f} MiB)", flush=True)
                lines[f"refit_seconds_{size}_{mode}"] = x["refit_s"]
            if set(r) != {"inproc", "subprocess", "transport", "files"}:
                continue  # the ratios need every mode
            inproc, sub, files = r["inproc"], r["subprocess"], r["files"]
            lines[f"refit_rate_ratio_vs_copy_{size}"] = inproc["copy_s"] / inproc["refit_s"]
            lines[f"refit_transport_rate_ratio_vs_copy_{size}"] = r["transport"]["copy_s"] / r["transport"]["refit_s"]
            lines[f"refit_peak_extra_mib_{size}"] = sub["peak_extra_mib"]
            lines[f"refit_peak_extra_bound_mib_{size}"] = sub["slot_mib"] + mib
            lines[f"refit_files_peak_extra_mib_{size}"] = files["peak_extra_mib"]
            lines[f"refit_subprocess_time_ratio_vs_files_{size}"] = sub["refit_s"] / files["refit_s"]
            last = size
    for key in [] if not lines.get(f"refit_rate_ratio_vs_copy_{last}") else ("refit_rate_ratio_vs_copy", "refit_transport_rate_ratio_vs_copy", "refit_peak_extra_mib",
                "refit_peak_extra_bound_mib", "refit_files_peak_extra_mib", "refit_subprocess_time_ratio_vs_files"):
        lines[key] = lines[f"{key}_{last}"]
    for k, v in lines.items():
        print(f"{k}: {v:.4f}")


if __name__ == "__main__":
    main()
