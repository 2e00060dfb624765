"""Meshes, logical-axis sharding rules, parameter placement and activation constraints.

The model names *logical* axes (every `ParamSpec` in params.py carries one per dimension; activations use
`batch`, `seq`, `act_embed`, `vocab`); one `ShardingRules` table maps them to the four mesh axes of
architecture.md §4:

    data    batch only
    fsdp    batch, and parameters stored sharded (on `embed`, or `q_latent` / `o_group_in` for the matrices
            without an embed dimension), gathered per layer inside the layer scan
    expert  routed experts (and batch: expert-parallel ranks are data-parallel ranks too)
    tensor  query heads / output groups / indexer heads, expert and shared-expert intermediate dims, vocab

Changing a parallel strategy means changing the table, not the model.

Axis types. Every mesh axis is `AxisType.Auto`. Since jax 0.9 `jax.make_mesh` defaults to `Explicit` axes,
where a sharding is part of every array's type and each contraction over a sharded dimension must say where
its result lives (`out_sharding=`). The layers are written sharding-agnostic (no such annotations), so under
Explicit axes they would fail to trace with "ambiguous sharding" errors. With Auto axes the compiler
propagates shardings from the placed parameters and from the constraints at block boundaries; the MoE
strategies that need exact control over communication take it with `jax.shard_map` (Manual inside).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from deepmoe.config import ModelConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
MeshAxes = str | tuple[str, ...] | None


class ShardingError(ValueError):
    """A mesh, rule or shape does not fit; the message says what to change."""


# ----- meshes ----------------------------------------------------------------------------------------------

def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh with Auto axis types (see module docstring).

    Any axis may be 1; the product must equal the number of devices (default: all of `jax.devices()`,
    i.e. every process's devices under multi-controller JAX)."""
    sizes = dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor)
    for axis, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ShardingError(f"mesh axis {axis}={size!r}: every axis size must be a positive integer (use 1 "
                                "to leave an axis unused)")
    devices = list(jax.devices() if devices is None else devices)
    product = math.prod(sizes.values())
    if product != len(devices):
        shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise ShardingError(
            f"mesh {shape} has {product} positions but there are {len(devices)} devices; choose axis sizes whose "
            f"product is {len(devices)} (e.g. data={len(devices)}), or pass devices= with {product} devices")
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=4,expert=64,tensor=8' -> {'data': 4, 'fsdp': 1, 'expert': 64, 'tensor': 8}."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ShardingError(f"bad mesh entry {part!r}: write axis=size with axis in {MESH_AXES}, size >= 1 "
                                "(e.g. data=4,expert=64,tensor=8)")
        sizes[name] = int(value)
    return sizes


def mesh_shape(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """Axis sizes of a Mesh or of a plain {axis: size} mapping (missing axes are 1)."""
    shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    return {**dict.fromkeys(MESH_AXES, 1), **shape}


# ----- rules -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (a name, a tuple of names, or None = replicated).

    Activations: batch, seq, act_embed. Parameters: the logical axes of params.py. When two dimensions of
    one array map to the same mesh axis, the first keeps it and the later one is replicated.
    `gathered`: mesh axes parameters are *stored* sharded over but gathered before use (FSDP).
    """

    # activations
    batch: MeshAxes = ("data", "fsdp", "expert")
    seq: MeshAxes = None
    act_embed: MeshAxes = None
    # parameters (vocab also names the logits' last dimension)
    vocab: MeshAxes = "tensor"
    embed: MeshAxes = "fsdp"
    embed_out: MeshAxes = None
    heads: MeshAxes = "tensor"
    head_dim: MeshAxes = None  # the single shared K=V head (and compressed entries): replicated
    q_latent: MeshAxes = "fsdp"  # q_up / indexer q_up have no embed dim: FSDP shards them here
    o_groups: MeshAxes = "tensor"
    o_group_in: MeshAxes = "fsdp"  # likewise o_group_proj
    o_latent: MeshAxes = None
    indexer_heads: MeshAxes = "tensor"
    compress: MeshAxes = None
    experts: MeshAxes = "expert"
    expert_mlp: MeshAxes = "tensor"
    mlp: MeshAxes = "tensor"
    hc_flat: MeshAxes = None
    layers: MeshAxes = None
    gathered: tuple[str, ...] = ("fsdp",)

    def replace(self, **changes: Any) -> "ShardingRules":
        return dataclasses.replace(self, **changes)

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes one logical axis maps to (empty: replicated)."""
        if logical is None:
            return ()
        if logical == "gathered" or logical not in _LOGICAL_AXES:
            raise ShardingError(f"unknown logical axis {logical!r}; ShardingRules knows {sorted(_LOGICAL_AXES)}")
        value = getattr(self, logical)
        return () if value is None else (value,) if isinstance(value, str) else tuple(value)

    def spec(self, logical_axes: Sequence[str | None], *, gathered: bool = False) -> PartitionSpec:
        """PartitionSpec for an array whose dimensions carry `logical_axes`. gathered=True drops the
        `gathered` (FSDP) axes: the layout a layer's parameters take while the layer runs."""
        used: set[str] = set()
        entries = []
        for logical in logical_axes:
            axes = tuple(a for a in self.mesh_axes(logical)
                         if a not in used and not (gathered and a in self.gathered))
            used.update(axes)
            entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*entries)


