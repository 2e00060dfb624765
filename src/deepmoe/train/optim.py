"""Optimizer (spec §12): Muon for matrices, AdamW for the rest, nothing for buffers; LR schedule.

Assignment of every parameter leaf (decided from its name and logical axes in `param_specs`):

* **frozen** (no update, no state): `tid2eid` (the hash layers' int table) and `router_bias` (moved by the
  aux-loss-free rule in the train step, never by gradients).
* **adamw**: `embed`, `lm_head`, every RMSNorm weight (`*norm`), mHC `base` and `scale`, attention `sinks`,
  compressor `position_bias` (the report lists embedding, head, mHC biases/gates and norms; sinks and the
  positional bias are small per-position/per-head vectors, not linear maps). Weight decay only on the
  matrices among them (embed, lm_head, position_bias), not on norms, gates, biases or sinks.
* **muon**: every other matrix, including the mHC `fn` projections and the router weight (open question 3
  in the spec: we treat them as ordinary linear maps). Batch axes are orthogonalised independently:
  the stacked `layers` axis, the `experts` axis (each expert's matrix on its own) and the block-diagonal
  `o_groups` axis of `o_group_proj`. `q_up` [latent, heads, head_dim] is one map latent -> heads*head_dim;
  `o_proj` [groups, group_latent, D] is one map (groups*group_latent) -> D.

Muon = `optax.contrib.scale_by_muon` (Nesterov momentum 0.95, Frobenius pre-scaling, the hybrid
Newton-Schulz schedule 8 x (3.4445, -4.7750, 2.0315) then 2 x (2, -1.5, 0.5) given as a tuple of per-step
triples) -> `scale_by_shape(consistent_rms=0.18)` (update x 0.18 sqrt(max(n, m)), so its RMS matches AdamW's and
the same LR serves both) -> decoupled weight decay 0.1 -> -LR. optax's Nesterov momentum is the bias-corrected
EMA form (1-b) sum b^s g; after the Frobenius normalisation this equals the report's M = bM + G, update bM + G,
up to the bias correction of the first few steps.

Newton-Schulz band: the iteration maps each singular value s of M/||M||_F through the scalar polynomial
`newton_schulz_scalar_map`; for s >= 3e-5 the hybrid schedule lands in [1.0, 1.0021] (float64 analysis), so in
float32 every singular value >= 1e-4 ||M||_F comes out in [0.99, 1.01] (tests check this with numpy's SVD).
Smaller singular values (directions with ~no gradient) stay below 1.

AdamW: b1 0.9, b2 0.95, wd 0.1, eps 1e-8 by default (TrainConfig.adam_eps; the report uses 1e-20). With
1e-20, Adam divides rounding noise by its own magnitude: parameters whose true gradient is ~0 (at init the mHC
streams are identical copies, so several mHC `base` entries get gradients of pure rounding noise) then move by
a full +-lr per step in a direction set by the noise, so the run depends on reduction order (e.g. differs
between 1 and 8 devices). With 1e-8 such noise moves them by ~0.
`optimizer="adamw"` uses AdamW for every trainable leaf (weight decay as above + all Muon matrices).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz, scale_by_muon, scale_by_shape
from optax.transforms import MaskedNode

from deepmoe.config import ModelConfig
from deepmoe.params import is_spec, layer_param_specs, param_specs

HYBRID_NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
FROZEN_NAMES = {"tid2eid", "router_bias"}
ADAMW_NAMES = {"embed", "lm_head", "base", "scale", "sinks", "position_bias"}
BATCH_AXES = {"layers", "experts"}


def _name(path) -> str:
    return str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))


def _spec_leaves(cfg: ModelConfig, per_layer: bool = False):
    specs = layer_param_specs(cfg) if per_layer else param_specs(cfg)
    return jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)


def param_labels(cfg: ModelConfig, optimizer: str = "muon", per_layer: bool = False) -> Any:
    """A tree like the params with "muon" | "adamw" | "frozen" per leaf; per_layer: like params in the
    per-layer layout (`params.unstack_layers`) instead of the stacked one."""
    leaves, treedef = _spec_leaves(cfg, per_layer)
    labels = []
    for path, spec in leaves:
        name = _name(path)
        if name in FROZEN_NAMES or (spec.dtype or "float").startswith("int"):
            labels.append("frozen")
        elif name in ADAMW_NAMES or name.endswith("norm") or optimizer == "adamw":
            labels.append("adamw")
        else:
            labels.append("muon")
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'muon' or 'adamw'")
    return jax.tree.unflatten(treedef, labels)


def muon_dimension_numbers(path, spec) -> MuonDimensionNumbers:
    """Which axes of a Muon leaf are the matrix (reduction, output); every other axis is a batch axis."""
    name = _name(path)
    batch = {i for i, a in enumerate(spec.axes) if a in BATCH_AXES or (name == "o_group_proj" and a == "o_groups")}
    matrix = [i for i in range(len(spec.shape)) if i not in batch]
    if name == "q_up" and len(matrix) == 3:
        return MuonDimensionNumbers(reduction_axis=matrix[0], output_axis=tuple(matrix[1:]))
    if name == "o_proj" and len(matrix) == 3:
        return MuonDimensionNumbers(reduction_axis=tuple(matrix[:2]), output_axis=matrix[2])
    if len(matrix) != 2:
        raise ValueError(f"no Muon matrix layout known for parameter {jax.tree_util.keystr(path)} with axes "
                         f"{spec.axes}; add a rule in deepmoe.train.optim.muon_dimension_numbers")
    return MuonDimensionNumbers(reduction_axis=matrix[0], output_axis=matrix[1])


def _muon_dims_tree(cfg: ModelConfig, labels, per_layer: bool) -> Any:
    leaves, treedef = _spec_leaves(cfg, per_layer)
    label_leaves = jax.tree.leaves(labels)
    dims = [muon_dimension_numbers(p, s) if lab == "muon" else MaskedNode()
            for (p, s), lab in zip(leaves, label_leaves)]
    return jax.tree.unflatten(treedef, dims)


def _decay_matrices(params: Any) -> Any:
    """Weight-decay mask: True for leaves whose unstacked rank is >= 2 (a callable, so it also fits the
    masked sub-trees `optax.partition` hands to each optimizer)."""
    def is_matrix(path, x):
        stacked = any(getattr(k, "key", None) == "segments" for k in path)
        return x.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def lr_schedule(tcfg) -> optax.Schedule:
    """Linear warmup to `lr` over `warmup_steps` (step 0 already trains at lr/warmup), constant until
    `decay_start_step(tcfg)`, then cosine to `lr * min_lr_ratio` at `steps`."""
    peak, warmup, total = tcfg.lr, max(int(tcfg.warmup_steps), 0), max(int(tcfg.steps), 1)
    start = decay_start_step(tcfg)
    floor = peak * tcfg.min_lr_ratio

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum(1.0, (count + 1.0) / max(warmup, 1))
        progress = jnp.clip((count - start) / max(total - start, 1), 0.0, 1.0)
        cosine = floor + 0.5 * (peak - floor) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < start, warm, cosine)

    return schedule


def decay_start_step(tcfg) -> int:
    """The step at which the LR starts to decay (and the MTP weight drops)."""
    return max(int(tcfg.warmup_steps), int(round(tcfg.decay_start * tcfg.steps)))


def make_optimizer(cfg: ModelConfig, tcfg, per_layer: bool = False) -> optax.GradientTransformation:
    """The update rule for the full parameter tree (clipping is done by the train step, which reports the norm),
    stacked or, with per_layer, in the per-layer layout (the same update: Muon treats the stacked `layers`
    axis as a batch axis)."""
    labels = param_labels(cfg, tcfg.optimizer, per_layer)
    schedule = lr_schedule(tcfg)
    adamw = optax.adamw(schedule, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps,
                        weight_decay=tcfg.weight_decay, mask=_decay_matrices)
    transforms = {"adamw": adamw, "frozen": optax.set_to_zero()}
    if tcfg.optimizer == "muon":
        dims = _muon_dims_tree(cfg, labels, per_layer)
        transforms["muon"] = optax.chain(
            scale_by_muon(ns_coeffs=HYBRID_NS_COEFFS, ns_steps=len(HYBRID_NS_COEFFS), beta=tcfg.muon_momentum,
                          nesterov=True, weight_dimension_numbers=dims),
            scale_by_shape(weight_dimension_numbers=dims, consistent_rms=tcfg.muon_rms),
            optax.add_decayed_weights(tcfg.weight_decay),
            optax.scale_by_learning_rate(schedule),
        )
    return optax.partition(transforms, labels)


def orthogonalize(x: jax.Array, dims: MuonDimensionNumbers | None = None) -> jax.Array:
    """The hybrid Newton-Schulz orthogonalisation Muon applies (for tests / inspection). x: [..., m, n] with
    every leading axis a batch axis unless `dims` says otherwise."""
    if dims is None:
        dims = MuonDimensionNumbers(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1)
    return orthogonalize_via_newton_schulz(x, jnp.asarray(HYBRID_NS_COEFFS, x.dtype), len(HYBRID_NS_COEFFS),
                                           dimension_numbers=dims)


def newton_schulz_scalar_map(sigma, coeffs=HYBRID_NS_COEFFS):
    """The polynomial the iteration applies to each singular value of X / ||X||_F (numpy or jax)."""
    for a, b, c in coeffs:
        sigma = a * sigma + b * sigma ** 3 + c * sigma ** 5
    return sigma


def trainable_count(cfg: ModelConfig, tcfg) -> dict[str, int]:
    """Number of parameters per optimizer label (for logs)."""
    labels = jax.tree.leaves(param_labels(cfg, tcfg.optimizer))
    specs = [s for _, s in _spec_leaves(cfg)[0]]
    out: dict[str, int] = {}
    for lab, s in zip(labels, specs):
        out[lab] = out.get(lab, 0) + math.prod(s.shape)
    return out
