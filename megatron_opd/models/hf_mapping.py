"""Hugging Face <-> Megatron-Core weight mapping for Qwen3 (dense) and Qwen3-MoE, with TP/PP/EP slicing.

One mapping serves three users: loading HF checkpoints into sharded Megatron models, the conversion
tools, and the live vLLM refit (which streams HF-named tensors into the engine).

Layout facts this module encodes (megatron-core 0.16, local and TE layer specs):
- `linear_qkv` rows are grouped per KV group g: [q heads of g | k_g | v_g]; TP splits whole groups.
- `linear_fc1` on each TP rank is [gate shard | up shard] (gated MLP), so gate/up are sliced first and
  concatenated per rank.
- Column-parallel weights (qkv, fc1, embedding, output layer) split dim 0; row-parallel (proj, fc2)
  split dim 1; norms and the MoE router are replicated.
- The vocabulary is padded to `spec.padded_vocab_size(tp)`; padded rows are zero on load and dropped
  on export.
- MoE experts: local expert j on EP rank e is global expert e * (E / ep) + j; expert weights are
  TP-split over the expert-tensor-parallel group.

We own this mapping instead of building on mbridge: mbridge 0.15 needs five workarounds here (TE spec
assumptions, transformers-5 config names, norm renames, CUDA calls) and does not stream bounded
buckets for refit; the mapping itself is this one table.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_opd.models.spec import ModelSpec


# -------------------------------------------------------------------------------------------------
# HF checkpoint access (lazy, safetensors)
# -------------------------------------------------------------------------------------------------
class HFCheckpoint:
    """Read-only view of a HF safetensors checkpoint directory (single file or sharded index).

    `role` names the config field it came from (`teachers[0].checkpoint`) in every error: a missing or
    Megatron-format directory, an unreadable (truncated) file, and tensors with NaN or inf values, which
    `get` refuses (vLLM would start on them and fail only at the first rollout)."""

    def __init__(self, path: str | Path, role: str = "HF checkpoint"):
        from safetensors import safe_open

        self.path = Path(path)
        self.role = role
        if not self.path.is_dir():
            raise FileNotFoundError(f"{role}: HF checkpoint directory {self.path} does not exist")
        index = self.path / "model.safetensors.index.json"
        self._safe_open = safe_open
        self._handles = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{role}: no *.safetensors files in {self.path}{_megatron_hint(self.path)}")
            weight_map = {}
            for f in files:
                weight_map.update({k: f.name for k in self._open(f.name).keys()})
        self._weight_map = weight_map

    def _open(self, fname: str):
        if fname not in self._handles:
            from safetensors import SafetensorError

            try:
                self._handles[fname] = self._safe_open(str(self.path / fname), "pt")
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{self.role}: {self.path / fname} is not a readable safetensors file "
                                 f"({str(exc).splitlines()[0][:160]}): the file is damaged or truncated; copy "
                                 "or convert it again") from None
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def _handle(self, name: str):
        return self._open(self._weight_map[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self._weight_map:
            raise KeyError(f"tensor {name!r} missing from HF checkpoint {self.path}")
        tensor = self._handle(name).get_tensor(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{self.role}: tensor {name} in {self.path / self._weight_map[name]} has {bad} NaN or "
                             "inf value(s): the checkpoint is damaged; copy or convert it again")
        return tensor

    def spec(self) -> ModelSpec:
        return ModelSpec.from_hf_config(self.path)


def _megatron_hint(path: Path) -> str:
    """How to turn a Megatron checkpoint (a run's checkpoints/ or one step of it) into a HF directory."""
    marks = ("latest", "meta.json", "metadata.json", "checkpoints")
    if any((path / m).exists() for m in marks) or any(path.glob("step_*")):
        return (f": it is a Megatron checkpoint or run; convert it with `python -m tools.convert_megatron_to_hf "
                f"--megatron {path} --out <dir>` and give that directory")
    return ""


# -------------------------------------------------------------------------------------------------
# The mapping table
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamRule:
    """How one Megatron parameter corresponds to one or more HF tensors."""

    megatron: str
    """Megatron name template; `{layer}` is the *global* layer index, `{expert}` the global expert."""

    hf: tuple[str, ...]
    """HF name templates, in the order `kind` fuses them."""

    kind: str
    """"replicated", "column" (TP dim 0), "row" (TP dim 1), "vocab" (dim 0, padded), "qkv", "gate_up"."""

    per_layer: bool = True
    per_expert: bool = False


_ATTN = [
    ParamRule("decoder.layers.{layer}.input_layernorm.weight",
              ("model.layers.{layer}.input_layernorm.weight",), "replicated"),
    ParamRule("decoder.layers.{layer}.self_attention.linear_qkv.weight",
              ("model.layers.{layer}.self_attn.q_proj.weight",
               "model.layers.{layer}.self_attn.k_proj.weight",
               "model.layers.{layer}.self_attn.v_proj.weight"), "qkv"),
    ParamRule("decoder.layers.{layer}.self_attention.q_layernorm.weight",
              ("model.layers.{layer}.self_attn.q_norm.weight",), "replicated"),
    ParamRule("decoder.layers.{layer}.self_attention.k_layernorm.weight",
              ("model.layers.{layer}.self_attn.k_norm.weight",), "replicated"),
    ParamRule("decoder.layers.{layer}.self_attention.linear_proj.weight",
              ("model.layers.{layer}.self_attn.o_proj.weight",), "row"),
    ParamRule("decoder.layers.{layer}.pre_mlp_layernorm.weight",
              ("model.layers.{layer}.post_attention_layernorm.weight",), "replicated"),
]
_DENSE_MLP = [
    ParamRule("decoder.layers.{layer}.mlp.linear_fc1.weight",
              ("model.layers.{layer}.mlp.gate_proj.weight",
               "model.layers.{layer}.mlp.up_proj.weight"), "gate_up"),
    ParamRule("decoder.layers.{layer}.mlp.linear_fc2.weight",
              ("model.layers.{layer}.mlp.down_proj.weight",), "row"),
]
_MOE_MLP = [
    ParamRule("decoder.layers.{layer}.mlp.router.weight",
              ("model.layers.{layer}.mlp.gate.weight",), "replicated"),
    ParamRule("decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
              ("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
               "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"), "gate_up", per_expert=True),
    ParamRule("decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc2.weight",
              ("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",), "row", per_expert=True),
]
_EMBEDDING = ParamRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab",
                       per_layer=False)
