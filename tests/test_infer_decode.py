"""Cached decoding against the full forward (the oracle: `dm.forward`, itself matched to transformers).

Batches of unequal, right-padded prompts; decoding runs past the window (16) and across many CSA (4) and HCA
(16) window boundaries, so ring wrap-around, pending compressor state (incl. the CSA overlap half), entry
appends, the indexer's top-k over visible entries and the dense HCA entries are all exercised. fp32: every
decode logit must match the forward's logit at the same position to 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.config import CSA, HCA
from deepmoe.infer import decode_step, generate, init_cache, prefill, shard_cache
from deepmoe.infer.decode import main_params, prefill_jit
from deepmoe.infer.generate import CACHE_BUCKET, round_up
from deepmoe.infer.speculative import spec_prefill, spec_step_jit
from deepmoe.params import unstack_layers
from deepmoe.sharding import make_mesh

F32 = dm.preset("tiny").replace(compute_dtype="float32")
TOTAL = 80  # full sequence length
LENGTHS = np.array([5, 23])  # prompt lengths (right-padded to 23)
WIDTH = 23
STEPS = TOTAL - WIDTH  # 57 decode steps: sequence 1 reaches position 79, sequence 0 position 61
MAX_LEN = round_up(WIDTH + STEPS, CACHE_BUCKET)  # what generate allocates for these prompts
TOL = 1e-4

# A second layout: HCA first and hash-routed, 2 streams, top-2 of many CSA entries, HCA ratio = window = 8.
ALT = dm.ModelConfig(
    vocab_size=300, hidden_size=48, num_layers=2, num_heads=6, head_dim=32, rope_head_dim=8, query_latent_dim=24,
    output_groups=3, output_group_latent_dim=8, layer_types=(HCA, CSA), sliding_window=8,
    csa_compress_ratio=4, hca_compress_ratio=8, indexer_heads=8, indexer_head_dim=16, indexer_topk=2,
    num_experts=6, experts_per_token=3, expert_hidden_dim=24, num_hash_layers=1, residual_streams=2,
    sinkhorn_iterations=3, routed_scaling_factor=2.5, num_mtp_layers=1, compute_dtype="float32")


@pytest.fixture(scope="module")
def forward_f32():
    return jax.jit(lambda p, ids, seg: dm.forward(p, F32, ids, segment_ids=seg))


def _reference(forward, params, ids):
    out = forward(params, jnp.asarray(ids), jnp.zeros(ids.shape, jnp.int32))
    return np.asarray(out.logits), np.asarray(out.mtp_logits)


def _right_padded(ids, lengths, width, pad=0):
    prompt = np.array(ids[:, :width])
    for b, n in enumerate(lengths):
        prompt[b, n:] = pad
    return prompt


def _decode_matches_forward(params, cfg, ids, ref, lengths, width, steps, max_len):
    prompt = _right_padded(ids, lengths, width, pad=7)  # a real token id as pad: it must not leak in
    logits, cache = prefill(params, cfg, prompt, lengths, max_len=max_len)
    rows = np.arange(len(lengths))
    np.testing.assert_allclose(np.asarray(logits), ref[rows, lengths - 1], atol=TOL, rtol=0)
    worst = 0.0
    for step in range(steps):
        position = lengths + step
        logits, cache = decode_step(params, cfg, cache, ids[rows, position])
        worst = max(worst, float(np.abs(np.asarray(logits) - ref[rows, position]).max()))
    assert worst <= TOL, worst
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + steps)
    return worst


def test_decode_equals_full_forward(tiny_params, forward_f32):
    ids = np.asarray(jax.random.randint(jax.random.key(3), (2, TOTAL), 0, F32.vocab_size))
    ref, _ = _reference(forward_f32, tiny_params, ids)
    assert np.abs(ref).max() > 0.5
    _decode_matches_forward(tiny_params, F32, ids, ref, LENGTHS, WIDTH, STEPS, MAX_LEN)


def random_params(cfg, seed):
    """Random parameters drawn on the host (no compile), re-randomised like tests/hf_reference.py: non-zero
    sinks, position biases, hc bases and router biases; hash tables with distinct experts per token."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = str(path[-1]).strip("[]'")
        if name == "tid2eid":
            table = np.argsort(rng.random((*spec.shape[:-1], cfg.num_experts)), axis=-1)[..., :spec.shape[-1]]
            return jnp.asarray(table, spec.dtype)
        if "norm" in name or name == "scale":
            value = 1 + 0.1 * rng.standard_normal(spec.shape)
        elif name == "embed":
            value = rng.standard_normal(spec.shape)
        else:
            std = 0.5 if name in ("sinks", "position_bias", "base", "router_bias") else 0.05
            value = std * rng.standard_normal(spec.shape)
        return jnp.asarray(value, spec.dtype)

    return jax.tree_util.tree_map_with_path(leaf, dm.abstract_params(cfg))


