"""train() compiles its three programs side by side before the first step and the loop then runs them without
compiling again; compile_side_by_side runs its programs at once, keeps their order, and raises a program's
error only after the others finished."""

import sysconfig
import threading
from pathlib import Path

import pytest

import deepmoe as dm
from deepmoe.config import SLIDING
from deepmoe.train import TrainConfig
from deepmoe.train import step as step_module
from deepmoe.train.loop import make_data_mesh, train
from deepmoe.train.precompile import compile_side_by_side

TCFG = TrainConfig(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, compute_dtype="float32")
CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "email"
PROGRAMS = ("gradients", "update_state", "evaluate")  # the jitted functions' names in JAX's compile log


def test_programs_compile_at_once_in_the_given_order():
    meet = threading.Barrier(2, timeout=60)  # each waits for the other: returns only if both run at once
    seconds = compile_side_by_side({"first": meet.wait, "second": meet.wait}, workers=2)
    assert list(seconds) == ["first", "second"] and all(s >= 0 for s in seconds.values())


def test_an_error_is_raised_after_the_other_programs_finish():
    finished = []

    def broken():
        raise ValueError("no such op")

    with pytest.raises(ValueError, match="no such op"):
        compile_side_by_side({"broken": broken, "fine": lambda: finished.append("fine")}, workers=1)
    assert finished == ["fine"]


# A one-layer model (cheap to compile) on one device, and on a two-device data mesh, where the programs'
# shardings must match the loop's calls too.
ONE_LAYER = dm.preset("tiny").replace(num_layers=1, layer_types=(SLIDING,), num_mtp_layers=0)
RUNS = {"one-device": (ONE_LAYER, 1), "data-mesh": (ONE_LAYER, 2)}


@pytest.mark.parametrize("run", list(RUNS))
def test_train_compiles_each_program_once_on_the_compile_threads(run, tmp_path, compile_log):
    cfg, devices = RUNS[run]
    # New jitted functions, so this run compiles them (or loads them from the persistent cache, which logs the
    # same line) even if another test of this process compiled the same programs.
    step_module._make_train_step.cache_clear()
    step_module._make_eval_step.cache_clear()
    with compile_log() as compiles:
        result = train(cfg, TCFG, tmp_path, data=CORPUS, stop_after=2, save_every=100, val_batches=1,
                       mesh=make_data_mesh(devices), progress=False, plots=False)
    for program in PROGRAMS:
        threads = [thread for name, thread in compiles if name == program]
        assert len(threads) == 1, (program, compiles)  # a second compile: a call missed the precompiled one
        assert threads[0].startswith("deepmoe-compile"), (program, threads)
    assert [r["step"] for r in result.history if "loss" in r] == [1, 2] and result.val["val_tokens"] > 0