_LOGICAL_AXES = frozenset(f.name for f in dataclasses.fields(ShardingRules))


def axis_product(mesh: Mesh | Mapping[str, int], axes: Sequence[str]) -> int:
    shape = mesh_shape(mesh)
    for axis in axes:
        if axis not in shape:
            raise ShardingError(f"ShardingRules name mesh axis {axis!r}, which the mesh does not have "
                                f"(mesh axes: {tuple(shape)})")
    return math.prod(shape[a] for a in axes)


def spec_shards(spec: PartitionSpec, mesh: Mesh | Mapping[str, int]) -> list[int]:
    """Number of shards along each dimension for a PartitionSpec on a mesh (or a mesh shape)."""
    out = []
    for entry in spec:
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(axis_product(mesh, axes))
    return out


def named_sharding(mesh: Mesh, rules: ShardingRules | None, logical_axes: Sequence[str | None], *,
                   gathered: bool = False) -> NamedSharding:
    """Logical axes -> NamedSharding on `mesh`."""
    return NamedSharding(mesh, (rules or ShardingRules()).spec(logical_axes, gathered=gathered))


def constrain(x: jax.Array, mesh: Mesh | None, rules: ShardingRules | None,
              logical_axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical axes; identity when mesh is None."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, rules, logical_axes))


# ----- compatibility checks --------------------------------------------------------------------------------

def check_model(cfg: ModelConfig, mesh: Mesh | Mapping[str, int], rules: ShardingRules | None = None) -> None:
    """Config-level divisibility checks, phrased as what to change. (shard_params also checks every leaf.)"""
    rules = rules or ShardingRules()
    checks = [("num_experts", cfg.num_experts, "experts"), ("num_heads", cfg.num_heads, "heads"),
              ("output_groups", cfg.output_groups, "o_groups"), ("indexer_heads", cfg.indexer_heads,
                                                                  "indexer_heads"),
              ("expert_hidden_dim", cfg.expert_hidden_dim, "expert_mlp"), ("vocab_size", cfg.vocab_size, "vocab"),
              ("hidden_size", cfg.hidden_size, "embed")]
    for field, size, logical in checks:
        axes = rules.mesh_axes(logical)
        shards = axis_product(mesh, axes)
        if size % shards:
            shape = mesh_shape(mesh)
            named = " x ".join(f"{a}={shape[a]}" for a in axes)
            raise ShardingError(
                f"ModelConfig.{field}={size} is not divisible by the mesh axes it is sharded over ({named}, "
                f"via ShardingRules.{logical}={getattr(rules, logical)!r}); choose {'/'.join(axes)} dividing "
                f"{size}, or map {logical!r} to other axes in ShardingRules")


def check_batch(batch_size: int, mesh: Mesh | Mapping[str, int], rules: ShardingRules | None = None) -> None:
    axes = (rules or ShardingRules()).mesh_axes("batch")
    shards = axis_product(mesh, axes)
    if batch_size % shards:
        shape = mesh_shape(mesh)
        named = " x ".join(f"{a}={shape[a]}" for a in axes)
        raise ShardingError(
            f"batch size {batch_size} is not divisible by the batch mesh axes {named} = {shards}; use a batch "
            f"that is a multiple of {shards}, or map batch to fewer axes (ShardingRules(batch=...))")


# ----- parameters ------------------------------------------------------------------------------------------

def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _specs_by_path(cfg: ModelConfig) -> dict[str, Any]:
    from deepmoe.params import is_spec, param_specs

    flat, _ = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=is_spec)
    return {_path_name(path): spec for path, spec in flat}