def test_decode_equals_full_forward_second_layout():
    params = random_params(ALT, 5)
    lengths = np.array([1, 6, 17])  # a one-token prompt too
    ids = np.asarray(jax.random.randint(jax.random.key(4), (3, 40), 0, ALT.vocab_size))
    ref = np.asarray(jax.jit(lambda p, i: dm.forward(p, ALT, i, mtp=False).logits)(params, jnp.asarray(ids)))
    _decode_matches_forward(params, ALT, ids, ref, lengths, 17, 40 - 17, 40)
    # the per-layer layout generate decodes over: prefill and steps run unrolled over unstacked weights, the
    # routed experts one array each (CPU, few experts: the MoE switches between them), or kept stacked
    per_layer = unstack_layers(main_params(params), ALT)
    assert "segments" not in per_layer and len(per_layer["layers"]) == ALT.num_layers
    experts = per_layer["layers"][1]["moe"]["experts"]
    assert len(experts["w_down"]) == ALT.num_experts
    np.testing.assert_array_equal(experts["w_down"][2], params["segments"][-1][-1]["moe"]["experts"]["w_down"][-1, 2])
    _decode_matches_forward(per_layer, ALT, ids, ref, lengths, 17, 40 - 17, 40)
    stacked_experts = unstack_layers(main_params(params), ALT, split_experts=False)
    assert stacked_experts["layers"][1]["moe"]["experts"]["w_down"].shape[0] == ALT.num_experts
    _decode_matches_forward(stacked_experts, ALT, ids, ref, lengths, 17, 40 - 17, 40)


def test_init_cache_matches_prefill_layout(tiny_params):
    cache = jax.eval_shape(lambda p: prefill_jit(p, F32, jnp.ones((2, 4), jnp.int32), jnp.array([4, 2]),
                                                 max_len=MAX_LEN).cache, main_params(tiny_params))
    empty = init_cache(F32, 2, MAX_LEN)
    assert jax.tree.structure(empty) == jax.tree.structure(cache)
    for a, b in zip(jax.tree.leaves(empty), jax.tree.leaves(cache)):
        assert a.shape == b.shape and a.dtype == b.dtype
    # shardable: batch over the mesh's batch axes (data here), everything else replicated
    sharded = shard_cache(init_cache(F32, 8, MAX_LEN), make_mesh(data=4, tensor=2))
    assert len(sharded.layers) == F32.num_layers
    for layer in sharded.layers:
        for leaf in jax.tree.leaves(layer):  # [B, slots, dim]
            assert leaf.addressable_shards[0].data.shape == (2, *leaf.shape[1:])
    assert sharded.lengths.addressable_shards[0].data.shape == (2,)


