"""Behaviour of the forward pass beyond parity: causality, packed documents, precision, MoE strategies, MTP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.layers.attention import grouped_product
from deepmoe.layers.hyper import sinkhorn, weighted_stream_sum
from deepmoe.layers.precision import einsum

F32 = dm.preset("tiny").replace(compute_dtype="float32")


@pytest.fixture(scope="module")
def forward_f32():
    return jax.jit(lambda p, ids, seg: dm.forward(p, F32, ids, segment_ids=seg))


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(3), (2, 80), 0, F32.vocab_size)


def test_causality(tiny_params, forward_f32, ids):
    """Changing token t leaves every logit before t unchanged (and MTP logits before t-1)."""
    seg = jnp.zeros_like(ids)
    t = 50
    changed = ids.at[:, t].set((ids[:, t] + 7) % F32.vocab_size)
    a, b = forward_f32(tiny_params, ids, seg), forward_f32(tiny_params, changed, seg)
    np.testing.assert_array_equal(np.asarray(a.logits[:, :t]), np.asarray(b.logits[:, :t]))
    np.testing.assert_array_equal(np.asarray(a.mtp_logits[:, :t - 1]), np.asarray(b.mtp_logits[:, :t - 1]))
    assert np.abs(np.asarray(a.logits[:, t:] - b.logits[:, t:])).max() > 1e-3  # and the change is seen


def test_packed_documents_equal_separate_runs(tiny_params, ids):
    """A row packing two documents gives, per document, the logits of running that document alone:
    attention and compression never cross documents, positions restart."""
    split = 37  # not a multiple of the window (16) or either ratio (4, 16)
    seg = jnp.concatenate([jnp.zeros((2, split), jnp.int32), jnp.ones((2, 80 - split), jnp.int32)], axis=1)
    packed = dm.forward(tiny_params, F32, ids, segment_ids=seg, mtp=False).logits
    first = dm.forward(tiny_params, F32, ids[:, :split], mtp=False).logits
    second = dm.forward(tiny_params, F32, ids[:, split:], mtp=False).logits
    np.testing.assert_allclose(np.asarray(packed[:, :split]), np.asarray(first), atol=2e-5)
    np.testing.assert_allclose(np.asarray(packed[:, split:]), np.asarray(second), atol=2e-5)


def test_bf16_agrees_with_fp32(tiny_params, forward_f32, ids):
    """Documented tolerance: bf16 compute stays within 5% of the logit scale of the fp32 run (and is not
    identical, so the policy really changes the compute dtype)."""
    seg = jnp.zeros_like(ids)
    ref = np.asarray(forward_f32(tiny_params, ids, seg).logits)
    low = np.asarray(dm.forward(tiny_params, F32.replace(compute_dtype="bfloat16"), ids).logits)
    assert low.dtype == np.float32
    err = np.abs(low - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05, err


@pytest.mark.parametrize("dtype, spec, shapes, two_rows", [
    ("float32", "d,di->i", ((512,), (512, 384)), True),  # a routed expert's row (gather strategy)
    ("float32", "btr,rhc->bthc", ((1, 1, 256), (256, 8, 128)), True),  # query up-projection of one token
    ("bfloat16", "btd,di->bti", ((1, 1, 128), (128, 64)), True),  # bf16: at every size
    ("float32", "btd,di->bti", ((1, 1, 128), (128, 64)), False),  # fp32 below the size floor
    ("float32", "btd,di->bti", ((1, 3, 512), (512, 384)), False),  # three rows
    ("float32", "btgi,gil->btgl", ((1, 1, 4, 256), (4, 256, 256)), False),  # batched over g
])
def test_one_row_products(dtype, spec, shapes, two_rows):
    """A decode step's vector-matrix products run on XLA:CPU as two-row products (precision._as_two_rows, for
    speed) and equal numpy's einsum of the same operands either way."""
    cfg = F32.replace(compute_dtype=dtype)
    keys = jax.random.split(jax.random.key(0), 2)
    x, w = (jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes))
    fn = jax.jit(lambda x, w: einsum(cfg, spec, x, w))
    ir = fn.lower(x, w).as_text()
    assert (f"tensor<2x{'x'.join(map(str, shapes[0]))}x" in ir) == two_rows  # the row stacked over a zero row
    got = np.asarray(fn(x, w), np.float64)
    ref = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_moe_strategies_agree(tiny_params, ids):
    dense = dm.forward(tiny_params, F32, ids, moe_strategy="dense")
    ragged = dm.forward(tiny_params, F32, ids, moe_strategy="sorted")
    np.testing.assert_allclose(np.asarray(dense.logits), np.asarray(ragged.logits), atol=1e-5)


