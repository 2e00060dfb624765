"""Model variants and train steps for the ablation experiments (`experiments/ablation_*.py`) and notebooks.

Residual variants (`residual_forward`), all on the parameter tree of `init_params(cfg)`:

* ``mhc``   DeepSeek-V4's manifold-constrained hyper-connections: the same `hc_pre` / `hc_post` / `hc_head`
            calls in the same order as `layers.block.block_with`, so the logits equal `deepmoe.forward`'s
            (tested). The residual mixing matrix is Sinkhorn-projected onto the doubly stochastic matrices.
* ``hc``    unconstrained hyper-connections (Zhu et al. 2024 style): identical except the mixing matrix is used
            raw, `comb = I + tanh(alpha_comb * mix + base)` -- an identity-initialised free matrix with a
            bounded dynamic part, no softmax and no Sinkhorn. `pre` / `post` gains are kept as in mHC, so only
            the constraint on the residual map differs.
* ``plain`` a single residual stream: h += Attn(RMSNorm(h)); h += MoE(RMSNorm(h)); logits from
            RMSNorm(h). The mHC parameters are present but unused (zero gradient).

`residual_forward` also returns a trace: the RMS of the residual after every layer (signal gain over depth =
rms_l / rms_0), each sub-block's mixing matrix, router counts, and optionally each layer's normed attention
input (for inspecting attention patterns). Zero `deltas` added to each layer's output give, by
differentiation, the gradient reaching every layer (dL/dX_l).

Train steps: `make_residual_step` (a residual variant under deepmoe.train's optimizer, clipping and router-bias
rule) and `make_options_step` (deepmoe.train's own step function with the balancing options as run-time
arguments, so every balancing variant shares one compilation). Training runs: `train_config` (the ablations'
TrainConfig), `train_residual` / `train_options` (a variant from its initialisation over fresh batches,
every step's metrics kept).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepmoe.config import ModelConfig
from deepmoe.layers.attention import attention
from deepmoe.layers.documents import document_positions
from deepmoe.layers.hyper import hc_head, hc_post, hc_pre, mix_logits, weighted_stream_sum
from deepmoe.layers.moe import moe
from deepmoe.layers.norms import rms_norm
from deepmoe.layers.precision import compute_dtype
from deepmoe.model import logits_from_hidden
from deepmoe.params import layer_params as all_layer_params, layer_segments

RESIDUALS = ("mhc", "hc", "plain")


# ----- residual variants -----------------------------------------------------------------------------------

def hc_pre_unconstrained(params: dict, cfg: ModelConfig, streams: jax.Array
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`hc_pre` with a raw mixing matrix: comb = I + tanh(alpha_comb * mix + base) (no softmax, no Sinkhorn).
    streams [B,T,n,D] -> (sub-block input [B,T,D], post gains [B,T,n], comb [B,T,n,n])."""
    n = cfg.residual_streams
    mix = mix_logits(params, cfg, streams)
    scale, base = params["scale"].astype(jnp.float32), params["base"].astype(jnp.float32)
    pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + cfg.hc_eps
    post = 2.0 * jax.nn.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    free = jnp.tanh(mix[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*mix.shape[:-1], n, n)
    comb = jnp.eye(n, dtype=jnp.float32) + free
    x_in = weighted_stream_sum(pre[..., None], streams.astype(jnp.float32))[..., 0, :]
    return x_in.astype(streams.dtype), post, comb


def residual_block(params: dict, cfg: ModelConfig, residual: str, layer_type: str, x: jax.Array,
                   token_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, moe_strategy="sorted",
                   collect_inputs: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One decoder layer under a residual variant. x: streams [B,T,n,D] (mhc, hc) or [B,T,D] (plain).
    -> (x, record: router stats, `comb` [2,B,T,n,n] for mhc/hc, `attn_input` [B,T,D] if collect_inputs)."""
    eps = cfg.rms_norm_eps
    record: dict[str, jax.Array] = {}
    if residual == "plain":
        attn_in = rms_norm(x, params["attn_norm"], eps)
        x = x + attention(params["attn"], cfg, layer_type, attn_in, positions, segment_ids).astype(x.dtype)
        f, stats = moe(params["moe"], cfg, rms_norm(x, params["ffn_norm"], eps), token_ids, moe_strategy)
        x = x + f.astype(x.dtype)
    else:  # the order of layers.block.block_with
        pre_fn = hc_pre if residual == "mhc" else hc_pre_unconstrained
        h, post, comb_attn = pre_fn(params["attn_hc"], cfg, x)
        attn_in = rms_norm(h, params["attn_norm"], eps)
        a = attention(params["attn"], cfg, layer_type, attn_in, positions, segment_ids)
        x = hc_post(a, x, post, comb_attn)
        h, post, comb_ffn = pre_fn(params["ffn_hc"], cfg, x)
        f, stats = moe(params["moe"], cfg, rms_norm(h, params["ffn_norm"], eps), token_ids, moe_strategy)
        x = hc_post(f, x, post, comb_ffn)
        record["comb"] = jnp.stack([comb_attn, comb_ffn])
    record.update(stats)
    if collect_inputs:
        record["attn_input"] = attn_in
    return x, record


def _rms(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.mean(x * x))


def residual_forward(params: dict, cfg: ModelConfig, input_ids: jax.Array, residual: str = "mhc", *,
                     segment_ids: jax.Array | None = None, deltas: jax.Array | None = None,
                     moe_strategy="sorted", collect_inputs: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """input_ids [B,T] -> (logits [B,T,V] float32, trace). Layers are scanned per segment like
    `deepmoe.forward` (no MTP). trace: `stream_rms` [L+1] (embedding, then after every layer), `comb`
    [L,2,B,T,n,n] (mhc/hc), `expert_counts` / `mean_affinity` [L,B,E], `attn_input` [L,B,T,D] if asked.
    deltas [L, *residual shape] (optional) is added to each layer's output: d loss / d deltas = dL/dX_l."""
    if residual not in RESIDUALS:
        raise ValueError(f"unknown residual variant {residual!r}; choose one of {RESIDUALS}")
    if segment_ids is None:
        segment_ids = jnp.zeros(input_ids.shape, jnp.int32)
    positions = document_positions(segment_ids)
    h0 = params["embed"][input_ids].astype(compute_dtype(cfg))
    x = h0 if residual == "plain" else jnp.broadcast_to(
        h0[:, :, None, :], (*h0.shape[:2], cfg.residual_streams, h0.shape[-1]))
    initial_rms = _rms(x)
    records: list[Any] = [None] * cfg.num_layers
    for segment, seg_params in zip(layer_segments(cfg), params["segments"]):
        index = np.array([[segment.layer_index(r, p) for p in range(len(segment.kinds))]
                          for r in range(segment.repeats)])
        seg_deltas = None if deltas is None else deltas[index]  # [repeats, pattern, ...]

        def body(carry, xs, segment=segment):
            layer_params, layer_deltas = xs
            outs = []
            for p, ((attn_type, _), lp) in enumerate(zip(segment.kinds, layer_params)):
                carry, rec = residual_block(lp, cfg, residual, attn_type, carry, input_ids, positions, segment_ids,
                                            moe_strategy, collect_inputs)
                if layer_deltas is not None:
                    carry = carry + layer_deltas[p].astype(carry.dtype)
                rec["stream_rms"] = _rms(carry)
                outs.append(rec)
            return carry, outs

        x, outs = segment.scan(body, x, (seg_params, seg_deltas))
        for p, rec in enumerate(outs):
            for r in range(segment.repeats):
                records[segment.layer_index(r, p)] = jax.tree.map(lambda a, r=r: a[r], rec)
    trace = jax.tree.map(lambda *xs: jnp.stack(xs), *records)
    trace["stream_rms"] = jnp.concatenate([initial_rms[None], trace["stream_rms"]])
    hidden = x if residual == "plain" else hc_head(params["hc_head"], cfg, x)
    logits = logits_from_hidden(params, rms_norm(hidden, params["final_norm"], cfg.rms_norm_eps))
    return logits, trace


def composite_gains(combs: jax.Array) -> dict[str, jax.Array]:
    """Amax gains of the composite residual map over depth (the mHC paper's stability measure).

    combs [S, ..., n, n]: the mixing matrices of S consecutive sub-blocks (X_new = comb^T X). With
    P_s = comb_s^T ... comb_1^T: `forward` = max |row sum| of P_s (signal amplification),
    `backward` = max |column sum| (gradient amplification), max over tokens; `*_mean` averaged over tokens.
    Doubly stochastic matrices keep both at 1. -> arrays [S]."""
    n = combs.shape[-1]
    p = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), combs.shape[1:])
    out: dict[str, list] = {"forward": [], "backward": [], "forward_mean": [], "backward_mean": []}
    for s in range(combs.shape[0]):
        p = jnp.einsum("...jk,...jl->...kl", combs[s].astype(jnp.float32), p)
        rows = jnp.max(jnp.sum(jnp.abs(p), axis=-1), axis=-1)  # [...]
        cols = jnp.max(jnp.sum(jnp.abs(p), axis=-2), axis=-1)
        out["forward"].append(jnp.max(rows))
        out["backward"].append(jnp.max(cols))
        out["forward_mean"].append(jnp.mean(rows))
        out["backward_mean"].append(jnp.mean(cols))
    return {k: jnp.stack(v) for k, v in out.items()}


