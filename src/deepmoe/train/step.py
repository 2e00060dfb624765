"""The train step: TrainConfig, TrainState, init_state, make_train_step (jit, optional data-parallel mesh).

One call = one optimizer update, in two compiled programs (`TrainStep`: 1 is `gradients`, 2-5 `update`):
  1. forward + backward on `grad_accum` micro-batches (lax.scan, fp32 gradient sums), in `compute_dtype`
     with fp32 master params; losses are normalised by the whole batch's counts, so accumulation is exact;
  2. global-norm clipping (the pre-clip norm is reported);
  3. the optax update (Muon / AdamW / frozen, see optim.py);
  4. the aux-loss-free balancing rule on every score-routed layer and the MTP block:
     router_bias -= bias_update_speed * sign(load_i - mean_load), load = the step's token counts;
  5. if the loss or gradient norm is non-finite, the whole update is dropped (params, optimizer state, biases
     keep their old values), `skipped` counts it and the metrics say so; the loop stops or goes on.

Objective = CE + mtp_weight * MTP-CE + balance_weight * (sum over the score-routed layers and the MTP block of
the sequence-wise balance loss, averaged over sequences) + z_loss_weight * mean logsumexp^2. The MTP weight is
`mtp_weight` (0.3) until the LR decay starts, then `mtp_weight_after_decay` (0.1). Hash layers are left out of
the balance loss: their routing is a fixed table, so the loss could only shrink their gate weights, never move
load. Expert counts include every token of a row (padding too; packed rows have none). The metric `loss` is
the next-token CE alone (nats per target); `total_loss` is the objective.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepmoe.backend import xla_options
from deepmoe.config import KERNELS, SCORE_MOE, ModelConfig
from deepmoe.model import REMAT_POLICIES, forward
from deepmoe.params import init_params, layer_params, layer_segments, stack_layers, unstack_layers
from deepmoe.train import loss as L
from deepmoe.train.optim import decay_start_step, lr_schedule, make_optimizer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Run length and batch.
    steps: int = 300
    batch_size: int = 8  # sequences per optimizer step (split into grad_accum micro-batches)
    seq_len: int = 256
    grad_accum: int = 1
    # Learning rate: linear warmup, constant, cosine from `decay_start` (fraction of steps) to lr*min_lr_ratio.
    lr: float = 3e-3
    warmup_steps: int = 20
    decay_start: float = 0.5
    min_lr_ratio: float = 0.1
    # Optimizer (see optim.py).
    optimizer: str = "muon"  # muon | adamw
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8  # the report's 1e-20 turns fp noise in ~zero gradients into full-size steps
    muon_momentum: float = 0.95
    muon_rms: float = 0.18
    clip_norm: float = 1.0  # 0 disables clipping
    # Losses.
    mtp_weight: float = 0.3  # before the LR decay starts
    mtp_weight_after_decay: float = 0.1
    balance_weight: float = 1e-4
    z_loss_weight: float = 0.0
    bias_update_speed: float = 1e-3
    pad_token_id: int | None = 2  # targets equal to this id carry no loss (None: no padding id)
    # Execution.
    compute_dtype: str | None = None  # None: the model config's
    remat: str = "none"  # none | full | dots | dots_no_batch
    moe_strategy: str = "auto"  # a moe_dispatch name; "auto" = the platform's choice (blocked on CPU)
    kernels: str | None = None  # attention core, grouped expert matmul: reference | pallas | auto; None: cfg's
    scan_layers: bool | None = None  # train over stacked layers (scan) or per-layer ones; None: layers_scanned
    skip_nonfinite: bool = False  # False: the loop stops at a non-finite step; True: skip and count
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            problems.append(f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}")
        if self.optimizer not in ("muon", "adamw"):
            problems.append(f"optimizer must be 'muon' or 'adamw', got {self.optimizer!r}")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.compute_dtype not in (None, "float32", "bfloat16"):
            problems.append(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if self.scan_layers not in (None, True, False):
            problems.append(f"scan_layers must be True, False or None (choose by the model), got {self.scan_layers!r}")
        if self.kernels is not None and self.kernels not in KERNELS:
            problems.append(f"kernels must be one of {KERNELS} (or None: the model config's), got {self.kernels!r}")
        if not 0.0 <= self.decay_start <= 1.0:
            problems.append(f"decay_start is a fraction of steps in [0, 1], got {self.decay_start}")
        if problems:
            raise ValueError("TrainConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@struct.dataclass
class TrainState:
    params: Any  # fp32 master parameters
    opt_state: Any
    step: jax.Array  # int32 [], completed optimizer steps
    rng: jax.Array  # uint32 [2] raw PRNG key data (split every step; reserved for stochastic features)
    skipped: jax.Array  # int32 [], steps dropped because the loss or gradient was non-finite

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state, "step": self.step, "rng": self.rng,
                "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**d)


def model_config_for_training(cfg: ModelConfig, tcfg: TrainConfig) -> ModelConfig:
    """fp32 master params; the compute dtype and kernel choice from the train config when it sets them.
    Every forward of the step, the eval step and the loop's sampler runs on this config, so the override
    reaches them all."""
    return cfg.replace(param_dtype="float32", compute_dtype=tcfg.compute_dtype or cfg.compute_dtype,
                       kernels=tcfg.kernels or cfg.kernels)


UNROLL_MAX_LAYERS = 16  # compiling the gradient costs ~2 s per unrolled layer here (43 layers: 83 s vs 17 s scanned)


def layers_scanned(cfg: ModelConfig, tcfg: TrainConfig) -> bool:
    """Whether the step trains the stacked layout (`segments`, scanned per segment) or the per-layer one
    (`layers`, unrolled; params.unstack_layers). TrainConfig.scan_layers decides; None picks per-layer when the
    model has at most UNROLL_MAX_LAYERS layers and some segment repeats (else the scan is no loop and both
    layouts compile to the same program). Per-layer avoids the scan's copies of weights, saved activations and
    gradients in and out of the stacks: `small` gradient -15 %, forward -5 %."""
    if tcfg.scan_layers is not None:
        return tcfg.scan_layers
    return cfg.num_layers > UNROLL_MAX_LAYERS or all(seg.repeats == 1 for seg in layer_segments(cfg))


def training_layout(params: dict, cfg: ModelConfig, tcfg: TrainConfig) -> dict:
    """`params` (either layout, experts split or not) in the layout the step trains (`layers_scanned`)."""
    stacked = stack_layers(params, cfg)
    return stacked if layers_scanned(cfg, tcfg) else unstack_layers(stacked, cfg, split_experts=False)


def init_state(cfg: ModelConfig, tcfg: TrainConfig, key: jax.Array, params: Any = None) -> TrainState:
    """Fresh state: params from `key` (or copies of the given ones, cast to fp32), zero optimizer state, step 0.
    The params are held in the layout the step trains (`layers_scanned`); `stack_layers` gives the stacked
    layout of `init_params` back."""
    mcfg = model_config_for_training(cfg, tcfg)
    if params is None:
        params = init_params(mcfg, key)
    else:
        # copies: the loop donates the state's buffers, which must not invalidate the caller's arrays
        params = jax.tree.map(lambda p: jnp.array(p, jnp.float32 if jnp.issubdtype(p.dtype, jnp.floating)
                                                  else p.dtype, copy=True), params)
    params = training_layout(params, mcfg, tcfg)
    opt_state = _optimizer_init(mcfg, _step_key(tcfg), not layers_scanned(mcfg, tcfg))(params)
    raw_key = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                      rng=jnp.asarray(raw_key, jnp.uint32).reshape(-1)[:2], skipped=jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=16)
def _optimizer_init(mcfg: ModelConfig, tcfg: TrainConfig, per_layer: bool):
    """optax's `init`, jitted and cached like the step: run eagerly, it compiled a zeros program per parameter
    shape (~40 for `tiny`, 1.3 s of a fresh process's first `init_state` on a 2-core CPU)."""
    return jax.jit(make_optimizer(mcfg, tcfg, per_layer=per_layer).init)


# ----- router bias (aux-loss-free balancing) --------------------------------------------------------------


def score_layer_indices(cfg: ModelConfig) -> list[int]:
    return [i for i, kind in enumerate(cfg.moe_layer_types) if kind == SCORE_MOE]


def update_router_bias(params: dict, cfg: ModelConfig, expert_load: jax.Array, mtp_load: jax.Array | None,
                       speed: float) -> dict:
    """The V3 aux-loss-free rule on every score layer: bias_i -= speed * sign(load_i - mean(load)).
    expert_load [L, E] tokens per expert in each decoder layer (hash layers ignored); mtp_load [E] or None."""
    def nudge(bias, load):
        return bias - speed * jnp.sign(load - jnp.mean(load, axis=-1, keepdims=True)).astype(bias.dtype)

    def nudged(layer, rows):
        return {**layer, "moe": {**layer["moe"], "router_bias": nudge(layer["moe"]["router_bias"], expert_load[rows])}}

    if "layers" in params:  # per-layer layout
        params = {**params, "layers": [nudged(layer, i) if kind == SCORE_MOE else layer
                                       for i, (kind, layer) in enumerate(zip(cfg.moe_layer_types, params["layers"]))]}
    else:
        segments = []
        for seg, seg_params in zip(layer_segments(cfg), params["segments"]):
            segments.append([nudged(layer, jnp.asarray([seg.layer_index(r, position) for r in range(seg.repeats)]))
                             if kind[1] == SCORE_MOE else layer
                             for position, (kind, layer) in enumerate(zip(seg.kinds, seg_params))])
        params = {**params, "segments": segments}
    if mtp_load is not None and "mtp" in params:
        block = params["mtp"]["block"]
        moe = {**block["moe"], "router_bias": nudge(block["moe"]["router_bias"], mtp_load)}
        params = {**params, "mtp": {**params["mtp"], "block": {**block, "moe": moe}}}
    return params


def router_bias_by_layer(params: dict, cfg: ModelConfig) -> jax.Array:
    """[L, E] router bias per decoder layer (zeros for hash layers)."""
    zeros = jnp.zeros((cfg.num_experts,), jnp.float32)
    return jnp.stack([layer["moe"].get("router_bias", zeros) for _, layer in layer_params(params, cfg)])


# ----- the step -------------------------------------------------------------------------------------------


def _batch_arrays(batch: dict) -> tuple[jax.Array, jax.Array]:
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    seg = batch.get("segment_ids")
    seg = jnp.zeros_like(ids) if seg is None else jnp.asarray(seg, jnp.int32)
    return ids, seg


def _micro_batches(x: jax.Array, accum: int) -> jax.Array:
    """[B, ...] -> [accum, B/accum, ...]; micro-batch j takes rows j, j+accum, ... so a data-sharded batch
    keeps every row on its device."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)


def _objective(params, mcfg: ModelConfig, tcfg: TrainConfig, ids, seg, norms, mtp_weight):
    """Loss of one micro-batch, already divided by the whole batch's counts.
    Returns (loss, (parts: the separate loss terms, loads: tokens per expert [L, E] and MTP [E]))."""
    use_mtp = tcfg.mtp_weight > 0 or tcfg.mtp_weight_after_decay > 0
    out = forward(params, mcfg, ids, segment_ids=seg, mtp=use_mtp, moe_strategy=tcfg.moe_strategy,
                  remat=tcfg.remat)
    mask = L.target_mask(ids, seg, 1, tcfg.pad_token_id)
    ce, z = L.cross_entropy_sum(out.logits, ids, mask, 1)
    parts = {"ce": ce / norms["tokens"], "z": z / norms["tokens"]}
    total = parts["ce"] + tcfg.z_loss_weight * parts["z"]
    if use_mtp and out.mtp_logits is not None:
        mtp_mask = L.target_mask(ids, seg, 2, tcfg.pad_token_id)
        mtp_ce, _ = L.cross_entropy_sum(out.mtp_logits, ids, mtp_mask, 2)
        parts["mtp"] = mtp_ce / norms["mtp_tokens"]
        total = total + mtp_weight * parts["mtp"]
    else:
        parts["mtp"] = jnp.zeros((), jnp.float32)
    score = score_layer_indices(mcfg)  # balance loss: score-routed decoder layers + the MTP block
    bal = jnp.zeros((), jnp.float32)
    if score:
        rows = jnp.asarray(score, jnp.int32)
        per_layer = L.balance_loss_per_layer(out.aux["expert_counts"][rows], out.aux["mean_affinity"][rows],
                                             mcfg.experts_per_token)
        bal = jnp.sum(per_layer)
    if "mtp_expert_counts" in out.aux:
        bal = bal + L.balance_loss_per_layer(out.aux["mtp_expert_counts"][None], out.aux["mtp_mean_affinity"][None],
                                             mcfg.experts_per_token)[0]
    parts["balance"] = bal / norms["sequences"]
    total = total + tcfg.balance_weight * parts["balance"]
    loads = {"expert_load": jnp.sum(out.aux["expert_counts"], axis=1)}  # [L, E]
    if "mtp_expert_counts" in out.aux:
        loads["mtp_load"] = jnp.sum(out.aux["mtp_expert_counts"], axis=0)  # [E]
    return total, (parts, loads)


def _zero_cotangent(g, p):
    return jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g


class StepStats(NamedTuple):
    """What the forward + backward half of a step hands to the update half beside the gradients."""
    total: jax.Array  # [] the objective
    parts: dict  # the separate loss terms
    loads: dict  # tokens per expert: expert_load [L, E], mtp_load [E]
    tokens: jax.Array  # [] valid next-token targets
    mtp_weight: jax.Array  # [] the MTP weight this step used


def build_gradient_fn(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh | None = None):
    """The un-jitted first half of a step: (params, step, batch) -> (grads like params, StepStats): forward +
    backward over the `grad_accum` micro-batches."""
    mcfg = model_config_for_training(cfg, tcfg)
    decay_at = decay_start_step(tcfg)
    accum = tcfg.grad_accum
    grad_fn = jax.value_and_grad(_objective, has_aux=True, allow_int=True)

    def gradients(params: Any, step: jax.Array, batch: dict) -> tuple[Any, StepStats]:
        ids, seg = _batch_arrays(batch)
        norms = {
            "tokens": jnp.maximum(jnp.sum(L.target_mask(ids, seg, 1, tcfg.pad_token_id)), 1).astype(jnp.float32),
            "mtp_tokens": jnp.maximum(jnp.sum(L.target_mask(ids, seg, 2, tcfg.pad_token_id)), 1).astype(jnp.float32),
            "sequences": jnp.float32(ids.shape[0]),
        }
        mtp_weight = jnp.where(step < decay_at, tcfg.mtp_weight, tcfg.mtp_weight_after_decay)
        micro_ids, micro_seg = _micro_batches(ids, accum), _micro_batches(seg, accum)
        if mesh is not None and accum > 1 and (ids.shape[0] // accum) % mesh.shape["data"] == 0:
            micro_spec = NamedSharding(mesh, P(None, "data"))
            micro_ids = jax.lax.with_sharding_constraint(micro_ids, micro_spec)
            micro_seg = jax.lax.with_sharding_constraint(micro_seg, micro_spec)

        def micro(carry, xs):
            grads_acc, total_acc, parts_acc, loads_acc = carry
            (total, (parts, loads)), grads = grad_fn(params, mcfg, tcfg, xs[0], xs[1], norms, mtp_weight)
            grads = jax.tree.map(_zero_cotangent, grads, params)
            add = lambda a, b: a + b  # noqa: E731
            return (jax.tree.map(add, grads_acc, grads), total_acc + total, jax.tree.map(add, parts_acc, parts),
                    jax.tree.map(add, loads_acc, loads)), None

        if accum == 1:
            (total, (parts, loads)), grads = grad_fn(params, mcfg, tcfg, ids, seg, norms, mtp_weight)
            grads = jax.tree.map(_zero_cotangent, grads, params)
        else:
            zeros_like = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
            shapes = jax.eval_shape(lambda: _objective(params, mcfg, tcfg, micro_ids[0], micro_seg[0], norms,
                                                       mtp_weight)[1])
            init = (zeros_like(params), jnp.zeros((), jnp.float32), zeros_like(shapes[0]), zeros_like(shapes[1]))
            (grads, total, parts, loads), _ = jax.lax.scan(micro, init, (micro_ids, micro_seg))
        return grads, StepStats(total, parts, loads, norms["tokens"], mtp_weight)

    return gradients


def build_update_fn(cfg: ModelConfig, tcfg: TrainConfig):
    """The un-jitted second half of a step: (state, grads, StepStats) -> (state, metrics): clipping, the
    optimizer, the router-bias rule and the non-finite guard."""
    mcfg = model_config_for_training(cfg, tcfg)
    optimizer = make_optimizer(mcfg, tcfg, per_layer=not layers_scanned(mcfg, tcfg))
    schedule = lr_schedule(tcfg)

    def update_state(state: TrainState, grads: Any, stats: StepStats) -> tuple[TrainState, dict]:
        total, parts, loads = stats.total, stats.parts, stats.loads
        trainable = jax.tree.leaves(jax.tree.map(lambda g, p: g if jnp.issubdtype(p.dtype, jnp.floating) else None,
                                                 grads, state.params))
        grad_norm = optax.tree.norm(trainable)

        def update(_):
            # Clipped inside the branch: XLA then fuses the scaling into the optimizer's per-leaf loops, where
            # outside it wrote every scaled gradient out first (small: ~60 ms of a ~300 ms AdamW update).
            clipped = grads
            if tcfg.clip_norm > 0:
                scale = jnp.minimum(1.0, tcfg.clip_norm / (grad_norm + 1e-12))
                clipped = jax.tree.map(
                    lambda g: g * scale.astype(g.dtype) if jnp.issubdtype(g.dtype, jnp.floating) else g, grads)
            updates, opt_state = optimizer.update(clipped, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            params = update_router_bias(params, mcfg, loads["expert_load"], loads.get("mtp_load"),
                                        tcfg.bias_update_speed)
            return params, opt_state

        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        # A branch, not a select over every leaf: selecting between old and new params + optimizer state cost
        # ~8% of the `mini` train step on CPU; the cond only runs the update when it is taken.
        params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
        rng, _ = jax.random.split(state.rng)
        new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=rng,
                               skipped=state.skipped + (~finite).astype(jnp.int32))

        load = loads["expert_load"].astype(jnp.float32)
        metrics = {
            "loss": parts["ce"], "mtp_loss": parts["mtp"], "balance_loss": parts["balance"], "z_loss": parts["z"],
            "total_loss": total, "grad_norm": grad_norm, "lr": schedule(state.step), "mtp_weight": stats.mtp_weight,
            "skipped": (~finite).astype(jnp.int32), "tokens": stats.tokens,
            # max / mean tokens per expert, per decoder layer (1 = perfectly balanced)
            "load_max_over_mean": jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9),
            "load_min_over_mean": jnp.min(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9),
            "bias_abs_mean": jnp.mean(jnp.abs(router_bias_by_layer(new_state.params, mcfg)), -1),
            "expert_load": load,  # [L, E] tokens per expert this step (the loop leaves it out of metrics.jsonl)
        }
        if "mtp_load" in loads:
            mload = loads["mtp_load"].astype(jnp.float32)
            metrics["mtp_load_max_over_mean"] = jnp.max(mload) / jnp.maximum(jnp.mean(mload), 1e-9)
            metrics["mtp_expert_load"] = mload
        return new_state, metrics

    return update_state


class TrainStep:
    """One optimizer step as two halves, `gradients` (forward + backward) and `update` (clipping, optimizer,
    router bias, non-finite guard); make_train_step compiles them as two programs, the first with deepmoe's XLA
    options, the second with XLA's defaults.

    Why two: on CPU the model's small reductions (mHC's sums over 4 streams) need YNNPACK kept off reductions
    (backend/xla_options.py), while the update's big ones need it on: with it off, XLA rewrites the global
    gradient norm into reduce-windows and `small`'s AdamW update (norm included) took 381 ms instead of 208 ms.
    Compile options apply per program, so each half gets its own."""

    def __init__(self, gradients, update):
        self.gradients, self.update = gradients, update

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.update(state, *self.gradients(state.params, state.step, batch))


def build_step_fn(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh | None = None) -> TrainStep:
    """The un-jitted step function (state, batch) -> (state, metrics): both halves, uncompiled."""
    return TrainStep(build_gradient_fn(cfg, tcfg, mesh), build_update_fn(cfg, tcfg))


def _step_key(tcfg: TrainConfig) -> TrainConfig:
    """Fields the compiled step doesn't read are normalised, so runs differing only in them share one compile."""
    return tcfg.replace(skip_nonfinite=False, seed=0)


