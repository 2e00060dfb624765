"""Checkpoints and the loop: resume reproduces an uninterrupted run, unfinished saves are ignored, corrupt or
incompatible checkpoints give clear errors and are left alone, non-finite runs stop and never save NaNs;
the CLI writes metrics.jsonl (train + validation rows) and plots."""

import json
import os
import shutil
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepmoe as dm
from deepmoe.train import TrainConfig
from deepmoe.train.checkpoint import CheckpointError, Checkpointer, check_compatible
from deepmoe.train.loop import NonFiniteError, load_trained, main, train

# identical to test_train_step.TCFG: one compilation of the step for both modules
TCFG = TrainConfig(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, compute_dtype="float32")
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"  # real Python source that nobody edits meanwhile
QUIET = dict(data=CORPUS, progress=False, plots=False, val_batches=0)


def losses(rows):
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def snapshot(directory: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-step run, and the same run stopped after 2 steps then resumed to 4."""
    cfg = dm.preset("tiny")
    root = tmp_path_factory.mktemp("runs")
    full = train(cfg, TCFG, root / "full", stop_after=4, save_every=2, **QUIET)
    first = train(cfg, TCFG, root / "split", stop_after=2, save_every=100, **QUIET)
    second = train(cfg, TCFG, root / "split", stop_after=4, save_every=100, resume=True, **QUIET)
    return cfg, root, full, first, second


def test_resume_reproduces_uninterrupted_run(runs):
    cfg, root, full, first, second = runs
    assert sorted(losses(first.history)) == [1, 2] and sorted(losses(second.history)) == [3, 4]
    assert {**losses(first.history), **losses(second.history)} == losses(full.history)  # bitwise on CPU
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(second.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(full.state.opt_state), jax.tree.leaves(second.state.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(second.state.step) == 4
    # metrics.jsonl of the resumed run is continuous
    rows = [json.loads(line) for line in (root / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the router biases came back too (they are not in the optimizer)
    loaded_cfg, params = load_trained(root / "full")
    assert loaded_cfg == cfg
    bias = np.asarray(params["segments"][0][1]["moe"]["router_bias"])
    assert np.any(bias != 0)
    np.testing.assert_array_equal(bias, np.asarray(full.state.params["segments"][0][1]["moe"]["router_bias"]))


def test_unfinished_save_is_ignored(runs):
    cfg, root, *_ = runs
    run = root / "full"
    ckpts = run / "checkpoints"
    assert Checkpointer(ckpts).steps() == [2, 4]
    # what a kill in the middle of writing step 6 leaves behind
    tmp = ckpts / "6.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpts / "4", tmp)
    (tmp / "commit_success.txt").unlink(missing_ok=True)
    (tmp / "state" / "_METADATA").unlink(missing_ok=True)
    assert Checkpointer(ckpts).latest_step() == 4
    state, data = Checkpointer(ckpts).restore(cfg, TCFG)
    assert int(state.step) == 4 and data["batch"] == 4


# orbax's failed restore can leave a callback on its closed asyncio loop ("Event loop is closed"): harmless noise
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(runs, tmp_path):
    cfg, root, *_ = runs
    run = tmp_path / "corrupt"
    shutil.copytree(root / "split", run)
    state_dir = run / "checkpoints" / "4" / "state"
    data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 64 and "METADATA" not in
                  p.name]
    assert data_files
    for p in data_files:
        p.write_bytes(b"\x00garbage" * 4)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"checkpoints/4"):
        train(cfg, TCFG, run, stop_after=6, resume=True, **QUIET)
    assert snapshot(run) == before  # nothing written, nothing deleted
    # a fresh run refuses to start over existing checkpoints
    with pytest.raises(CheckpointError, match="--resume"):
        train(cfg, TCFG, run, stop_after=6, **QUIET)
    assert snapshot(run) == before


def test_incompatible_checkpoint(runs):
    cfg, root, *_ = runs
    with pytest.raises(CheckpointError, match="num_experts"):
        Checkpointer(root / "full" / "checkpoints").restore(cfg.replace(num_experts=4), TCFG)
    with pytest.raises(CheckpointError, match="lr"):
        Checkpointer(root / "full" / "checkpoints").restore(cfg, TCFG.replace(lr=1e-4))
    # execution choices may change on resume: same math, same state
    ckpt = Checkpointer(root / "full" / "checkpoints")
    check_compatible(ckpt.read_meta(ckpt.latest_step()), cfg,
                     TCFG.replace(kernels="pallas", remat="full", moe_strategy="dense"), "full")


def test_nonfinite_run_stops_and_saves_nothing(tmp_path):
    cfg = dm.preset("tiny")
    params = dm.init_params(cfg, jax.random.key(0))
    params = {**params, "lm_head": params["lm_head"].at[3, 3].set(jnp.inf)}
    with pytest.raises(NonFiniteError, match="step 1"):
        train(cfg, TCFG, tmp_path / "nan", stop_after=3, save_every=1, params=params, **QUIET)
    assert Checkpointer(tmp_path / "nan" / "checkpoints").steps() == []
    # skipping instead: every step is dropped and counted, and the final save refuses the non-finite state
    with pytest.raises(CheckpointError, match=r"non-finite values in \['lm_head'\]$"):
        train(cfg, TCFG.replace(skip_nonfinite=True), tmp_path / "skip", stop_after=2, params=params, **QUIET)
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["skipped"], r["skipped_total"]) for r in rows] == [(1, 1), (1, 2)]
    assert Checkpointer(tmp_path / "skip" / "checkpoints").steps() == []


def test_cli_writes_metrics_plots_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--preset", "tiny", "--out", str(out), "--data", str(CORPUS), "--steps", "40", "--stop-after", "3",
            "--batch", "8", "--seq", "64", "--lr", "3e-3", "--warmup", "5", "--compute-dtype", "float32",
            "--save-every", "2", "--val-batches", "1", "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
    assert [r["step"] for r in val_rows] == [2, 3]  # every --save-every steps (the default) and at the end
    for r in val_rows:
        assert 0 < r["val_bpb"] < 12
        # bits per byte = nats per token * tokens / bytes / ln 2, and tokens >= bytes (EOS targets)
        assert r["val_bpb"] >= r["val_loss"] / np.log(2) * 0.99
    for name in ("loss.png", "expert_load.png", "router_bias.png"):
        assert (out / name).stat().st_size > 1000
    assert Checkpointer(out / "checkpoints").steps() == [2, 3]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and "val_bpb" in summary
    # errors are one clear line and exit status 2
    assert main(args[:4] + ["--data", str(tmp_path / "missing_dir"), "--out", str(tmp_path / "x")]) == 2
    assert str(tmp_path / "missing_dir") in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoints").exists() or not os.listdir(tmp_path / "x" / "checkpoints")

