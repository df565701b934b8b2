"""Runs inside vLLM's worker process (engine-core subprocess mode): receives refit buckets.

`collective_rpc` cannot carry a tensor iterator across processes, so the trainer writes each bucket to
a /dev/shm safetensors file (RAM, no disk I/O) and the worker memory-maps it.
"""

from __future__ import annotations


class WeightReceiver:
    """Mixed into vLLM's worker via `worker_extension_cls`."""

    def megatron_opd_load_file(self, path: str) -> int:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            tensors = [(name, f.get_tensor(name)) for name in f.keys()]
        self.model_runner.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        return len(tensors)