def make_train_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh | None = None, donate: bool = False):
    """`step(state, {"input_ids": [B, T] int[, "segment_ids": [B, T] int]}) -> (state, metrics)`, compiled.

    With `mesh` (a jax.sharding.Mesh with a `data` axis): the batch is sharded over `data`, the state is
    replicated; the result equals the single-device step. `donate=True` donates the old state's buffers.
    Cached: the same (cfg, tcfg, mesh, donate) returns the same TrainStep (one compilation)."""
    return _make_train_step(cfg, _step_key(tcfg), mesh, donate)


@functools.lru_cache(maxsize=16)
def _make_train_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh | None, donate: bool) -> TrainStep:
    grad_kwargs: dict[str, Any] = {}
    # Without a donated state the gradients (temporaries of the step) are donated instead: the new parameters
    # reuse their buffers. With it there are already buffers for every output (params, moments).
    update_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else (1,)}
    if mesh is not None:
        if "data" not in mesh.axis_names:
            raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}")
        replicated = NamedSharding(mesh, P())
        grad_kwargs.update(in_shardings=(replicated, replicated, NamedSharding(mesh, P("data"))),
                           out_shardings=replicated)
        update_kwargs.update(in_shardings=(replicated,) * 3, out_shardings=(replicated, replicated))
    return TrainStep(xla_options.jit(build_gradient_fn(cfg, tcfg, mesh), **grad_kwargs),
                     jax.jit(build_update_fn(cfg, tcfg), **update_kwargs))


