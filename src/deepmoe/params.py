"""One description of every parameter: shape, dtype, logical axes and initializer.

`param_specs(cfg)` is the single source; `init_params`, `abstract_params`, `count_params`, the sharding
rules and the checkpoint name maps all derive from it. Matrices are stored [in, out] (x @ W).

Decoder layers are grouped into *segments* (`layer_segments`): a segment is a pattern of consecutive layer
kinds repeated `repeats` times; its parameters are stacked with a leading `layers` axis so the forward can
`lax.scan` over the repeats. V4-Flash = 3 prefix layers + 20 x (HCA, CSA). The other layout, per-layer
(`unstack_layers`, `layer_param_specs`; `stack_layers` goes back), holds one dict per layer in `layers`: cached
decoding reads weights in place over it, and the train step trains over it unless told to scan.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from deepmoe.config import CSA, HASH_MOE, HCA, SLIDING, SCORE_MOE, ModelConfig
from deepmoe.layers.moe import per_expert

LayerKind = tuple[str, str]  # (attention type, moe type)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis per dimension (see sharding.py)
    init: str = "normal"  # normal | ones | zeros | hash_table
    std: float = 0.02
    dtype: str | None = None  # None: cfg.param_dtype; norms, mHC, sinks, router stay float32

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # first decoder layer index
    repeats: int  # how many times the pattern repeats (the scanned axis)
    kinds: tuple[LayerKind, ...]  # the pattern

    def layer_index(self, repeat: int, position: int) -> int:
        return self.start + repeat * len(self.kinds) + position

    def scan(self, body, carry, stacked):
        """`lax.scan(body, carry, stacked)` over the repeats. A segment that does not repeat (`tiny`'s and
        `mini`'s whole schedule, larger presets' prefix) calls body once on the stacks' only slice instead: the
        same values, without a one-step loop to trace, differentiate and compile (jax linearizes and transposes
        a scan by partial evaluation to a fixed point: `tiny`'s and `mini`'s gradients traced in ~5 s, now ~3 s)."""
        if self.repeats > 1:
            return jax.lax.scan(body, carry, stacked)
        carry, out = body(carry, jax.tree.map(lambda x: x[0], stacked))
        return carry, jax.tree.map(lambda x: x[None], out)


@functools.lru_cache(maxsize=None)
def layer_segments(cfg: ModelConfig) -> tuple[Segment, ...]:
    """Split the layer schedule into an unscanned prefix and one repeated pattern, minimising the number of
    distinct layer bodies (= compile time): prefix length + pattern length."""
    kinds = tuple(zip(cfg.layer_types, cfg.moe_layer_types))
    n = len(kinds)
    best = None
    for prefix in range(n):
        for period in range(1, min(8, n - prefix) + 1):
            rest = kinds[prefix:]
            if len(rest) % period or any(rest[i] != rest[i % period] for i in range(len(rest))):
                continue
            cost = prefix + period
            if best is None or cost < best[0]:
                best = (cost, prefix, period)
    if best is None:  # nothing repeats: every layer its own body
        return (Segment(0, 1, kinds),)
    _, prefix, period = best
    segments = [Segment(0, 1, kinds[:prefix])] if prefix else []
    segments.append(Segment(prefix, (n - prefix) // period, kinds[prefix:prefix + period]))
    return tuple(segments)


def _hc_specs(cfg: ModelConfig, outputs: int, scales: int) -> dict[str, ParamSpec]:
    n, d = cfg.residual_streams, cfg.hidden_size
    return {
        "fn": ParamSpec((n * d, outputs), ("hc_flat", None), dtype="float32"),
        "base": ParamSpec((outputs,), (None,), init="zeros", dtype="float32"),
        "scale": ParamSpec((scales,), (None,), init="ones", dtype="float32"),
    }


def _norm(dim: int, axis: str = "embed") -> ParamSpec:
    return ParamSpec((dim,), (axis,), init="ones", dtype="float32")


def _compressor_specs(cfg: ModelConfig, ratio: int, dim: int, overlap: bool) -> dict[str, ParamSpec]:
    width = dim * (2 if overlap else 1)
    return {
        "kv_proj": ParamSpec((cfg.hidden_size, width), ("embed", "compress")),
        "gate_proj": ParamSpec((cfg.hidden_size, width), ("embed", "compress")),
        "position_bias": ParamSpec((ratio, width), (None, "compress"), init="zeros", dtype="float32"),
        "kv_norm": _norm(dim, "head_dim"),
    }


def attention_specs(cfg: ModelConfig, layer_type: str) -> dict[str, Any]:
    d, h, c, dc = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.query_latent_dim
    g, dg = cfg.output_groups, cfg.output_group_latent_dim
    spec: dict[str, Any] = {
        "q_down": ParamSpec((d, dc), ("embed", "q_latent")),
        "q_norm": _norm(dc, "q_latent"),
        "q_up": ParamSpec((dc, h, c), ("q_latent", "heads", "head_dim")),
        "kv_proj": ParamSpec((d, c), ("embed", "head_dim")),
        "kv_norm": _norm(c, "head_dim"),
        "sinks": ParamSpec((h,), ("heads",), init="zeros", dtype="float32"),
        "o_group_proj": ParamSpec((g, cfg.output_group_input_dim, dg), ("o_groups", "o_group_in", "o_latent")),
        "o_proj": ParamSpec((g, dg, d), ("o_groups", "o_latent", "embed")),
    }
    if layer_type in (CSA, HCA):
        ratio = cfg.compress_ratio(layer_type)
        spec["compressor"] = _compressor_specs(cfg, ratio, c, overlap=layer_type == CSA)
    if layer_type == CSA:
        spec["indexer"] = {
            "q_up": ParamSpec((dc, cfg.indexer_heads, cfg.indexer_head_dim), ("q_latent", "indexer_heads", None)),
            "weights_proj": ParamSpec((d, cfg.indexer_heads), ("embed", "indexer_heads")),
            "compressor": _compressor_specs(cfg, cfg.csa_compress_ratio, cfg.indexer_head_dim, overlap=True),
        }
    return spec


def moe_specs(cfg: ModelConfig, moe_type: str) -> dict[str, Any]:
    d, e, i = cfg.hidden_size, cfg.num_experts, cfg.expert_hidden_dim
    spec: dict[str, Any] = {
        "router": ParamSpec((d, e), ("embed", None), dtype="float32"),
        "experts": {
            "w_gate": ParamSpec((e, d, i), ("experts", "embed", "expert_mlp")),
            "w_up": ParamSpec((e, d, i), ("experts", "embed", "expert_mlp")),
            "w_down": ParamSpec((e, i, d), ("experts", "expert_mlp", "embed")),
        },
        "shared": {
            "w_gate": ParamSpec((d, i), ("embed", "mlp")),
            "w_up": ParamSpec((d, i), ("embed", "mlp")),
            "w_down": ParamSpec((i, d), ("mlp", "embed")),
        },
    }
    if moe_type == HASH_MOE:
        spec["tid2eid"] = ParamSpec((cfg.vocab_size, cfg.experts_per_token), ("vocab", None), init="hash_table",
                                    dtype="int32")
    else:
        spec["router_bias"] = ParamSpec((e,), (None,), init="zeros", dtype="float32")
    return spec


def layer_specs(cfg: ModelConfig, kind: LayerKind) -> dict[str, Any]:
    n = cfg.residual_streams
    return {
        "attn_hc": _hc_specs(cfg, (2 + n) * n, 3),
        "attn_norm": _norm(cfg.hidden_size),
        "attn": attention_specs(cfg, kind[0]),
        "ffn_hc": _hc_specs(cfg, (2 + n) * n, 3),
        "ffn_norm": _norm(cfg.hidden_size),
        "moe": moe_specs(cfg, kind[1]),
    }


def _stack(spec: ParamSpec, repeats: int) -> ParamSpec:
    return dataclasses.replace(spec, shape=(repeats, *spec.shape), axes=("layers", *spec.axes))


def mtp_specs(cfg: ModelConfig) -> dict[str, Any]:
    d, n = cfg.hidden_size, cfg.residual_streams
    return {
        "embed_norm": _norm(d),
        "hidden_norm": _norm(d),
        "embed_proj": ParamSpec((d, d), ("embed", "embed_out")),
        "hidden_proj": ParamSpec((d, d), ("embed", "embed_out")),
        "block": layer_specs(cfg, (SLIDING, SCORE_MOE)),
        "hc_head": _hc_specs(cfg, n, 1),
        "norm": _norm(d),
    }


@functools.lru_cache(maxsize=None)
def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The parameter description tree. `segments[s][p]` holds pattern position p of segment s, stacked."""
    d, n, v = cfg.hidden_size, cfg.residual_streams, cfg.vocab_size
    segments = [
        [jax.tree.map(lambda s: _stack(s, seg.repeats), layer_specs(cfg, kind), is_leaf=is_spec)
         for kind in seg.kinds]
        for seg in layer_segments(cfg)
    ]
    spec: dict[str, Any] = {
        "embed": ParamSpec((v, d), ("vocab", "embed"), std=1.0),
        "segments": segments,
        "hc_head": _hc_specs(cfg, n, 1),
        "final_norm": _norm(d),
        "lm_head": ParamSpec((d, v), ("embed", "vocab")),
    }
    if cfg.num_mtp_layers:
        spec["mtp"] = mtp_specs(cfg)
    return spec


