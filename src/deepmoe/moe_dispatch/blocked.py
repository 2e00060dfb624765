"""Dropless MoE for platforms without a native grouped matmul (CPU): token copies sorted by expert, each
expert's group padded to whole blocks of `block` rows, and one matmul per block against its expert's weights.

`jax.lax.ragged_dot` lowers on XLA:CPU to a dense masked product over every group (E times the work); here
the work is at most (T*K + E*block) rows. The block count is static: sum_e ceil(n_e / block) <= T*K/block + E;
the loop over blocks stops at the blocks in use (on average T*K/block + E/2), with its own VJP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deepmoe.layers.moe import swiglu
from deepmoe.layers.precision import compute_dtype


def block_rows(copies: int, experts: int) -> int:
    """Rows per block: about an expert's average share, a power of two in [16, 128] (64 measured best for
    `small` at 512 tokens: larger blocks pad more, smaller ones loop more)."""
    target = max(copies // experts, 1)
    return int(min(128, max(16, 1 << (target.bit_length() - 1))))


def run(params: dict, cfg, x: jax.Array, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
    b, t, d = x.shape
    k = expert_ids.shape[-1]
    e = cfg.num_experts
    dtype = compute_dtype(cfg)
    copies = b * t * k
    block = block_rows(copies, e)
    num_blocks = -(-copies // block) + e

    flat_experts = expert_ids.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)  # sorted position -> copy
    sorted_experts = flat_experts[order]
    group_sizes = jnp.bincount(flat_experts, length=e)
    group_start = jnp.cumsum(group_sizes) - group_sizes
    padded_sizes = -(-group_sizes // block) * block
    padded_end = jnp.cumsum(padded_sizes)
    padded_start = padded_end - padded_sizes
    # padded row of each sorted copy
    slot = padded_start[sorted_experts] + jnp.arange(copies) - group_start[sorted_experts]
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"), e - 1)

    rows = x.reshape(b * t, d).astype(dtype)[order // k]
    padded = jnp.zeros((num_blocks * block, d), dtype).at[slot].set(rows, unique_indices=True)
    padded = padded.reshape(num_blocks, block, d)

    used = padded_end[-1] // block  # blocks holding copies; the rest of the static num_blocks stay zero

    def grouped(lhs, w):  # lhs [nb, block, in] x w [E, in, out] -> [nb, block, out]
        return block_matmul(lhs, w.astype(dtype), block_expert, used)

    hidden = swiglu(cfg, grouped(padded, params["w_gate"]), grouped(padded, params["w_up"]))
    row_weights = jnp.zeros((num_blocks * block,), jnp.float32).at[slot].set(weights.reshape(-1)[order])
    hidden = (hidden.reshape(-1, hidden.shape[-1]) * row_weights[:, None]).astype(dtype)
    out = grouped(hidden.reshape(num_blocks, block, -1), params["w_down"]).reshape(-1, d)
    out_sorted = out[slot].astype(jnp.float32)
    return out_sorted[jnp.argsort(order)].reshape(b, t, k, d).sum(axis=2)


def _blocks_times_experts(lhs, w, block_expert, used, transpose_w=False):
    """out[i] = lhs[i] @ w[block_expert[i]] (w[...]^T if transpose_w) for i < used; later blocks are zero.

    A loop indexing the weights: gathering w[block_expert] up front would materialise a copy of an expert
    matrix per block (measured 2.5x slower forward on CPU), and the dynamic trip count skips the blocks that
    only exist because the static block count must cover the worst case."""
    nb, block, _ = lhs.shape
    width = w.shape[1] if transpose_w else w.shape[2]
    contract = (((1,), (1 if transpose_w else 0,)), ((), ()))

    def body(i, out):
        y = lax.dot_general(lhs[i], w[block_expert[i]], contract, preferred_element_type=jnp.float32)
        return lax.dynamic_update_index_in_dim(out, y.astype(out.dtype), i, 0)

    return lax.fori_loop(0, used, body, jnp.zeros((nb, block, width), lhs.dtype))


@jax.custom_vjp
def block_matmul(lhs: jax.Array, w: jax.Array, block_expert: jax.Array, used: jax.Array) -> jax.Array:
    """lhs [nb, block, in] x w [E, in, out] -> [nb, block, out], block i against expert block_expert[i].
    Own VJP: a loop with a dynamic trip count has no reverse-mode rule, and accumulating each block's dW into
    its expert's slice avoids the per-block [E, in, out] scatter that differentiating a gather makes."""
    return _blocks_times_experts(lhs, w, block_expert, used)


def _block_matmul_fwd(lhs, w, block_expert, used):
    return _blocks_times_experts(lhs, w, block_expert, used), (lhs, w, block_expert, used)


def _block_matmul_bwd(residuals, dout):
    lhs, w, block_expert, used = residuals
    dlhs = _blocks_times_experts(dout, w, block_expert, used, transpose_w=True)

    def accumulate(i, dw):  # blocks are sorted by expert; fp32 sums whatever the compute dtype
        e = block_expert[i]
        part = lax.dot_general(lhs[i], dout[i], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return lax.dynamic_update_index_in_dim(dw, dw[e] + part, e, 0)

    dw = lax.fori_loop(0, used, accumulate, jnp.zeros(w.shape, jnp.float32)).astype(w.dtype)
    no_grad = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # integer inputs
    return dlhs, dw, no_grad(block_expert), no_grad(used)


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)