def test_gather_experts_equal_dense():
    """The decode-time MoE strategy (each token's experts gathered) against the reference strategy, over
    stacked and over per-expert weights."""
    from deepmoe.moe_dispatch.gather import run as run_gather
    from deepmoe.moe_dispatch.dense import run as run_dense

    cfg = dm.preset("tiny").replace(compute_dtype="float32")
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.expert_hidden_dim
    keys = jax.random.split(jax.random.key(0), 5)
    params = {"w_gate": 0.3 * jax.random.normal(keys[0], (e, d, i)),
              "w_up": 0.3 * jax.random.normal(keys[1], (e, d, i)),
              "w_down": 0.3 * jax.random.normal(keys[2], (e, i, d))}
    x = jax.random.normal(keys[3], (3, 2, d))
    ids = jnp.argsort(jax.random.uniform(keys[4], (3, 2, e)), axis=-1)[..., :cfg.experts_per_token]
    weights = jax.random.uniform(keys[4], ids.shape)
    ref = np.asarray(jax.jit(run_dense, static_argnums=1)(params, cfg, x, ids, weights))
    np.testing.assert_allclose(np.asarray(jax.jit(run_gather, static_argnums=1)(params, cfg, x, ids, weights)),
                               ref, atol=1e-5, rtol=1e-5)
    # per-expert arrays (params.unstack_layers on CPU): each chosen expert picked by lax.switch
    per_expert = {name: tuple(w) for name, w in params.items()}
    np.testing.assert_allclose(np.asarray(jax.jit(run_gather, static_argnums=1)(per_expert, cfg, x, ids, weights)),
                               ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def greedy_run(tiny_params):
    """Plain greedy continuation of two unequal prompts (streaming path), no stop tokens."""
    ids = np.asarray(jax.random.randint(jax.random.key(8), (2, WIDTH), 0, F32.vocab_size))
    prompt = _right_padded(ids, LENGTHS, WIDTH)
    seen = []
    result = generate(tiny_params, F32, prompt, STEPS, lengths=LENGTHS, stop_tokens=(),
                      callback=lambda t, e: seen.append((t, e)))
    return prompt, result, seen


def _assert_forward_argmax(forward, params, prompt, lengths, tokens):
    """Each of `tokens` [B, N] is the argmax of the full forward over its prompt + the tokens before it."""
    steps = tokens.shape[1]
    full = np.zeros((len(lengths), TOTAL), np.int32)
    for b, n in enumerate(lengths):
        full[b, :n + steps] = np.concatenate([prompt[b, :n], tokens[b]])
    ref, _ = _reference(forward, params, full)
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(ref[b, n - 1:n - 1 + steps].argmax(-1), tokens[b])


def test_greedy_generate_is_the_forward_argmax(greedy_run, tiny_params, forward_f32):
    prompt, result, seen = greedy_run
    assert result.tokens.shape == (2, STEPS) and result.lengths.tolist() == [STEPS, STEPS]
    assert len(seen) == STEPS and all(e.all() for _, e in seen)
    np.testing.assert_array_equal(np.concatenate([t for t, _ in seen], axis=1), result.tokens)
    _assert_forward_argmax(forward_f32, tiny_params, prompt, LENGTHS, result.tokens)


def test_generate_reuses_its_programs_for_other_lengths(greedy_run, tiny_params, forward_f32, compile_log):
    """generate pads the prompt, the cache and the output buffer to buckets, so prompts of other lengths, other
    padding and another number of new tokens run the programs the first call compiled, with the same tokens."""
    prompt, result, _ = greedy_run
    first = generate(tiny_params, F32, prompt, STEPS, lengths=LENGTHS, stop_tokens=())
    np.testing.assert_array_equal(first.tokens, result.tokens)
    shorter = np.array([3, 17])  # prefixes of the same prompts
    with compile_log() as compiles:
        wider = np.pad(prompt, ((0, 0), (0, 9)), constant_values=5)  # more columns of padding, another pad id
        fewer = generate(tiny_params, F32, wider, STEPS - 20, lengths=LENGTHS, stop_tokens=())
        other = generate(tiny_params, F32, prompt[:, :shorter.max()], STEPS, lengths=shorter, stop_tokens=())
    assert not {"prefill_jit", "_next_token", "_loop"} & {name for name, _ in compiles}, compiles
    np.testing.assert_array_equal(fewer.tokens, result.tokens[:, :STEPS - 20])
    assert fewer.lengths.tolist() == [STEPS - 20] * 2 and other.lengths.tolist() == [STEPS] * 2
    _assert_forward_argmax(forward_f32, tiny_params, prompt, shorter, other.tokens)


def test_speculative_steps_match_forward(greedy_run, tiny_params, forward_f32):
    """Drive draft + verify with forced drafts (right, wrong, the MTP's own) along the greedy continuation:
    emitted tokens follow it, the MTP logits equal the forward's mtp_logits at t-1, and the verify logits equal
    the forward's logits at t (and t+1 when accepted)."""
    prompt, result, _ = greedy_run
    full = np.zeros((2, TOTAL + 2), np.int32)
    for b, n in enumerate(LENGTHS):
        full[b, :n + STEPS] = np.concatenate([prompt[b, :n], result.tokens[b]])
    ref, ref_mtp = _reference(forward_f32, tiny_params, full[:, :TOTAL])
    logits, state = spec_prefill(tiny_params, F32, jnp.asarray(prompt), jnp.asarray(LENGTHS), max_len=MAX_LEN)
    rows = np.arange(2)
    state = state.replace(tokens=state.tokens.at[:, 1].set(jnp.argmax(logits, -1).astype(jnp.int32)))
    accepted = rejected = 0
    for i in range(24):
        t = np.asarray(state.cache.lengths)
        mode = i % 3  # 0: right draft, 1: wrong draft, 2: the MTP's own draft
        right = full[rows, t + 1]
        forced = np.where(mode == 0, right, (right + 1) % F32.vocab_size).astype(np.int32)
        force = np.full((2,), mode != 2)
        step, state = spec_step_jit(tiny_params, F32, state, "auto", jnp.asarray(forced), jnp.asarray(force))
        np.testing.assert_allclose(np.asarray(step.mtp_logits), ref_mtp[rows, t - 1], atol=TOL, rtol=0)
        np.testing.assert_allclose(np.asarray(step.logits[:, 0]), ref[rows, t], atol=TOL, rtol=0)
        count = np.asarray(step.count)
        tokens = np.asarray(step.tokens)
        for b in rows:
            np.testing.assert_array_equal(tokens[b, :count[b]], full[b, t[b] + 1:t[b] + 1 + count[b]])
            if count[b] == 2:
                np.testing.assert_allclose(np.asarray(step.logits[b, 1]), ref[b, t[b] + 1], atol=TOL, rtol=0)
        if mode == 0:
            assert (count == 2).all()
        if mode == 1:
            assert (count == 1).all()
        accepted += int((count == 2).sum())
        rejected += int((count == 1).sum())
        np.testing.assert_array_equal(np.asarray(state.cache.lengths), t + count)
    assert accepted >= 16 and rejected >= 16


def test_speculative_generate_equals_greedy(greedy_run, tiny_params):
    prompt, result, _ = greedy_run
    spec = generate(tiny_params, F32, prompt, STEPS, lengths=LENGTHS, stop_tokens=(), speculative=True)
    np.testing.assert_array_equal(spec.tokens, result.tokens)
    assert 0.0 <= spec.stats["acceptance_rate"] <= 1.0 and spec.stats["drafted"] > 0


def test_while_loop_equals_streaming_with_stops(greedy_run, tiny_params):
    """The on-device loop and the streaming loop agree, also when sequences stop at different steps."""
    prompt, result, _ = greedy_run
    stops = (int(result.tokens[0, 9]), int(result.tokens[1, 30]))
    a = generate(tiny_params, F32, prompt, STEPS, lengths=LENGTHS, stop_tokens=stops)
    b = generate(tiny_params, F32, prompt, STEPS, lengths=LENGTHS, stop_tokens=stops, callback=lambda t, e: None)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    for row in range(2):
        n = a.lengths[row]
        first_stop = min(i for i, tok in enumerate(result.tokens[row]) if tok in stops)
        assert n == first_stop + 1
        np.testing.assert_array_equal(a.tokens[row, :n], result.tokens[row, :n])
        assert (a.tokens[row, n:] == F32.eos_token_id).all()  # padded after the stop