def per_layer(stacked_segments: list, cfg: ModelConfig) -> list:
    """`segments[s][p]` trees stacked over their segment's repeats (the parameter layout, also the prefill's
    scanned caches) -> one tree per decoder layer, in layer order (static slices)."""
    layers: list[Any] = [None] * cfg.num_layers
    for seg, seg_trees in zip(layer_segments(cfg), stacked_segments):
        for r in range(seg.repeats):
            for position, stacked in enumerate(seg_trees):
                layers[seg.layer_index(r, position)] = jax.tree.map(lambda a, r=r: a[r], stacked)
    return layers


def layer_param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """`param_specs` in the per-layer layout of `unstack_layers`: `layers`, one spec tree per decoder layer
    (no `layers` axis), in place of the stacked `segments`."""
    rest = {k: v for k, v in param_specs(cfg).items() if k != "segments"}
    return {**rest, "layers": [layer_specs(cfg, kind) for kind in zip(cfg.layer_types, cfg.moe_layer_types)]}


def layer_params(params: dict, cfg: ModelConfig) -> list[tuple[LayerKind, dict]]:
    """Every decoder layer's (kind, parameters), in layer order, from either layout: the stacked `segments`
    or the per-layer `layers` of `unstack_layers`."""
    layers = params["layers"] if "layers" in params else per_layer(params["segments"], cfg)
    return list(zip(zip(cfg.layer_types, cfg.moe_layer_types), layers))