_FINAL_NORM = ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated",
                        per_layer=False)
_OUTPUT = ParamRule("output_layer.weight", ("lm_head.weight",), "vocab", per_layer=False)

# Transformer Engine's layer spec fuses the pre-attention / pre-MLP norms into the next linear, and its
# grouped-GEMM experts (TEGroupedMLP) hold expert j's weight as `experts.linear_fcN.weight{j}` instead
# of the local spec's `experts.local_experts.{j}.linear_fcN.weight`. Same shapes, same sharding.
_TE_RENAMES = [
    (re.compile(r"\.self_attention\.linear_qkv\.layer_norm_weight$"), ".input_layernorm.weight"),
    (re.compile(r"\.mlp\.linear_fc1\.layer_norm_weight$"), ".pre_mlp_layernorm.weight"),
    (re.compile(r"\.mlp\.experts\.linear_fc([12])\.weight(\d+)$"), r".mlp.experts.local_experts.\2.linear_fc\1.weight"),
]


def canonical_name(name: str) -> str:
    """A parameter name of either layer spec (local or Transformer Engine) in the local spec's terms."""
    for pattern, local in _TE_RENAMES:
        name = pattern.sub(local, name)
    return name


def layer_rules(spec: ModelSpec) -> list[ParamRule]:
    return _ATTN + (_MOE_MLP if spec.is_moe else _DENSE_MLP)


def hf_tensor_names(spec: ModelSpec) -> list[str]:
    """Every tensor name a HF checkpoint of `spec` holds (checkpoint format, per-expert names)."""
    names = list(_EMBEDDING.hf)
    for layer in range(spec.num_layers):
        for rule in layer_rules(spec):
            experts = range(spec.num_experts) if rule.per_expert else [None]
            for e in experts:
                names += [h.format(layer=layer, expert=e) for h in rule.hf]
    names += list(_FINAL_NORM.hf)
    if not spec.tie_word_embeddings:
        names += list(_OUTPUT.hf)
    return names


