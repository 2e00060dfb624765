"""Dropless MoE for platforms without a native grouped matmul (CPU), in two parts:

- lanes: each expert's first `lane_rows` token copies (sorted by expert) sit in an [E, lane_rows, D] tensor and
  go through the experts as three batched matmuls, read where the weights lie. Lanes hold 1.25x an expert's
  average share: with balanced routing almost every copy is here, and a batched matmul runs ~1.35x faster
  than the same rows as a loop of blocks (XLA:CPU, [16 x 64, 512] x [512, 384]).
- overflow: the copies past an expert's lane, padded to whole blocks of `block` rows, one matmul per block
  against its expert's weights, in a loop that stops at the blocks in use (on balanced routing, none or a few).

`jax.lax.ragged_dot` lowers on XLA:CPU to a dense masked product over every group (E times the work); here
the work is at most E * lane_rows + T*K + E*block rows. Over per-expert weight arrays (the inference layout)
there are no lanes: every copy goes through the block loop, whose blocks pick their expert with lax.switch.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deepmoe.layers.moe import EXPERT_WEIGHTS, clamped_swiglu, expert_matrices, per_expert
from deepmoe.layers.precision import compute_dtype


def block_rows(copies: int, experts: int) -> int:
    """Rows per block when every copy goes through the block loop: about an expert's average share, a power
    of two in [16, 128] (64 measured best for `small` at 512 tokens: larger blocks pad more, smaller ones loop
    more)."""
    target = max(copies // experts, 1)
    return int(min(128, max(16, 1 << (target.bit_length() - 1))))


def lane_rows(copies: int, experts: int) -> int:
    """Rows per expert in the batched lanes: 1.25x the average share, a multiple of 8. Measured on `small` and
    `mini` (T=512) against 1.0x and 1.5x: 1.0x sends more copies to the loop, 1.5x pads more."""
    return max(8, -(-(5 * copies) // (4 * experts * 8)) * 8)


def overflow_block_rows(copies: int, experts: int) -> int:
    """Blocks of the overflow loop: a quarter of `block_rows` (at least 16), as most experts overflow their
    lane by a few rows; a whole dW read-modify-write per block in the backward keeps them from going smaller."""
    return max(16, block_rows(copies, experts) // 4)


def num_blocks(copies: int, experts: int, lane: int, block: int) -> int:
    """Static bound on sum_e ceil(max(n_e - lane, 0) / block) over group sizes n_e summing to `copies`: with
    m experts overflowing it is at most ceil((copies - m * lane) / block) + m, which grows with m while
    lane < block (m up to min(E, copies // lane)) and shrinks otherwise (m = 1)."""
    if lane >= block:
        m = 1
    else:
        m = min(experts, copies // lane) if lane else experts
    return max(1, -(-max(copies - m * lane, 0) // block) + m)


def run(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array, *,
        lanes: int | None = None) -> jax.Array:
    """lanes: rows per expert in the batched part (default `lane_rows`; 0 = every copy through the loop)."""
    b, t, d = x.shape
    k = expert_ids.shape[-1]
    e = cfg.num_experts
    dtype = compute_dtype(cfg)
    copies = b * t * k
    split = per_expert(params)  # per-expert arrays (params.unstack_layers): no stacks to batch over
    if split or lanes == 0:
        lane, block = 0, block_rows(copies, e)
    else:
        lane, block = lanes or lane_rows(copies, e), overflow_block_rows(copies, e)
    blocks = num_blocks(copies, e, lane, block)

    flat_experts = expert_ids.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)  # sorted position -> copy
    sorted_experts = flat_experts[order]
    group_sizes = jnp.bincount(flat_experts, length=e)
    rank = jnp.arange(copies) - (jnp.cumsum(group_sizes) - group_sizes)[sorted_experts]  # within its expert
    rows = x.reshape(b * t, d).astype(dtype)[order // k]
    row_weights = weights.reshape(-1)[order].astype(jnp.float32)

    # overflow: copies from rank `lane` on, each expert's padded to whole blocks
    padded_sizes = -(-jnp.maximum(group_sizes - lane, 0) // block) * block
    padded_end = jnp.cumsum(padded_sizes)
    in_loop = rank >= lane
    # a copy a buffer does not take gets its own slot past the buffer's end (dropped): every slot stays distinct
    past_end = jnp.arange(copies)
    slot = jnp.where(in_loop, (padded_end - padded_sizes)[sorted_experts] + rank - lane, blocks * block + past_end)
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(blocks) * block, side="right"), e - 1)
    used = padded_end[-1] // block  # blocks holding copies; the rest of the static count stay zero
    padded = _place(rows, slot, (blocks, block))
    padded_weights = _place(row_weights, slot, (blocks, block))
    stacks = None if split else [params[name].astype(dtype) for name in EXPERT_WEIGHTS]
    if split:
        experts = [tuple(w.astype(dtype) for w in matrices) for matrices in expert_matrices(params)]
        out = expert_ffn_switched(cfg.swiglu_limit, padded, padded_weights, experts, block_expert, used)
    elif not lane:
        out = expert_ffn(cfg.swiglu_limit, padded, padded_weights, *stacks, block_expert, used)
    else:
        lane_slot = jnp.where(in_loop, e * lane + past_end, sorted_experts * lane + rank)
        lane_out, out = lanes_and_loop_ffn(cfg.swiglu_limit, _place(rows, lane_slot, (e, lane)),
                                           _place(row_weights, lane_slot, (e, lane)), padded, padded_weights,
                                           *stacks, block_expert, used)
    # Each copy's output from the buffer that holds it: a gather from each, the other's slot past its end
    # reading zeros. Differentiated, that is two gathers' cotangents and an add, where clamped gathers and a
    # `where` over the copies added two [copies, d] selects and a zero operand (docs/performance.md, 26th session).
    out_sorted = _take(out.reshape(-1, d), slot)
    if lane:
        out_sorted = out_sorted + _take(lane_out.reshape(e * lane, d), lane_slot)
    return out_sorted[jnp.argsort(order)].reshape(b, t, k, d).sum(axis=2)


def _place(values: jax.Array, index: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Rows values[i] written to row index[i] (distinct) of a zero [prod(shape), ...] buffer reshaped to
    [*shape, ...]; indices past its end are dropped. Distinct indices let JAX differentiate the write as a plain
    scatter: with repeats, its JVP scatters an id per element to find which write won (a u32 buffer the size of
    the lanes, and a select over the rows)."""
    size = shape[0] * shape[1]
    buffer = jnp.zeros((size, *values.shape[1:]), values.dtype)
    return buffer.at[index].set(values, mode="drop", unique_indices=True).reshape(*shape, *values.shape[1:])


def _take(buffer: jax.Array, index: jax.Array) -> jax.Array:
    """Rows buffer[index] in float32, zero where index is past the buffer's end."""
    return buffer.at[index].get(mode="fill", fill_value=0).astype(jnp.float32)


def _matmul(spec: str, a: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, w, preferred_element_type=jnp.float32).astype(a.dtype)


def _pre_activations(x, w_gate, w_up):
    """(gate, up) of rows x [..., C, d]: the products the backward needs again."""
    return _matmul("...cd,...df->...cf", x, w_gate), _matmul("...cd,...df->...cf", x, w_up)


def _ffn_block(limit, x, row_weight, w_gate, w_up, w_down):
    """Rows x [..., C, d] through the clamped-SwiGLU expert (one block with its expert's matrices, or the lanes
    [E, C, d] with the [E, ...] stacks), scaled per row by row_weight [..., C]: (gate, up) pre-activations and
    the weighted output."""
    gate, up = _pre_activations(x, w_gate, w_up)
    hidden = (clamped_swiglu(limit, gate, up) * row_weight[..., None]).astype(x.dtype)
    return gate, up, _matmul("...cf,...fd->...cd", hidden, w_down)


def _ffn_block_grads(limit, x, row_weight, gate, up, dy, w_gate, w_up, w_down):
    """The backward of `_ffn_block` from its saved pre-activations: (dx, d row_weight, dW_gate, dW_up, dW_down),
    the row-weight and matrix gradients in fp32."""
    matmul = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    weight = row_weight[..., None]
    act, act_vjp = jax.vjp(lambda g, u: clamped_swiglu(limit, g, u), gate, up)
    hidden = (act * weight).astype(x.dtype)
    dhidden = matmul("...cd,...fd->...cf", dy, w_down)
    dgate, dup = act_vjp(dhidden * weight)
    dgate, dup = dgate.astype(x.dtype), dup.astype(x.dtype)
    dx = matmul("...cf,...df->...cd", dgate, w_gate) + matmul("...cf,...df->...cd", dup, w_up)
    return (dx.astype(x.dtype), jnp.sum(dhidden * act, axis=-1), matmul("...cd,...cf->...df", x, dgate),
            matmul("...cd,...cf->...df", x, dup), matmul("...cf,...cd->...fd", hidden, dy))


def _expert_ffn_fwd(limit, x, row_weights, w_gate, w_up, w_down, block_expert, used):
    """The loop's forward; its residuals are its inputs. The backward recomputes each used block's (gate, up):
    saved, they would be two [static block count, block, hidden] buffers, sized for every copy overflowing
    (`num_blocks`) while balanced routing uses a few. Recomputing costs two matmuls per used block; the train
    step of `medium` at 1 x 4096 tokens in bf16 needs 1.6 GB (3 %) less memory, that of `small` on CPU no more
    time (docs/performance.md, twenty-first session)."""

    def body(i, out):
        e = block_expert[i]
        y = _ffn_block(limit, x[i], row_weights[i], w_gate[e], w_up[e], w_down[e])[2]
        return lax.dynamic_update_index_in_dim(out, y, i, 0)

    out = lax.fori_loop(0, used, body, jnp.zeros_like(x))
    return out, (x, row_weights, w_gate, w_up, w_down, block_expert, used)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def expert_ffn(limit: float, x: jax.Array, row_weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
               w_down: jax.Array, block_expert: jax.Array, used: jax.Array) -> jax.Array:
    """x [nb, block, d] -> [nb, block, d]: each block of rows through the clamped-SwiGLU expert block_expert[i],
    scaled per row by row_weights [nb, block]; blocks from `used` on stay zero.

    One loop over the used blocks (its trip count is dynamic: the static block count must cover the worst
    case), indexing each block's expert in the stacked weights; gathering w[block_expert] up front would copy an
    expert matrix per block. Own VJP: a dynamic-trip-count loop has no reverse-mode rule, one backward loop
    serves the six gradient matmuls (and the two it recomputes), and each block's dW is added into its expert's
    slice in fp32 (differentiating the indexing would scatter a whole [E, in, out] cotangent per block)."""
    return _expert_ffn_fwd(limit, x, row_weights, w_gate, w_up, w_down, block_expert, used)[0]


def _loop_grads(limit, residuals, dout, dw_init):
    """The block loop's backward: (dx, d row_weights in fp32, (dW_gate, dW_up, dW_down) added onto dw_init)."""
    x, row_weights, w_gate, w_up, w_down, block_expert, used = residuals

    def body(i, carry):
        dx, drow, dws = carry
        e = block_expert[i]
        gate, up = _pre_activations(x[i], w_gate[e], w_up[e])
        dxi, drowi, *dwi = _ffn_block_grads(limit, x[i], row_weights[i], gate, up, dout[i], w_gate[e], w_up[e],
                                            w_down[e])
        add_to_expert = lambda dw, g: lax.dynamic_update_index_in_dim(dw, dw[e] + g, e, 0)
        return (lax.dynamic_update_index_in_dim(dx, dxi, i, 0), lax.dynamic_update_index_in_dim(drow, drowi, i, 0),
                tuple(map(add_to_expert, dws, dwi)))

    init = (jnp.zeros_like(x), jnp.zeros(row_weights.shape, jnp.float32), dw_init)
    return lax.fori_loop(0, used, body, init)


def _loop_cotangents(residuals, dx, drow, dws):
    """The loop inputs' cotangents (x, row_weights, the three stacks, block_expert, used) in their dtypes."""
    row_weights, stacks, block_expert, used = residuals[1], residuals[2:5], residuals[5], residuals[6]
    no_grad = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # integer inputs
    return (dx, drow.astype(row_weights.dtype), *(dw.astype(w.dtype) for dw, w in zip(dws, stacks)),
            no_grad(block_expert), no_grad(used))


def _expert_ffn_bwd(limit, residuals, dout):
    zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in residuals[2:5])
    return _loop_cotangents(residuals, *_loop_grads(limit, residuals, dout, zeros))


expert_ffn.defvjp(_expert_ffn_fwd, _expert_ffn_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def lanes_and_loop_ffn(limit: float, lane_x: jax.Array, lane_weights: jax.Array, x: jax.Array,
                       row_weights: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                       block_expert: jax.Array, used: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lanes [E, C, d] through their experts, `expert_ffn` of the overflow blocks) with one VJP: the loop's
    fp32 dW accumulators start from the lanes' dW. Differentiated apart, the loop zero-filled three [E, in, out]
    accumulators (which XLA then copied into the loop) and the two dW were summed afterwards, three passes over
    every expert matrix per layer (`small` / `mini` train step -3 %)."""
    return _lanes_and_loop_fwd(limit, lane_x, lane_weights, x, row_weights, w_gate, w_up, w_down, block_expert,
                               used)[0]


def _lanes_and_loop_fwd(limit, lane_x, lane_weights, x, row_weights, w_gate, w_up, w_down, block_expert, used):
    lane_gate, lane_up, lane_out = _ffn_block(limit, lane_x, lane_weights, w_gate, w_up, w_down)
    out, loop_residuals = _expert_ffn_fwd(limit, x, row_weights, w_gate, w_up, w_down, block_expert, used)
    return (lane_out, out), (lane_x, lane_weights, lane_gate, lane_up, loop_residuals)


def _lanes_and_loop_bwd(limit, residuals, douts):
    lane_x, lane_weights, lane_gate, lane_up, loop_residuals = residuals
    dlane_out, dout = douts
    dlane_x, dlane_weights, *lane_dws = _ffn_block_grads(limit, lane_x, lane_weights, lane_gate, lane_up, dlane_out,
                                                         *loop_residuals[2:5])
    return (dlane_x, dlane_weights.astype(lane_weights.dtype),
            *_loop_cotangents(loop_residuals, *_loop_grads(limit, loop_residuals, dout, tuple(lane_dws))))


lanes_and_loop_ffn.defvjp(_lanes_and_loop_fwd, _lanes_and_loop_bwd)


def expert_ffn_switched(limit: float, x: jax.Array, row_weights: jax.Array, experts: list, block_expert: jax.Array,
                        used: jax.Array) -> jax.Array:
    """expert_ffn over per-expert weights (`experts[e]` = (w_gate, w_up, w_down)): each block's expert is picked
    with lax.switch and read in place, where indexing the [E, ...] stacks copies the block's three matrices
    (~20 % of a block's time on XLA:CPU). Forward only: per-expert arrays are an inference layout."""
    branches = [lambda xi, wi, w=w: _ffn_block(limit, xi, wi, *w)[2] for w in experts]

    def body(i, out):
        return lax.dynamic_update_index_in_dim(out, lax.switch(block_expert[i], branches, x[i], row_weights[i]), i, 0)

    return lax.fori_loop(0, used, body, jnp.zeros_like(x))