def layer_grad_norms(grads: dict, cfg: ModelConfig) -> jax.Array:
    """[L] global norm of each decoder layer's parameter gradient (floating leaves)."""
    squares: list[Any] = [jnp.zeros((), jnp.float32)] * cfg.num_layers
    for segment, seg_grads in zip(layer_segments(cfg), grads["segments"]):
        for p, layer in enumerate(seg_grads):
            leaves = [g for g in jax.tree.leaves(layer) if jnp.issubdtype(g.dtype, jnp.floating)]
            per_repeat = sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
                             for g in leaves)
            for r in range(segment.repeats):
                squares[segment.layer_index(r, p)] = per_repeat[r]
    return jnp.sqrt(jnp.stack(squares))


def layer_params(params: dict, cfg: ModelConfig, layer: int) -> dict:
    """The parameters of decoder layer `layer` (from either layout: stacked or per-layer)."""
    if not 0 <= layer < cfg.num_layers:
        raise IndexError(f"layer {layer} out of range (num_layers={cfg.num_layers})")
    return all_layer_params(params, cfg)[layer][1]


def attention_cost(attn_params: dict, cfg: ModelConfig, layer_type: str, seq_len: int, *, batch: int = 1,
                   repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Compile one attention layer's forward for [batch, seq_len] and measure it: XLA's `cost_analysis` FLOPs
    and bytes accessed, `memory_analysis` temporary bytes, and the best wall time of `repeats` runs."""
    import time

    x = jax.random.normal(jax.random.key(seed), (batch, seq_len, cfg.hidden_size)).astype(compute_dtype(cfg))
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    segment_ids = jnp.zeros((batch, seq_len), jnp.int32)
    fn = jax.jit(lambda p, x: attention(p, cfg, layer_type, x, positions, segment_ids))
    start = time.perf_counter()
    compiled = fn.lower(attn_params, x).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(attn_params, x))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(attn_params, x))
        best = min(best, time.perf_counter() - start)
    return {"flops": float(cost.get("flops", float("nan"))),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
            "temp_bytes": float(getattr(memory, "temp_size_in_bytes", float("nan"))),
            "seconds": best, "compile_seconds": compile_seconds}


def ablation_model(quick: bool) -> ModelConfig:
    """The model of the attention and balancing ablations. Full: the `tiny` preset (SWA, CSA, HCA, CSA; layer 0
    hash-routed) without MTP. Quick (tests): tiny widths, 2 layers (CSA, HCA), no hash layer, 3 Sinkhorn
    iterations -- the same compilation serves the hybrid attention run and every balancing variant, and
    compiles in a fraction of the time."""
    from deepmoe.config import CSA, HCA, preset

    if quick:
        return preset("tiny", num_layers=2, layer_types=(CSA, HCA), num_hash_layers=0, num_mtp_layers=0,
                      sinkhorn_iterations=3)
    return preset("tiny", num_mtp_layers=0)


def attention_variants(cfg: ModelConfig, seq_len: int) -> dict[str, ModelConfig]:
    """hybrid: cfg's own schedule (CSA / HCA / SWA); sliding: every layer sliding-window (same window);
    dense: every layer sliding with window = seq_len, i.e. dense causal attention."""
    from deepmoe.config import SLIDING

    sliding = cfg.replace(layer_types=(SLIDING,) * cfg.num_layers)
    return {"hybrid": cfg, "sliding": sliding, "dense": sliding.replace(sliding_window=max(seq_len,
                                                                                          cfg.sliding_window))}


# ----- train steps -----------------------------------------------------------------------------------------

def _batch(batch: dict) -> tuple[jax.Array, jax.Array]:
    ids = jnp.asarray(batch["input_ids"], jnp.int32)
    seg = batch.get("segment_ids")
    return ids, (jnp.zeros_like(ids) if seg is None else jnp.asarray(seg, jnp.int32))


def _zero_cotangent(g, p):
    return jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g


def make_residual_step(cfg: ModelConfig, tcfg, residual: str):
    """jitted `step(params, opt_state, batch) -> (params, opt_state, metrics)` training `residual_forward`
    with deepmoe.train's optimizer (Muon/AdamW per TrainConfig), LR schedule, clipping and aux-loss-free
    router-bias rule; next-token CE only (no MTP, no balance loss). A non-finite step leaves the parameters
    unchanged (`skipped` = 1). metrics: loss, grad_norm, lr, skipped, layer_grad_norm [L],
    activation_grad_norm [L] (|dL/dX_l|), stream_rms [L+1], expert_load [L,E], and for mhc/hc the composite
    gains over the 2L sub-blocks (comb_forward_gain, comb_backward_gain, + *_mean) [2L]."""
    return _make_residual_step(cfg, tcfg.replace(skip_nonfinite=False, seed=0), residual)


@functools.lru_cache(maxsize=8)
def _make_residual_step(cfg: ModelConfig, tcfg, residual: str):
    from deepmoe.train import loss as L
    from deepmoe.train.optim import lr_schedule, make_optimizer
    from deepmoe.train.step import model_config_for_training, update_router_bias

    mcfg = model_config_for_training(cfg, tcfg)
    optimizer = make_optimizer(mcfg, tcfg)
    schedule = lr_schedule(tcfg)

    def objective(params, deltas, ids, seg):
        logits, trace = residual_forward(params, mcfg, ids, residual, segment_ids=seg, deltas=deltas,
                                         moe_strategy=tcfg.moe_strategy)
        mask = L.target_mask(ids, seg, 1, tcfg.pad_token_id)
        ce, _ = L.cross_entropy_sum(logits, ids, mask, 1)
        return ce / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32), trace

    grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True, allow_int=True)

    def step(params, opt_state, batch, step_index):
        ids, seg = _batch(batch)
        b, t = ids.shape
        shape = (cfg.num_layers, b, t, cfg.hidden_size)
        if residual != "plain":
            shape = (cfg.num_layers, b, t, cfg.residual_streams, cfg.hidden_size)
        (loss, trace), (grads, delta_grads) = grad_fn(params, jnp.zeros(shape, jnp.float32), ids, seg)
        grads = jax.tree.map(_zero_cotangent, grads, params)
        floating = [g for g in jax.tree.leaves(grads) if jnp.issubdtype(g.dtype, jnp.floating)]
        grad_norm = optax.tree.norm(floating)
        if tcfg.clip_norm > 0:
            factor = jnp.minimum(1.0, tcfg.clip_norm / (grad_norm + 1e-12))
            clipped = jax.tree.map(lambda g: g * factor.astype(g.dtype)
                                   if jnp.issubdtype(g.dtype, jnp.floating) else g, grads)
        else:
            clipped = grads
        updates, new_opt = optimizer.update(clipped, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        load = jnp.sum(trace["expert_counts"], axis=1)  # [L, E]
        new_params = update_router_bias(new_params, mcfg, load, None, tcfg.bias_update_speed)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = {
            "loss": loss, "grad_norm": grad_norm, "lr": schedule(step_index), "skipped": (~finite).astype(jnp.int32),
            "layer_grad_norm": layer_grad_norms(grads, cfg),
            "activation_grad_norm": jnp.sqrt(jnp.sum(jnp.square(delta_grads).reshape(cfg.num_layers, -1), -1)),
            "stream_rms": trace["stream_rms"], "expert_load": load,
        }
        if "comb" in trace:
            combs = trace["comb"]  # [L, 2, B, T, n, n] -> the 2L sub-blocks in order
            gains = composite_gains(combs.reshape(-1, *combs.shape[2:]))
            metrics.update({f"comb_{k}_gain": v for k, v in gains.items()})
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    return jax.jit(step, donate_argnums=(0, 1))


def init_residual_state(cfg: ModelConfig, tcfg, key: jax.Array) -> tuple[dict, Any]:
    """(fp32 params, optimizer state) for `make_residual_step` (same initialisation as deepmoe.train)."""
    from deepmoe.train.step import init_state

    state = init_state(cfg, tcfg.replace(scan_layers=True), key)  # residual_forward scans the stacked layout
    return state.params, state.opt_state


def balancing_options_key(tcfg):
    """The TrainConfig a `make_options_step` compilation is keyed on (run-time options zeroed)."""
    return tcfg.replace(bias_update_speed=0.0, balance_weight=0.0, skip_nonfinite=False, seed=0)


def make_options_step(cfg: ModelConfig, tcfg):
    """deepmoe.train's step function (`train.step.build_step_fn`: forward, losses, Muon/AdamW, clipping,
    aux-loss-free bias update) with `bias_update_speed` and `balance_weight` taken at run time:
    `step(state, batch, bias_update_speed, balance_weight) -> (state, metrics)`. All balancing variants of one
    (cfg, tcfg) share this single compilation; with tcfg's own values it computes exactly `make_train_step`."""
    return _make_options_step(cfg, balancing_options_key(tcfg))