def hf_tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor of `spec` (used to validate checkpoints and refits)."""
    h, d = spec.hidden_size, spec.head_dim
    shapes = {}
    for name in hf_tensor_names(spec):
        suffix = name.split(".")[-2]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape = (spec.vocab_size, h)
        elif suffix in ("input_layernorm", "post_attention_layernorm", "norm"):
            shape = (h,)
        elif suffix in ("q_norm", "k_norm"):
            shape = (d,)
        elif suffix == "q_proj":
            shape = (spec.num_attention_heads * d, h)
        elif suffix in ("k_proj", "v_proj"):
            shape = (spec.num_query_groups * d, h)
        elif suffix == "o_proj":
            shape = (h, spec.num_attention_heads * d)
        elif suffix == "gate" and spec.is_moe:
            shape = (spec.num_experts, h)
        else:
            ffn = spec.moe_ffn_hidden_size if ".experts." in name else spec.ffn_hidden_size
            shape = (h, ffn) if suffix == "down_proj" else (ffn, h)
        shapes[name] = shape
    return shapes


# -------------------------------------------------------------------------------------------------
# Pure tensor transforms (no communication): full HF tensors <-> one rank's Megatron shard
# -------------------------------------------------------------------------------------------------
def _qkv_fuse(spec: ModelSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[nq*d, H], [ng*d, H], [ng*d, H] -> Megatron's per-group interleaved [(nq + 2 ng) * d, H]."""
    ng, d = spec.num_query_groups, spec.head_dim
    per_group = spec.num_attention_heads // ng
    h = q.shape[-1]
    q = q.reshape(ng, per_group * d, h)
    k = k.reshape(ng, d, h)
    v = v.reshape(ng, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def _qkv_split(spec: ModelSpec, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, d = spec.num_query_groups, spec.head_dim
    per_group = spec.num_attention_heads // ng
    h = qkv.shape[-1]
    grouped = qkv.reshape(ng, (per_group + 2) * d, h)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def hf_to_megatron_shard(
    spec: ModelSpec, rule: ParamRule, hf: list[torch.Tensor], tp_rank: int, tp_size: int
) -> torch.Tensor:
    """Build one Megatron parameter's TP shard from its full HF tensors."""
    if rule.kind == "replicated":
        return hf[0]
    if rule.kind == "vocab":
        full = hf[0]
        padded = spec.padded_vocab_size(tp_size)
        if padded > full.shape[0]:
            full = torch.cat([full, full.new_zeros(padded - full.shape[0], full.shape[1])])
        return full.chunk(tp_size, dim=0)[tp_rank]
    if rule.kind == "column":
        return hf[0].chunk(tp_size, dim=0)[tp_rank]
    if rule.kind == "row":
        return hf[0].chunk(tp_size, dim=1)[tp_rank]
    if rule.kind == "qkv":
        return _qkv_fuse(spec, *hf).chunk(tp_size, dim=0)[tp_rank]
    if rule.kind == "gate_up":
        gate, up = hf
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    raise AssertionError(rule.kind)


def megatron_shards_to_hf(
    spec: ModelSpec, rule: ParamRule, shards: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Inverse of `hf_to_megatron_shard`: all TP shards of one parameter -> its full HF tensors. With a
    single shard (TP = 1) the results are views of it where the layout allows (no copy)."""

    def cat(parts, dim):
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    if rule.kind == "replicated":
        return [shards[0]]
    if rule.kind == "vocab":
        return [cat(shards, 0)[: spec.vocab_size]]
    if rule.kind == "column":
        return [cat(shards, 0)]
    if rule.kind == "row":
        return [cat(shards, 1)]
    if rule.kind == "qkv":
        return list(_qkv_split(spec, cat(shards, 0)))
    if rule.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [cat([g for g, _ in halves], 0), cat([u for _, u in halves], 0)]
    raise AssertionError(rule.kind)


# -------------------------------------------------------------------------------------------------
# Rank-local view of a built Megatron model
# -------------------------------------------------------------------------------------------------
@dataclass
class LocalParam:
    """A Megatron parameter held by this rank, with its place in the global model."""

    rule: ParamRule
    local_name: str
    layer: Optional[int]  # global layer index
    expert: Optional[int]  # global expert index
    param: torch.Tensor

    def hf_names(self) -> list[str]:
        return [h.format(layer=self.layer, expert=self.expert) for h in self.rule.hf]


def _layout():
    """(tp_rank, tp_size, pp_rank, pp_size, ep_rank, ep_size, etp_rank, etp_size) of this rank."""
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
    )


def local_params(model: torch.nn.Module, spec: ModelSpec) -> list[LocalParam]:
    """Match every parameter of this rank's model chunk to its rule and global indices.

    Raises:
        ValueError: a parameter no rule maps (an architecture this mapping does not know).
    """
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    _, _, _, _, ep_rank, ep_size, _, _ = _layout()
    offset = get_transformer_layer_offset(model.config)
    experts_per_rank = spec.num_experts // ep_size if spec.is_moe else 0
    patterns = []
    for rule in layer_rules(spec) + [_EMBEDDING, _FINAL_NORM, _OUTPUT]:
        regex = re.escape(rule.megatron).replace(r"\{layer\}", r"(?P<layer>\d+)")
        regex = regex.replace(r"\{expert\}", r"(?P<expert>\d+)")
        patterns.append((re.compile(regex + "$"), rule))
    out = []
    for name, param in model.named_parameters():
        canonical = canonical_name(name)
        for regex, rule in patterns:
            m = regex.match(canonical)
            if m:
                layer = int(m.group("layer")) + offset if "layer" in m.groupdict() else None
                expert = None
                if "expert" in m.groupdict():
                    expert = ep_rank * experts_per_rank + int(m.group("expert"))
                out.append(LocalParam(rule, name, layer, expert, param))
                break
        else:
            raise ValueError(
                f"parameter {name!r} has no HF mapping for architecture {spec.architecture!r}; "
                "megatron_opd.models.hf_mapping knows Qwen3 and Qwen3-MoE only"
            )
    return out


def _rule_tp(rule: ParamRule, tp_rank, tp_size, etp_rank, etp_size) -> tuple[int, int]:
    return (etp_rank, etp_size) if rule.per_expert else (tp_rank, tp_size)


# -------------------------------------------------------------------------------------------------
# Load: HF checkpoint -> sharded Megatron model (no communication: each rank reads its slice)
# -------------------------------------------------------------------------------------------------
def check_checkpoint_matches(spec: ModelSpec, ckpt: HFCheckpoint, what: str = "checkpoint") -> None:
    """Refuse a checkpoint whose config or tensors disagree with `spec`, before loading anything."""
    ck_spec = ckpt.spec()
    for field in ("architecture", "vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                  "num_query_groups", "head_dim", "ffn_hidden_size", "tie_word_embeddings",
                  "num_experts", "moe_ffn_hidden_size", "moe_router_topk"):
        a, b = getattr(spec, field), getattr(ck_spec, field)
        if a != b and not (field == "ffn_hidden_size" and spec.is_moe):
            raise ValueError(
                f"{what} {ckpt.path}: config {field}={b} but the model spec {spec.name!r} has "
                f"{field}={a}; use the matching model spec (configs/models/) or checkpoint"
            )
    expected = hf_tensor_shapes(spec)
    present = set(ckpt.keys())
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(f"{what} {ckpt.path}: missing tensors {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    extra = sorted(present - set(expected) - {"lm_head.weight"})
    if extra:
        raise ValueError(f"{what} {ckpt.path}: unexpected tensors {extra[:5]} for {spec.name!r}")
    for name, shape in expected.items():
        got = ckpt.shape(name)
        if got != shape:
            raise ValueError(
                f"{what} {ckpt.path}: tensor {name} has shape {got}, model spec {spec.name!r} "
                f"expects {shape}"
            )


@torch.no_grad()
def load_hf_into_megatron(model: torch.nn.Module, spec: ModelSpec, ckpt: HFCheckpoint | str | Path) -> None:
    """Copy a HF checkpoint into this rank's shard of a Megatron model (validates first)."""
    if not isinstance(ckpt, HFCheckpoint):
        ckpt = HFCheckpoint(ckpt)
    check_checkpoint_matches(spec, ckpt)
    tp_rank, tp_size, _, _, _, _, etp_rank, etp_size = _layout()
    for lp in local_params(model, spec):
        names = lp.hf_names()
        if lp.rule is _OUTPUT and spec.tie_word_embeddings:
            names = list(_EMBEDDING.hf)  # tied: the last PP stage keeps a copy of the embedding
        hf = [ckpt.get(n) for n in names]
        r, s = _rule_tp(lp.rule, tp_rank, tp_size, etp_rank, etp_size)
        shard = hf_to_megatron_shard(spec, lp.rule, hf, r, s)
        if tuple(shard.shape) != tuple(lp.param.shape):
            raise ValueError(
                f"{lp.local_name}: checkpoint shard {tuple(shard.shape)} != model "
                f"{tuple(lp.param.shape)} (is the parallel layout consistent with the spec?)"
            )
        lp.param.copy_(shard.to(lp.param.dtype))


# -------------------------------------------------------------------------------------------------
# Export: sharded Megatron model -> HF tensors on each replica's leader, in bounded buckets
# -------------------------------------------------------------------------------------------------
def _global_order(spec: ModelSpec, pp_size: int) -> list[tuple[ParamRule, Optional[int], Optional[int], int]]:
    """Every Megatron parameter of the model as (rule, layer, expert, owning pp stage), in HF order."""
    layers_per_stage = spec.num_layers // pp_size
    order = [(_EMBEDDING, None, None, 0)]
    for layer in range(spec.num_layers):
        stage = layer // layers_per_stage
        for rule in layer_rules(spec):
            if rule.per_expert:
                order += [(rule, layer, e, stage) for e in range(spec.num_experts)]
            else:
                order.append((rule, layer, None, stage))
    order.append((_FINAL_NORM, None, None, pp_size - 1))
    if not spec.tie_word_embeddings:
        order.append((_OUTPUT, None, None, pp_size - 1))
    return order


def bucket_plan(spec: ModelSpec, pp_size: int, bucket_bytes: int, elem: int
                ) -> list[list[tuple[ParamRule, Optional[int], Optional[int], int]]]:
    """The export's buckets: `_global_order` cut after the entry that reaches `bucket_bytes` (so a
    bucket holds less than bucket_bytes + its largest entry). Identical on every rank; boundaries fall
    between Megatron parameters, so fused groups (q/k/v, gate/up) always travel together."""
    shapes = hf_tensor_shapes(spec)
    buckets, bucket, size = [], [], 0
    for entry in _global_order(spec, pp_size):
        bucket.append(entry)
        size += sum(math.prod(shapes[n]) for n in _names(entry[0], entry[1], entry[2])) * elem
        if size >= bucket_bytes:
            buckets.append(bucket)
            bucket, size = [], 0
    if bucket:
        buckets.append(bucket)
    return buckets


def bucket_bytes_of(spec: ModelSpec, bucket: list, elem: int) -> list[tuple[str, int]]:
    """(HF name, bytes) of every tensor of one planned bucket, in order."""
    shapes = hf_tensor_shapes(spec)
    return [(n, math.prod(shapes[n]) * elem) for rule, layer, expert, _ in bucket
            for n in _names(rule, layer, expert)]


def replica_leaders() -> set[int]:
    """Global ranks of every data-parallel replica's leader (TP rank 0 of pipeline stage 0)."""
    if not dist.is_initialized():
        return {0}
    leaders = [None] * dist.get_world_size()
    dist.all_gather_object(leaders, dist.get_rank() if is_replica_leader() else None)
    return {r for r in leaders if r is not None}


def _gather_flat(tensors: list[torch.Tensor], group, size: int) -> list[list[torch.Tensor]]:
    """All-gather several tensors over `group` in one collective: each rank's tensors are flattened
    into one buffer, and the result is, per tensor, its `size` shards (views of the gathered buffer).
    Every rank of the group passes tensors of the same shapes, in the same order."""
    if size == 1 or not tensors:
        return [[t] for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])  # [n]
    out = torch.empty(size * flat.numel(), dtype=flat.dtype, device=flat.device)  # [size * n]
    dist.all_gather_into_tensor(out, flat, group=group)
    rows = out.view(size, -1)
    shards, offset = [], 0
    for t in tensors:
        shards.append([rows[r, offset:offset + t.numel()].view(t.shape) for r in range(size)])
        offset += t.numel()
    return shards


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1).contiguous()


def _unflatten(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[offset:offset + n].view(shape))
        offset += n
    return out


@torch.no_grad()
def export_hf_tensors(
    model: torch.nn.Module,
    spec: ModelSpec,
    bucket_bytes: int = 512 * 2**20,
    dtype: Optional[torch.dtype] = None,
    receivers: Optional[set[int]] = None,
) -> Iterator[tuple[int, Optional[tuple[str, torch.Tensor]]]]:
    """Stream the model's weights as HF-named full tensors: yields (bucket index, (name, tensor)) on
    the ranks in `receivers`, and (bucket index, None) once at the end of every bucket on every rank.

    Collective: every rank must iterate the generator to the end (or every rank stop after the same
    bucket end). The tensors may be views of the model's parameters: consume or clone them before the
    parameters change. `receivers` are global ranks, each of which gets every tensor of its replica's model
    (default: each replica's leader, `replica_leaders`).

    Communication is per bucket, not per parameter (buckets are `bucket_plan`'s, so callers can run a
    per-bucket collective, refit's failure agreement, in lockstep). For each bucket, on the stage that
    owns its entries: one all-gather over TP of the flattened TP-sharded dense parameters (replicated
    ones need none), one all-gather over ETP of this EP rank's experts in the bucket, and one broadcast
    over EP per expert-owning EP rank; then one send per (owning stage, receiver) of the stage's HF
    tensors, flattened, to the receivers of its pipeline group. Besides the model, a rank holds at most
    one bucket's gathered tensors (at TP = ETP = EP = PP = 1 nothing is copied: the tensors are views).
    """
    from megatron.core import parallel_state as ps

    tp_rank, tp_size, pp_rank, pp_size, ep_rank, ep_size, etp_rank, etp_size = _layout()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if receivers is None:
        receivers = replica_leaders()
    mine = {(lp.rule.megatron, lp.layer, lp.expert): lp for lp in local_params(model, spec)}
    param_dtype = next(iter(mine.values())).param.dtype
    lp_device = next(iter(mine.values())).param.device  # received stage tensors land beside ours
    elem = torch.empty((), dtype=dtype or param_dtype).element_size()
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp_size > 1 else [rank]
    pp_receivers = [r for r in pp_ranks if r in receivers]  # this pipeline group's receivers
    experts_per_rank = spec.num_experts // ep_size if spec.is_moe else 0
    ep_ranks = dist.get_process_group_ranks(ps.get_expert_model_parallel_group()) if ep_size > 1 else None
    shapes = hf_tensor_shapes(spec)

    def hf_shapes(entries) -> list[tuple[int, ...]]:
        return [shapes[n] for rule, layer, expert, _ in entries for n in _names(rule, layer, expert)]

    for index, bucket in enumerate(bucket_plan(spec, pp_size, bucket_bytes, elem)):
        hf: dict[tuple, list[torch.Tensor]] = {}  # (rule.megatron, layer, expert) -> its HF tensors
        local = [e for e in bucket if e[3] == pp_rank]
        # Dense parameters of this stage: one TP all-gather of the sharded ones.
        dense = [e for e in local if not e[0].per_expert]
        sharded = [e for e in dense if e[0].kind != "replicated"]
        gathered = _gather_flat([mine[(r.megatron, l, None)].param.detach() for r, l, _, _ in sharded],
                                ps.get_tensor_model_parallel_group() if tp_size > 1 else None, tp_size)
        for (rule, layer, _, _), shards in zip(sharded, gathered):
            hf[(rule.megatron, layer, None)] = megatron_shards_to_hf(spec, rule, shards)
        for rule, layer, _, _ in dense:
            if rule.kind == "replicated":
                hf[(rule.megatron, layer, None)] = [mine[(rule.megatron, layer, None)].param.detach()]
        # Experts of this stage: this EP rank's own over ETP (one all-gather), then each owner's
        # broadcast over EP (one per owner present in the bucket).
        experts = [e for e in local if e[0].per_expert]
        own = [e for e in experts if e[2] // experts_per_rank == ep_rank]
        gathered = _gather_flat([mine[(r.megatron, l, x)].param.detach() for r, l, x, _ in own],
                                ps.get_expert_tensor_parallel_group() if etp_size > 1 else None, etp_size)
        for (rule, layer, expert, _), shards in zip(own, gathered):
            hf[(rule.megatron, layer, expert)] = megatron_shards_to_hf(spec, rule, shards)
        if ep_size > 1:
            for owner in sorted({e[2] // experts_per_rank for e in experts}):
                theirs = [e for e in experts if e[2] // experts_per_rank == owner]
                if owner == ep_rank:
                    flat = _flatten([t for r, l, x, _ in theirs for t in hf[(r.megatron, l, x)]])
                else:  # new memory: nothing of ours is overwritten
                    flat = torch.empty(sum(math.prod(s) for s in hf_shapes(theirs)), dtype=param_dtype,
                                       device=lp_device)
                dist.broadcast(flat, src=ep_ranks[owner], group=ps.get_expert_model_parallel_group())
                if owner != ep_rank:
                    tensors = iter(_unflatten(flat, hf_shapes(theirs)))
                    for r, l, x, _ in theirs:
                        hf[(r.megatron, l, x)] = [next(tensors) for _ in r.hf]
        # Pipeline: each stage's tensors of the bucket, flattened, to the receivers of its group.
        if pp_size > 1:
            for stage in sorted({e[3] for e in bucket}):
                entries = [e for e in bucket if e[3] == stage]
                src = pp_ranks[stage]
                if rank == src:
                    flat = _flatten([t for r, l, x, _ in entries for t in hf[(r.megatron, l, x)]])
                    for dst in pp_receivers:
                        if dst != src:
                            dist.send(flat, dst=dst)
                elif rank in pp_receivers:
                    flat = torch.empty(sum(math.prod(s) for s in hf_shapes(entries)), dtype=param_dtype,
                                       device=lp_device)
                    dist.recv(flat, src=src)
                    tensors = iter(_unflatten(flat, hf_shapes(entries)))
                    for r, l, x, _ in entries:
                        hf[(r.megatron, l, x)] = [next(tensors) for _ in r.hf]
        if rank in receivers:
            for rule, layer, expert, _ in bucket:
                for n, t in zip(_names(rule, layer, expert), hf[(rule.megatron, layer, expert)]):
                    yield index, (n, t.to(dtype) if dtype is not None else t)
        hf = None
        yield index, None


def export_hf_weights(
    model: torch.nn.Module,
    spec: ModelSpec,
    bucket_bytes: int = 512 * 2**20,
    dtype: Optional[torch.dtype] = None,
    receivers: Optional[set[int]] = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`export_hf_tensors` grouped into one list per bucket (empty on ranks that receive nothing).
    Collective like it; each list holds a whole bucket, so prefer `export_hf_tensors` where memory
    matters."""
    bucket: list[tuple[str, torch.Tensor]] = []
    for _, item in export_hf_tensors(model, spec, bucket_bytes, dtype, receivers):
        if item is None:
            yield bucket
            bucket = []
        else:
            bucket.append(item)


def is_replica_leader() -> bool:
    """True on the rank that receives its data-parallel replica's exported weights (TP rank 0 of the
    first pipeline stage): the rank that owns the replica's rollout engine."""
    tp_rank, _, pp_rank, *_ = _layout()
    return tp_rank == 0 and pp_rank == 0


def _names(rule: ParamRule, layer, expert) -> list[str]:
    return [h.format(layer=layer, expert=expert) for h in rule.hf]


def save_hf_checkpoint(
    model: torch.nn.Module,
    spec: ModelSpec,
    out_dir: str | Path,
    dtype: Optional[torch.dtype] = None,
    extra_files: Optional[dict[str, str]] = None,
) -> None:
    """Export a sharded Megatron model to a HF safetensors directory (collective; rank 0 writes)."""
    from safetensors.torch import save_file

    tensors = {}
    for bucket in export_hf_weights(model, spec, dtype=dtype):
        tensors.update({n: t.contiguous().clone() for n, t in bucket})
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = spec.to_hf_config()
    cfg["torch_dtype"] = str(dtype or next(iter(tensors.values())).dtype).replace("torch.", "")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    for name, text in (extra_files or {}).items():
        (out_dir / name).write_text(text)