def test_forward_on_concrete_arrays_is_one_compiled_program(tiny_params, forward_f32, ids, compile_log):
    """Outside any transformation, dm.forward compiles the whole model as one program per config and shapes
    (op by op it compiled each of ~500 operations and ran them one at a time), and gives the logits of the same
    forward traced inside a caller's jit. A misspelt MoE strategy fails before anything is compiled."""
    seg = jnp.zeros_like(ids)
    with compile_log() as first:
        out = dm.forward(tiny_params, F32, ids, segment_ids=seg)
    with compile_log() as again:
        out_again = dm.forward(tiny_params, F32, ids, segment_ids=seg)
    assert [name for name, _ in first] == ["_forward"] and again == []
    reference = forward_f32(tiny_params, ids, seg)
    for got in (out, out_again):
        np.testing.assert_allclose(np.asarray(got.logits), np.asarray(reference.logits), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got.mtp_logits), np.asarray(reference.mtp_logits), rtol=1e-6,
                                   atol=1e-6)
    with compile_log() as failed, pytest.raises(ValueError, match="unknown MoE strategy 'magic'"):
        dm.forward(tiny_params, F32, ids, moe_strategy="magic")
    assert failed == []


def test_router_statistics(tiny_params, ids):
    out = dm.forward(tiny_params, F32, ids)
    counts = np.asarray(out.aux["expert_counts"])  # [L, B, E]
    assert counts.shape == (F32.num_layers, 2, F32.num_experts)
    np.testing.assert_array_equal(counts.sum(-1), ids.shape[1] * F32.experts_per_token)
    # hash layer 0: counts are exactly the tid2eid table's histogram over the tokens
    table = np.asarray(tiny_params["segments"][0][0]["moe"]["tid2eid"][0])
    expected = np.stack([np.bincount(table[np.asarray(row)].ravel(), minlength=F32.num_experts) for row in ids])
    np.testing.assert_array_equal(counts[0], expected)
    np.testing.assert_allclose(np.asarray(out.aux["mean_affinity"]).sum(-1), 1.0, rtol=1e-5)