SPLIT_EXPERTS_MAX = 64  # per-expert arrays up to this many experts (one lax.switch branch each, see below)


def unstack_layers(params: dict, cfg: ModelConfig, split_experts: bool | None = None) -> dict:
    """The per-layer layout: `segments` (stacked so the full-sequence forward can lax.scan over layers) replaced
    by `layers`, one parameter dict per decoder layer; everything else shared. `forward`, the train step
    (TrainConfig.scan_layers) and cached decoding accept both. Over this one decoding reads every weight where
    it lies, where over the stacks each token first copies every layer's weights out of them (XLA slices by
    copying; `small`: 22.8 -> 15.7 ms of op time per decoded token). Costs one copy of the decoder layers'
    parameters; per-layer params come back as they are (their experts split if asked and not yet split).

    split_experts: also hold each layer's routed experts as one array per expert (`experts[name]` a tuple of
    E arrays), so the MoE picks its expert with `lax.switch` and reads it in place instead of slicing it out of
    the [E, ...] stack (decode `small` +18 %, `mini` +24 %; see moe_dispatch). None = on the CPU backend with at most
    SPLIT_EXPERTS_MAX experts: each expert is a switch branch, compiled per chosen slot; XLA:GPU/TPU fold the
    slice into the matmul anyway."""
    if split_experts is None:
        split_experts = jax.default_backend() == "cpu" and cfg.num_experts <= SPLIT_EXPERTS_MAX
    if "layers" in params:  # already per layer (e.g. trained so): only split the experts if asked and not yet
        if not split_experts or all(per_expert(layer["moe"]["experts"]) for layer in params["layers"]):
            return params
        return {**params, "layers": _split_jitted(params["layers"])}
    rest = {k: v for k, v in params.items() if k != "segments"}
    return {**rest, "layers": _per_layer_jitted(params["segments"], cfg, split_experts)}


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
    """The inverse of `unstack_layers`: per-layer `layers` (per-expert arrays joined again) -> the stacked
    `segments` of `init_params`, the layout checkpoints, sharding and weight conversion use. Costs one copy of
    the decoder layers' parameters; stacked params come back as they are."""
    if "segments" in params:
        return params
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, "segments": _stack_jitted(params["layers"], cfg)}


def _stack_segments(layers: list, cfg: ModelConfig) -> list:
    def joined(layer):  # per-expert arrays (split_experts) -> one [E, ...] stack
        experts = layer["moe"]["experts"]
        if per_expert(experts):
            experts = {name: jnp.stack(w) for name, w in experts.items()}
        return {**layer, "moe": {**layer["moe"], "experts": experts}}

    layers = [joined(layer) for layer in layers]
    return [[jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[seg.layer_index(r, position)]
                                                     for r in range(seg.repeats)])
             for position in range(len(seg.kinds))]
            for seg in layer_segments(cfg)]


_stack_jitted = jax.jit(_stack_segments, static_argnums=1)


def _split_experts(layers: list) -> list:
    """Each layer's [E, ...] expert stacks -> tuples of E per-expert arrays."""
    return [{**layer, "moe": {**layer["moe"], "experts": {name: tuple(w) for name, w in
                                                         layer["moe"]["experts"].items()}}}
            for layer in layers]


def _per_layer_split(stacked_segments: list, cfg: ModelConfig, split_experts: bool) -> list:
    layers = per_layer(stacked_segments, cfg)
    return _split_experts(layers) if split_experts else layers


