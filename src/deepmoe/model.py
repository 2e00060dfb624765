"""The whole model: embed -> mHC streams -> decoder blocks (scanned per segment over stacked parameters, or
unrolled over per-layer ones) -> HC head -> logits; MTP."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from deepmoe.backend import xla_options
from deepmoe.config import ModelConfig
from deepmoe.layers.block import block
from deepmoe.layers.documents import document_positions
from deepmoe.layers.hyper import hc_head
from deepmoe.layers.mtp import mtp_hidden
from deepmoe.layers.norms import rms_norm
from deepmoe.layers.precision import compute_dtype, einsum_f32
from deepmoe.moe_dispatch import MeshStrategy, strategy_options
from deepmoe.params import layer_params, layer_segments

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class ModelOutput:
    logits: jax.Array  # [B, T, V] float32
    mtp_logits: jax.Array | None  # [B, T, V] float32: position t predicts token t+2
    aux: dict[str, Any]  # router statistics per layer: expert_counts [L, B, E], mean_affinity [L, B, E]; mtp_*


def _check_inputs(cfg: ModelConfig, input_ids: jax.Array) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"input_ids must be integers, got {input_ids.dtype}")
    # Concrete ids (also when closed over by a jitted caller) are range-checked; traced ids and global arrays
    # spread over several hosts cannot be read here.
    if not isinstance(input_ids, jax.core.Tracer) and getattr(input_ids, "is_fully_addressable", True):
        concrete = np.asarray(input_ids)
        low, high = int(concrete.min()), int(concrete.max())
        if low < 0 or high >= cfg.vocab_size:
            raise ValueError(f"token id out of range: ids span [{low}, {high}] but vocab_size={cfg.vocab_size}")


def _run_segments(params: dict, cfg: ModelConfig, streams, token_ids, positions, segment_ids, moe_strategy, remat,
                  sharding=None):
    stats_per_layer: list[tuple[int, dict]] = []
    for index, (segment, seg_params) in enumerate(zip(layer_segments(cfg), params["segments"])):

        def run_block(layer_params, position, carry, segment=segment, index=index):
            if sharding is not None:  # FSDP: gather this layer's parameters inside the scan (and the remat)
                layer_params = sharding.gather_layer(index, position, layer_params)
            carry, stats = block(layer_params, cfg, segment.kinds[position][0], carry, token_ids, positions,
                                 segment_ids, moe_strategy)
            return (carry if sharding is None else sharding.streams(carry)), stats

        if remat != "none":
            # Per layer, not around the whole body: a body holds the segment's pattern (up to 8 layers, `mini`'s
            # whole schedule), and recomputing it at once kept every one of its layers' activations live in the
            # backward (`mini` T=2048 remat="full": 709 MiB of temporaries, as without remat; 296 per layer).
            # Inside a scan the loop keeps XLA from merging the recomputation with the forward (prevent_cse off,
            # as jax.checkpoint advises there); a segment that runs once is straight-line code and needs it on.
            run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[remat], static_argnums=(1,),
                                       prevent_cse=segment.repeats == 1)

        def body(carry, layer_params, run_block=run_block):
            outs = []
            for position, p in enumerate(layer_params):
                carry, stats = run_block(p, position, carry)
                outs.append(stats)
            return carry, outs

        streams, outs = segment.scan(body, streams, seg_params)
        for position, stats in enumerate(outs):  # stats: [repeats, B, E] each
            for r in range(segment.repeats):
                stats_per_layer.append((segment.layer_index(r, position), jax.tree.map(lambda s: s[r], stats)))
    stats_per_layer.sort(key=lambda item: item[0])
    aux = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in stats_per_layer])
    return streams, aux


def _run_layers(params: dict, cfg: ModelConfig, streams, token_ids, positions, segment_ids, moe_strategy, remat):
    """The per-layer layout (`params.unstack_layers`, the train step's unless TrainConfig.scan_layers): the
    layers one after another, unrolled, each reading its own arrays. Over the stacks the scan copies every
    layer's weights out of them, and in the gradient also the saved activations and the weight gradients
    back in (`small` gradient -15 %); the price is one compiled body per layer instead of per pattern."""
    def run_block(carry, weights, attn_type):
        return block(weights, cfg, attn_type, carry, token_ids, positions, segment_ids, moe_strategy)

    if remat != "none":
        run_block = jax.checkpoint(run_block, policy=REMAT_POLICIES[remat], static_argnums=(2,))
    stats = []
    for (attn_type, _), weights in layer_params(params, cfg):
        streams, layer_stats = run_block(streams, weights, attn_type)
        stats.append(layer_stats)
    return streams, jax.tree.map(lambda *xs: jnp.stack(xs), *stats)


def logits_from_hidden(params: dict, hidden: jax.Array) -> jax.Array:
    """[B, T, D] normed hidden -> [B, T, V] float32 (the head runs in float32)."""
    return einsum_f32("btd,dv->btv", hidden, params["lm_head"])


def forward(params: dict, cfg: ModelConfig, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None, mtp: bool = True, moe_strategy="auto", remat: str = "none",
            mesh=None, rules=None, kernels: str | None = None) -> ModelOutput:
    """Full-sequence forward. input_ids [B, T] int; segment_ids [B, T] marks packed documents (attention and
    compression never cross them); positions default to the index inside each document.

    params: stacked (`init_params`: layers scanned per segment) or per-layer (`params.unstack_layers`: layers
    unrolled; what the train step trains unless TrainConfig.scan_layers). Both give the same result.

    moe_strategy: a name in moe_dispatch.NAMES or a moe_dispatch.MoEStrategy; "auto" without a mesh is
    moe_dispatch.local_strategy ("sorted" on TPU and, with Pallas kernels, on GPU; "blocked" elsewhere).
    mesh / rules: run sharded (params placed by sharding.shard_params): activations constrained at block
    boundaries, FSDP parameters gathered per layer, the MoE strategy bound to the mesh.
    kernels: override cfg.kernels ("reference" | "pallas" | "auto") for the attention core and the routed
    experts' grouped matmul.

    Called on concrete arrays (not inside jit / grad / vmap), it runs as one compiled program per config and
    shapes: op by op, `tiny`'s forward took ~25 s on a 2-core CPU the first time and ~2 s each time after,
    against ~8 s and ~10 ms compiled. Under `jax.disable_jit()` it runs op by op, for debugging."""
    if kernels is not None:
        cfg = cfg.replace(kernels=kernels)
    _check_inputs(cfg, input_ids)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if "layers" in params and mesh is not None:
        raise ValueError("the sharded forward runs over the stacked parameter layout (`segments`, whose "
                         "leading `layers` axis the sharding rules place); convert with "
                         "deepmoe.params.stack_layers(params, cfg)")
    if not isinstance(moe_strategy, MeshStrategy):
        strategy_options(moe_strategy)  # a misspelt name fails here, before any layer runs
    options = dict(cfg=cfg, mtp=mtp, moe_strategy=moe_strategy, remat=remat, mesh=mesh, rules=rules)
    arrays = (params, input_ids, segment_ids, positions)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(arrays)):
        return _forward(*arrays, **options)  # inside the caller's transformation: its program holds ours
    return _forward_jit(*arrays, **options)


def _forward(params, input_ids, segment_ids, positions, *, cfg, mtp, moe_strategy, remat, mesh,
             rules) -> ModelOutput:
    per_layer = "layers" in params
    sharding = None
    if mesh is not None:
        from deepmoe.sharding import ForwardSharding

        sharding = ForwardSharding.create(cfg, mesh, rules, input_ids.shape[0])
        moe_strategy = sharding.moe_strategy(moe_strategy)
    if segment_ids is None:
        segment_ids = jnp.zeros(input_ids.shape, jnp.int32)
    if positions is None:
        positions = document_positions(segment_ids)
    dtype = compute_dtype(cfg)
    h0 = params["embed"][input_ids].astype(dtype)
    streams = jnp.broadcast_to(h0[:, :, None, :], (*h0.shape[:2], cfg.residual_streams, h0.shape[-1]))
    if sharding is not None:
        streams = sharding.streams(streams)
    if per_layer:
        streams, aux = _run_layers(params, cfg, streams, input_ids, positions, segment_ids, moe_strategy, remat)
    else:
        streams, aux = _run_segments(params, cfg, streams, input_ids, positions, segment_ids, moe_strategy, remat,
                                     sharding)
    hidden = rms_norm(hc_head(params["hc_head"], cfg, streams), params["final_norm"], cfg.rms_norm_eps)
    logits = logits_from_hidden(params, hidden)
    if sharding is not None:
        logits = sharding.logits(logits)
    mtp_logits = None
    if mtp and cfg.num_mtp_layers and "mtp" in params:
        mtp_h, mtp_stats = mtp_hidden(params["mtp"], cfg, streams, params["embed"], input_ids, positions,
                                      segment_ids, moe_strategy)
        mtp_logits = logits_from_hidden(params, mtp_h)
        if sharding is not None:
            mtp_logits = sharding.logits(mtp_logits)
        aux = {**aux, **{f"mtp_{k}": v for k, v in mtp_stats.items()}}
    return ModelOutput(logits=logits, mtp_logits=mtp_logits, aux=aux)


# deepmoe's compile options, as prefill and decode: YNNPACK for dots only on CPU, and the collective-safe schedule
# on a multi-device mesh. Only for concrete arguments: under a caller's transformation `forward` traces `_forward`
# inline, where this wrapper would nest a jit.
_forward_jit = xla_options.jit(_forward, static_argnames=("cfg", "mtp", "moe_strategy", "remat", "mesh", "rules"))
