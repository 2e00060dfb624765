"""Interchangeable MoE execution strategies behind one signature:

    run(experts_params, cfg, x [B,T,D], expert_ids [B,T,K], weights [B,T,K]) -> [B,T,D] float32

`dense` evaluates every expert on every token (the reference); `sorted` groups token copies by expert and runs
a grouped matmul (dropless; `pallas_kernels.gmm` where cfg.kernels let Pallas run, else `jax.lax.ragged_dot`);
`blocked` runs each expert's first copies as batched matmuls over fixed-size lanes and loops over whole blocks
of the rest (dropless, dense matmuls only); `gather` reads each token's K expert matrices (cached decode steps with
fewer token copies than experts pick it). On a mesh (`forward(..., mesh=)`) a strategy is bound to it
(`bind` -> `MeshStrategy`): `ep_all_to_all` (fixed-capacity `lax.all_to_all`, any backend) and `ep_ragged`
(`lax.ragged_all_to_all`, GPU/TPU) split the routed experts over the `expert` axis; `dense` / `sorted` run
per device on the local tokens. `auto` without a mesh is `local_strategy`; on a mesh it asks
`backend.capabilities.select` for the platform's choice.
Mesh-bound strategies also report `dropped_tokens` (token copies dropped for capacity) into the router stats.

The routed experts' weights come as [E, ...] stacks or, in the inference layout of `params.unstack_layers`, as
tuples of E per-expert arrays: `gather` and `blocked` then pick each expert with `lax.switch` (read in place,
where slicing a stack copies on XLA:CPU); the other strategies stack them back (`stacked_experts`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from deepmoe.layers.kernels import native_pallas, traced_platform, use_pallas_kernels
from deepmoe.layers.moe import per_expert
from deepmoe.moe_dispatch.blocked import run as run_blocked
from deepmoe.moe_dispatch.dense import run as run_dense
from deepmoe.moe_dispatch.gather import run as run_gather
from deepmoe.moe_dispatch.ep_all_to_all import MeshStrategy
from deepmoe.moe_dispatch.sort_ragged import run as run_sorted

STRATEGIES = {"dense": run_dense, "sorted": run_sorted, "blocked": run_blocked, "gather": run_gather}
SPLIT_AWARE = ("blocked", "gather")  # take per-expert tuples as they are
MESH_STRATEGIES = ("dense", "sorted", "blocked", "gather", "ep_all_to_all", "ep_ragged")
NAMES = ("auto", *MESH_STRATEGIES)


@dataclasses.dataclass(frozen=True)
class MoEStrategy:
    """A strategy name with options: `forward(..., moe_strategy=MoEStrategy("ep_all_to_all", 1.25))`.

    capacity_factor: None = dropless (the default; the spec drops no tokens); see ep_all_to_all / ep_ragged.
    collective: ep_ragged only; "emulated" runs its all_gather-based stand-in (CPU tests)."""

    name: str = "auto"
    capacity_factor: float | None = None
    collective: str = "native"


def strategy_options(strategy) -> MoEStrategy:
    """A strategy name or MoEStrategy -> MoEStrategy; TypeError / ValueError for anything else."""
    if isinstance(strategy, MoEStrategy):
        options = strategy
    elif isinstance(strategy, str):
        options = MoEStrategy(strategy)
    else:
        raise TypeError(f"moe_strategy must be a name or a MoEStrategy, got {strategy!r}")
    if options.name not in NAMES:
        raise ValueError(f"unknown MoE strategy {options.name!r}; choose one of {list(NAMES)}")
    return options


def bind(strategy, mesh, rules=None) -> MeshStrategy:
    """Resolve `auto` for the mesh's platform and expert axis, check the choice runs there, bind it."""
    from deepmoe.backend.capabilities import normalize_platform, select
    from deepmoe.sharding import ShardingError, ShardingRules

    if isinstance(strategy, MeshStrategy):
        return strategy
    options, rules = strategy_options(strategy), rules or ShardingRules()
    platform = normalize_platform(mesh.devices.flat[0].platform)
    expert_size = 1
    for axis in rules.mesh_axes("experts"):
        expert_size *= mesh.shape[axis]
    name = options.name
    if name == "auto":
        name = select(platform, device_count=mesh.size, expert_axis_size=expert_size).moe_strategy
    if name == "ep_ragged" and options.collective == "native" and platform == "cpu" and expert_size > 1:
        raise ShardingError("moe_strategy 'ep_ragged' needs lax.ragged_all_to_all, which XLA:CPU does not "
                            "implement; use 'ep_all_to_all' (or 'auto') on CPU")
    return MeshStrategy(name, mesh, rules, options.capacity_factor, options.collective)


class _Recording:
    """Carries a MeshStrategy through `layers.moe.moe` and keeps the extras its run returns."""

    def __init__(self, strategy: MeshStrategy):
        self.strategy, self.extras = strategy, {}


def with_extras(strategy):
    """-> (strategy to pass to `moe`, dict filled with the strategy's extra router stats once `moe` ran).
    Plain (unbound) strategies have no extras, so single-device aux is unchanged."""
    if isinstance(strategy, MeshStrategy):
        recording = _Recording(strategy)
        return recording, recording.extras
    return strategy, {}


def stacked_experts(params: dict) -> dict:
    """[E, ...] stacks from either layout (a copy for per-expert tuples)."""
    return {name: jnp.stack(w) for name, w in params.items()} if per_expert(params) else params


def local_strategy(cfg) -> str:
    """`auto` without a mesh: `sorted` where its grouped matmul is one (TPU's ragged_dot; on GPU the Pallas gmm
    kernel, when cfg.kernels let it run), `blocked` elsewhere. XLA:CPU, XLA:GPU and unknown plugins expand
    ragged_dot into a dense product over all E experts (E times the FLOPs: `medium` has 32); `blocked` runs as
    dense batched matmuls anywhere, at ~1.25x the FLOPs on balanced routing."""
    if traced_platform() == "tpu" or (native_pallas() and use_pallas_kernels(cfg)):
        return "sorted"
    return "blocked"


def run_experts(strategy, params, cfg, x, expert_ids, weights):
    if isinstance(strategy, (_Recording, MeshStrategy)):
        params = stacked_experts(params)
    if isinstance(strategy, _Recording):
        y, extras = strategy.strategy.run(params, cfg, x, expert_ids, weights, return_extras=True)
        strategy.extras.update(extras)
        return y
    if isinstance(strategy, MeshStrategy):
        return strategy.run(params, cfg, x, expert_ids, weights)
    name = strategy_options(strategy).name
    if name == "auto":  # no mesh: nothing to parallelise over
        name = local_strategy(cfg)
    if name not in STRATEGIES:
        raise ValueError(f"MoE strategy {name!r} runs on a mesh: pass mesh= to forward (dm.make_mesh(...)), or "
                         f"use one of {sorted(STRATEGIES)} on a single device")
    if name not in SPLIT_AWARE:
        params = stacked_experts(params)
    return STRATEGIES[name](params, cfg, x, expert_ids, weights)