_per_layer_jitted = jax.jit(_per_layer_split, static_argnums=(1, 2))  # one program for every slice
_split_jitted = jax.jit(_split_experts)


def _dtype(spec: ParamSpec, cfg: ModelConfig):
    return jnp.dtype(spec.dtype or cfg.param_dtype)


def _init_leaf(spec: ParamSpec, cfg: ModelConfig, key: jax.Array) -> jax.Array:
    """A leaf that is not drawn from a normal (those come from `_normal_leaves`)."""
    dtype = _dtype(spec, cfg)
    if spec.init == "ones":
        return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return jnp.zeros(spec.shape, dtype)
    if spec.init == "hash_table":  # each token gets `k` distinct random experts
        *lead, vocab, k = spec.shape
        noise = jax.random.uniform(key, (*lead, vocab, cfg.num_experts))
        return jnp.argsort(noise, axis=-1)[..., :k].astype(dtype)
    raise ValueError(f"unknown initializer {spec.init!r}")


# The normal leaves are cut from one draw of up to this many values rather than drawn one by one: XLA:CPU
# compiles every draw (threefry bits, then erf_inv) to its own kernel of ~0.15 s, and `tiny`'s 90 draws took
# ~11 s to compile against ~2 s for one draw and 90 cuts. Capped so no draw's fp32 buffer exceeds 1 GiB.
DRAW_ELEMENTS = 2**28


def draw_groups(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive runs of indices into `sizes` whose sum stays within `limit` (a larger size alone)."""
    groups: list[list[int]] = []
    total = limit
    for i, size in enumerate(sizes):
        if total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def _normal_leaves(specs: list[ParamSpec], cfg: ModelConfig, key: jax.Array) -> list[jax.Array]:
    """std x N(0, 1) per spec, each leaf a disjoint slice of a draw (`DRAW_ELEMENTS`)."""
    sizes = [math.prod(s.shape) for s in specs]
    groups = draw_groups(sizes, DRAW_ELEMENTS)
    leaves = []
    for group, group_key in zip(groups, jax.random.split(key, len(groups))):
        # the barrier keeps XLA from fusing the draw into every cut, which would compile it once per leaf again
        draw = jax.lax.optimization_barrier(jax.random.normal(group_key, (sum(sizes[i] for i in group),)))
        offset = 0
        for i in group:
            cut = draw[offset:offset + sizes[i]].reshape(specs[i].shape)
            leaves.append((specs[i].std * cut).astype(_dtype(specs[i], cfg)))
            offset += sizes[i]
    return leaves


def init_params(cfg: ModelConfig, key: jax.Array) -> dict[str, Any]:
    """Random parameters for `cfg` (a nested dict of jax.Array)."""
    return _init_jitted(cfg, key)


@functools.partial(jax.jit, static_argnums=0)
def _init_jitted(cfg: ModelConfig, key: jax.Array) -> dict[str, Any]:
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=is_spec)
    normal_key, other_key = jax.random.split(key)
    normal = iter(_normal_leaves([s for s in specs if s.init == "normal"], cfg, normal_key))
    other_keys = jax.random.split(other_key, len(specs))  # its own key per leaf: hash tables must differ
    return jax.tree.unflatten(treedef, [next(normal) if s.init == "normal" else _init_leaf(s, cfg, k)
                                        for s, k in zip(specs, other_keys)])


def abstract_params(cfg: ModelConfig) -> dict[str, Any]:
    """`jax.ShapeDtypeStruct` per parameter: no allocation."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, _dtype(s, cfg)), param_specs(cfg), is_leaf=is_spec)


def _size(tree: Any) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(tree, is_leaf=is_spec) if s.init != "hash_table")


@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int  # decoder + embeddings + head, without MTP
    active: int  # per token: routed experts counted experts_per_token / num_experts of the way
    mtp: int  # the MTP module on its own (shares embedding and head)
    mtp_active: int

    def __iter__(self):  # `total, active = count_params(cfg)`
        return iter((self.total, self.active))


def count_params(cfg: ModelConfig) -> ParamCount:
    """Parameter counts from the description alone (hash tables are buffers, not counted)."""
    specs = param_specs(cfg)
    main = {k: v for k, v in specs.items() if k != "mtp"}
    inactive_fraction = 1 - cfg.experts_per_token / cfg.num_experts
    routed = sum(_size(layer["moe"]["experts"]) for seg in specs["segments"] for layer in seg)
    total = _size(main)
    mtp = _size(specs.get("mtp", {}))
    mtp_routed = _size(specs["mtp"]["block"]["moe"]["experts"]) if "mtp" in specs else 0
    return ParamCount(total=total, active=total - round(routed * inactive_fraction), mtp=mtp,
                      mtp_active=mtp - round(mtp_routed * inactive_fraction))
