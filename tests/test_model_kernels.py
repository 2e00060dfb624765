"""The whole model with its attention core in pallas_kernels (interpreted on CPU) equals the reference path:
logits and gradients, for every attention type, with packed documents."""

import jax
import jax.numpy as jnp
import numpy as np

import deepmoe as dm

CFG = dm.preset("tiny", compute_dtype="float32", num_mtp_layers=0)


def test_pallas_kernels_match_reference(tiny_params):
    params = {k: v for k, v in tiny_params.items() if k != "mtp"}
    ids = jax.random.randint(jax.random.key(4), (2, 40), 0, CFG.vocab_size)
    seg = jnp.concatenate([jnp.zeros((2, 23), jnp.int32), jnp.ones((2, 17), jnp.int32)], axis=1)

    def loss(p, kernels):
        logits = dm.forward(p, CFG, ids, segment_ids=seg, kernels=kernels).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    run = jax.jit(jax.value_and_grad(loss, has_aux=True, allow_int=True), static_argnums=1)
    (_, ref_logits), ref_grads = run(params, "reference")
    (_, pallas_logits), pallas_grads = run(params, "pallas")
    np.testing.assert_allclose(np.asarray(pallas_logits), np.asarray(ref_logits), atol=2e-5)
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(pallas_grads)):
        if a.dtype != jax.dtypes.float0:
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5 * max(1.0, float(np.abs(a).max())))