def test_sinkhorn_is_doubly_stochastic():
    logits = jax.random.normal(jax.random.key(0), (5, 4, 4)) * 3
    m = np.asarray(sinkhorn(logits, 20, 1e-6))
    np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5)  # the last step normalises columns
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-2)  # rows: approximately, after 20 iterations
    assert (m > 0).all()
    converged = np.asarray(sinkhorn(logits, 300, 1e-6))  # rows converge with more iterations
    np.testing.assert_allclose(converged.sum(-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("outputs", [1, 4])
def test_weighted_stream_sum_and_its_gradients_match_numpy(outputs):
    """The mHC stream mix (custom VJP, multiply-adds) against numpy's einsum and the analytic gradients of
    sum(out * G): dW[j, m] = sum_d S[j, d] G[m, d], dS[j, d] = sum_m W[j, m] G[m, d]."""
    kw, ks, kg = jax.random.split(jax.random.key(7), 3)
    w = jax.random.normal(kw, (2, 5, 4, outputs))
    s = jax.random.normal(ks, (2, 5, 4, 16))
    g = np.asarray(jax.random.normal(kg, (2, 5, outputs, 16)))
    np.testing.assert_allclose(weighted_stream_sum(w, s), np.einsum("btjm,btjd->btmd", w, s), rtol=1e-5, atol=1e-5)
    dw, ds = jax.grad(lambda w, s: jnp.sum(weighted_stream_sum(w, s) * g), argnums=(0, 1))(w, s)
    np.testing.assert_allclose(dw, np.einsum("btjd,btmd->btjm", s, g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds, np.einsum("btjm,btmd->btjd", w, g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_product_and_its_gradients_match_numpy(dtype):
    """The grouped output projection's per-group products (custom VJP, XLA:CPU) against numpy's einsum and the
    analytic gradients of sum(out * G): dx[g] = G[g] w[g]^T, dw[g] = x[g]^T G[g]."""
    cfg = F32.replace(compute_dtype=dtype)
    kx, kw, kg = jax.random.split(jax.random.key(8), 3)
    x = jax.random.normal(kx, (2, 5, 3, 16))
    w = jax.random.normal(kw, (3, 16, 8))
    g = np.asarray(jax.random.normal(kg, (2, 5, 3, 8)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=5e-2, atol=1e-1)
    out = grouped_product(cfg, x, w)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(out.astype(jnp.float32), np.einsum("btgi,gil->btgl", x, w), **tol)
    dx, dw = jax.grad(lambda x, w: jnp.sum(grouped_product(cfg, x, w).astype(jnp.float32) * g), argnums=(0, 1))(x, w)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    np.testing.assert_allclose(dx, np.einsum("btgl,gil->btgi", g, w), **tol)
    np.testing.assert_allclose(dw, np.einsum("btgi,btgl->gil", x, g), **tol)


def test_output_projection_is_the_same_on_cpu_and_as_traced_for_gpu():
    """XLA:CPU takes the grouped product per group (grouped_product); traced for another platform it is one
    batched einsum. Both run here on the CPU and give the same projection."""
    import pallas_kernels as pk

    from deepmoe.config import SLIDING
    from deepmoe.layers.attention import output_projection
    from deepmoe.layers.rope import inverse_frequencies

    g, latent = F32.output_groups, F32.output_group_latent_dim
    kg, ko, kx = jax.random.split(jax.random.key(9), 3)
    params = {"o_group_proj": jax.random.normal(kg, (g, F32.output_group_input_dim, latent)),
              "o_proj": jax.random.normal(ko, (g, latent, F32.hidden_size))}
    out = jax.random.normal(kx, (1, 12, F32.num_heads, F32.head_dim))
    positions = jnp.arange(12)[None]
    inv_freq = inverse_frequencies(F32, SLIDING)
    project = lambda: jax.jit(lambda p, o: output_projection(p, F32, o, positions, inv_freq))(params, out)
    on_cpu = project()
    with pk.target_platform("gpu"):
        as_for_gpu = project()
    np.testing.assert_allclose(on_cpu, as_for_gpu, rtol=1e-5, atol=1e-4)


def test_mtp_logits_follow_the_next_token(tiny_params, forward_f32, ids):
    """MTP at position t sees token t+1: changing token t+1 changes mtp_logits[t] but not logits[t]."""
    seg = jnp.zeros_like(ids)
    t = 30
    changed = ids.at[:, t + 1].set((ids[:, t + 1] + 1) % F32.vocab_size)
    a, b = forward_f32(tiny_params, ids, seg), forward_f32(tiny_params, changed, seg)
    np.testing.assert_array_equal(np.asarray(a.logits[:, t]), np.asarray(b.logits[:, t]))
    assert np.abs(np.asarray(a.mtp_logits[:, t] - b.mtp_logits[:, t])).max() > 1e-4


def test_out_of_range_token_ids(tiny_params):
    with pytest.raises(ValueError, match="token id out of range"):
        dm.forward(tiny_params, F32, jnp.array([[1, 2, F32.vocab_size]]))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        dm.forward(tiny_params, F32, jnp.array([1, 2, 3]))


def test_remat_policies_do_not_change_values_and_full_remat_saves_memory(tiny_params):
    """Same gradients with and without remat, and remat="full" recomputes one layer at a time in the stacked
    layout: `tiny`'s whole schedule is one segment, and a checkpoint around the segment's body recomputed its
    four layers at once (temporaries as without remat). The reference is XLA's memory analysis of the
    program without remat."""
    ids = jax.random.randint(jax.random.key(3), (1, 512), 0, F32.vocab_size)
    grads, temp = {}, {}
    for remat in ("none", "full"):
        def loss(p, remat=remat):
            return dm.forward(p, F32, ids, remat=remat).logits.mean()

        compiled = jax.jit(jax.grad(loss, allow_int=True)).lower(tiny_params).compile()  # tid2eid: an int buffer
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
        grads[remat] = compiled(tiny_params)
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["full"])):
        if a.dtype != jax.dtypes.float0:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert np.abs(np.asarray(grads["none"]["embed"])).max() > 0
    assert temp["full"] < 0.6 * temp["none"], temp