@functools.lru_cache(maxsize=8)
def _make_options_step(cfg: ModelConfig, base):
    from deepmoe.train.step import build_step_fn

    def step(state, batch, bias_update_speed, balance_weight):
        tcfg = base.replace(bias_update_speed=bias_update_speed, balance_weight=balance_weight)
        return build_step_fn(cfg, tcfg)(state, batch)

    return jax.jit(step, donate_argnums=(0,))


# ----- training runs ---------------------------------------------------------------------------------------

def train_config(*, steps: int, batch: int, seq_len: int, lr: float, optimizer: str, seed: int):
    """The ablations' TrainConfig: deepmoe.train's defaults, warmup over 10 % of the steps, no MTP loss (the
    ablation models have no MTP layers). Keywords as `experiment.train_settings` gives them."""
    from deepmoe.train import TrainConfig

    return TrainConfig(steps=steps, batch_size=batch, seq_len=seq_len, lr=lr, warmup_steps=max(1, steps // 10),
                       optimizer=optimizer, mtp_weight=0.0, mtp_weight_after_decay=0.0, seed=seed)


def run_steps(step: Callable, carry: Any, dataset, steps: int) -> tuple[Any, list[dict], float]:
    """`carry, metrics = step(carry, batch, i)` over the first `steps` batches of `dataset` (every variant sees
    the same ones). -> (last carry, every step's metrics on the host, seconds)."""
    from deepmoe.train.data import DataState

    data = DataState()
    rows = []
    start = time.perf_counter()
    for i in range(steps):
        batch, data = dataset.batch(data)
        carry, metrics = step(carry, batch, i)
        rows.append(jax.device_get(metrics))
    return carry, rows, time.perf_counter() - start


def train_residual(cfg: ModelConfig, tcfg, residual: str, dataset) -> tuple[list[dict], float]:
    """Train a residual variant (`make_residual_step`) from deepmoe.train's initialisation at tcfg.seed.
    -> (every step's metrics, seconds)."""
    step = make_residual_step(cfg, tcfg, residual)

    def one(carry, batch, i):
        params, opt_state, metrics = step(*carry, batch, i)
        return (params, opt_state), metrics

    _, rows, seconds = run_steps(one, init_residual_state(cfg, tcfg, jax.random.key(tcfg.seed)), dataset,
                                 tcfg.steps)
    return rows, seconds


def train_options(cfg: ModelConfig, tcfg, dataset, bias_update_speed: float | None = None,
                  balance_weight: float | None = None) -> tuple[Any, list[dict], float]:
    """Train with deepmoe.train's step (`make_options_step`) from `init_state` at tcfg.seed; the balancing
    options default to tcfg's. -> (final TrainState, every step's metrics, seconds)."""
    from deepmoe.train.step import init_state

    speed = tcfg.bias_update_speed if bias_update_speed is None else bias_update_speed
    weight = tcfg.balance_weight if balance_weight is None else balance_weight
    step = make_options_step(cfg, tcfg)
    return run_steps(lambda state, batch, _: step(state, batch, speed, weight),
                     init_state(cfg, tcfg, jax.random.key(tcfg.seed)), dataset, tcfg.steps)


__all__ = ["RESIDUALS", "hc_pre_unconstrained", "residual_block", "residual_forward", "composite_gains",
           "layer_grad_norms", "layer_params", "attention_cost", "make_residual_step", "init_residual_state",
           "make_options_step", "balancing_options_key", "attention_variants", "ablation_model", "train_config",
           "run_steps", "train_residual", "train_options"]
