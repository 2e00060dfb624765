"""Data parallelism and gradient accumulation: the train step with the batch sharded over an 8-device `data`
mesh and split into 2 accumulated micro-batches equals the plain single-device step (losses, gradient norms
within 1e-5 in fp32, identical expert loads, parameters after two updates within 1e-4). One test covers both
so the suite compiles one extra step, not two."""

import sysconfig
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import deepmoe as dm
from deepmoe.train import TrainConfig, init_state, make_train_step
from deepmoe.train.data import DataState, TextDataset
from deepmoe.train.step import replicate, shard_batch

TCFG = TrainConfig(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, compute_dtype="float32")
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_data_parallel_accumulated_step_equals_single_device():
    cfg = dm.preset("tiny")
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    ds = TextDataset.from_paths(CORPUS, seq_len=TCFG.seq_len, batch_size=TCFG.batch_size, seed=0)
    single = make_train_step(cfg, TCFG, donate=True)  # shared with test_train_step / test_train_checkpoint
    sharded = make_train_step(cfg, TCFG.replace(grad_accum=2), mesh, donate=True)
    s1 = init_state(cfg, TCFG, jax.random.key(0))
    s8 = replicate(init_state(cfg, TCFG, jax.random.key(0)), mesh)
    data = DataState()
    for _ in range(2):
        batch, data = ds.batch(data)
        s1, m1 = single(s1, batch)
        placed = shard_batch(batch, mesh)
        assert placed["input_ids"].sharding.spec[0] == "data"
        s8, m8 = sharded(s8, placed)
        for key in ("loss", "mtp_loss", "balance_loss", "total_loss", "grad_norm"):
            np.testing.assert_allclose(float(m8[key]), float(m1[key]), rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_array_equal(np.asarray(m8["expert_load"]), np.asarray(m1["expert_load"]))
    assert s8.params["embed"].sharding.is_fully_replicated
    # Parameters: each step moves them by O(lr) = 1e-3; Muon's and Adam's normalisations turn reduction-order
    # rounding in near-zero gradients (e.g. the mHC `fn` columns of identical streams) into differences of a
    # few percent of one step at most.
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)