def make_eval_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh | None = None):
    """jitted `eval(params, batch) -> {"ce_sum", "tokens"}`: next-token CE (nats) summed over valid targets."""
    return _make_eval_step(cfg, _step_key(tcfg).replace(steps=1, lr=0.0), mesh)


@functools.lru_cache(maxsize=16)
def _make_eval_step(cfg: ModelConfig, tcfg: TrainConfig, mesh: Mesh | None):
    mcfg = model_config_for_training(cfg, tcfg)

    def evaluate(params, batch):
        ids, seg = _batch_arrays(batch)
        out = forward(params, mcfg, ids, segment_ids=seg, mtp=False, moe_strategy=tcfg.moe_strategy)
        mask = L.target_mask(ids, seg, 1, tcfg.pad_token_id)
        ce, _ = L.cross_entropy_sum(out.logits, ids, mask, 1)
        return {"ce_sum": ce, "tokens": jnp.sum(mask)}

    kwargs: dict[str, Any] = {}
    if mesh is not None:
        replicated = NamedSharding(mesh, P())
        kwargs.update(in_shardings=(replicated, NamedSharding(mesh, P("data"))), out_shardings=replicated)
    return xla_options.jit(evaluate, **kwargs)


def shard_batch(batch: dict, mesh: Mesh | None) -> dict:
    """Place a host batch: sharded over the mesh's `data` axis, or as-is without a mesh."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.device_put(np.asarray(v), sharding) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, P()))