def _leaf_spec(name: str, shape: tuple[int, ...], param_spec, mesh, rules: ShardingRules) -> PartitionSpec:
    if tuple(shape) != tuple(param_spec.shape):
        raise ShardingError(f"parameter {name} has shape {tuple(shape)} but the config describes "
                            f"{param_spec.shape}; were the params made for another config?")
    spec = rules.spec(param_spec.axes)
    for dim, (size, logical, shards, entry) in enumerate(zip(shape, param_spec.axes, spec_shards(spec, mesh),
                                                             spec)):
        if size % shards:
            axes = (entry,) if isinstance(entry, str) else entry
            raise ShardingError(
                f"parameter {name}: dimension {dim} ({logical!r}, size {size}) is not divisible by mesh axis "
                f"{'x'.join(axes)} (size {shards}); choose a mesh whose {'/'.join(axes)} divides {size}, or map "
                f"{logical!r} elsewhere in ShardingRules")
    return spec


def param_partition_specs(params_or_abstract: Any, cfg: ModelConfig, mesh: Mesh | Mapping[str, int],
                          rules: ShardingRules | None = None) -> Any:
    """A PartitionSpec per leaf of a params tree (real or abstract), checked for divisibility."""
    rules = rules or ShardingRules()
    check_model(cfg, mesh, rules)
    specs = _specs_by_path(cfg)

    def leaf(path, x):
        name = _path_name(path)
        if name not in specs:
            raise ShardingError(f"parameter {name} is not described by param_specs(cfg)")
        return _leaf_spec(name, x.shape, specs[name], mesh, rules)

    return jax.tree_util.tree_map_with_path(leaf, params_or_abstract)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """NamedSharding per parameter (same tree as init_params), without touching any data: for jit
    out_shardings, optimizer states and checkpoint restore."""
    from deepmoe.params import abstract_params

    specs = param_partition_specs(abstract_params(cfg), cfg, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """Put one array onto a (possibly multi-process) sharding. Every process must hold the full value.
    A jax.ShapeDtypeStruct comes back as one carrying the sharding (for eval_shape / checkpoint restore)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Any, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """Place every parameter by its logical axes. Raises ShardingError naming the parameter, dimension and
    mesh axis when something does not divide. Per-layer params (`params.unstack_layers`, a per-layer train
    state) are stacked first: the sharded forward scans the stacked layout."""
    from deepmoe.params import stack_layers

    params = stack_layers(params, cfg)
    specs = param_partition_specs(params, cfg, mesh, rules)
    return jax.tree.map(lambda x, s: place(x, NamedSharding(mesh, s)), params, specs)


def shard_batch(x: Any, mesh: Mesh, rules: ShardingRules | None = None) -> jax.Array:
    """Place a [B, ...] input (token ids, segment ids, ...) with its batch dimension over the batch axes."""
    rules = rules or ShardingRules()
    check_batch(x.shape[0], mesh, rules)
    return place(x, named_sharding(mesh, rules, ("batch", *[None] * (np.ndim(x) - 1))))


# ----- what forward(mesh=...) uses -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ForwardSharding:
    """The mesh-dependent pieces of one forward pass: block-boundary constraints, per-layer gathering of
    FSDP-sharded parameters inside the layer scan, and the MoE strategy bound to the mesh."""

    cfg: ModelConfig
    mesh: Mesh
    rules: ShardingRules = ShardingRules()

    @classmethod
    def create(cls, cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None, batch_size: int
               ) -> "ForwardSharding":
        rules = rules or ShardingRules()
        check_model(cfg, mesh, rules)
        check_batch(batch_size, mesh, rules)
        return cls(cfg, mesh, rules)

    def streams(self, x: jax.Array) -> jax.Array:
        """[B, T, n, D] residual streams."""
        return constrain(x, self.mesh, self.rules, ("batch", "seq", None, "act_embed"))

    def tokens(self, x: jax.Array) -> jax.Array:
        """[B, T] ids / positions / segment ids."""
        return constrain(x, self.mesh, self.rules, ("batch", "seq"))

    def logits(self, x: jax.Array) -> jax.Array:
        return constrain(x, self.mesh, self.rules, ("batch", "seq", "vocab"))

    def gather_layer(self, segment: int, position: int, layer_params: dict) -> dict:
        """Inside the scan body: the parameters of the layer at `position` in the segment's pattern in their
        compute layout (FSDP axes gathered, tensor and expert sharding kept). The compiler then gathers per
        layer instead of the whole stack."""
        from deepmoe.params import is_spec, param_specs

        specs = param_specs(self.cfg)["segments"][segment][position]

        def leaf(spec, x):
            axes = spec.axes[1:]  # drop the stacked `layers` axis: the scan slices it off
            return jax.lax.with_sharding_constraint(x, named_sharding(self.mesh, self.rules, axes, gathered=True))

        return jax.tree.map(leaf, specs, layer_params, is_leaf=is_spec)

    def moe_strategy(self, strategy: Any) -> Any:
        from deepmoe.moe_dispatch import bind

        return bind(strategy, self.mesh, self.rules)
