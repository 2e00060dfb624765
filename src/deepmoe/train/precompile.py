"""Compile a training run's programs side by side before its first step.

A run needs three programs before it can log anything: the gradients (forward + backward), the optimizer
update, and the validation forward. Called in turn, each compiles at its first call, one after the other;
but XLA compiles outside the GIL, and one XLA:CPU compile keeps only ~1.5 of 2 cores busy, so the three
overlap on threads. On the 2-vCPU host of docs/performance.md (fifteenth session) that took ~10 % off
`tiny`'s compile time (34.6 -> 31.4 s on average) and ~7 s off `make demo`; a host with more cores gains more.
The executables land in the jitted functions' own caches: the loop's ordinary calls then run them without
compiling again.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


def compile_side_by_side(programs: dict[str, Callable[[], Any]], workers: int | None = None) -> dict[str, float]:
    """Run each zero-argument `lambda: jitted.lower(...).compile()` of `programs` on a thread pool of
    `workers` (default: one per program, at most one per core), in the given order: put the biggest first.
    Returns the seconds each took from the start; a compile's error is raised here, after the rest finish."""
    workers = workers or max(1, min(len(programs), os.cpu_count() or 1))
    t0 = time.perf_counter()

    def timed(compile_program: Callable[[], Any]) -> float:
        compile_program()
        return time.perf_counter() - t0

    with ThreadPoolExecutor(workers, thread_name_prefix="deepmoe-compile") as pool:
        futures = {name: pool.submit(timed, fn) for name, fn in programs.items()}
    return {name: future.result() for name, future in futures.items()}


def precompile_training(train_step: Any, eval_step: Any, state: Any, batch: dict,
                        val_batch: dict | None) -> dict[str, float]:
    """Compile `train_step`'s two halves (a make_train_step TrainStep) for `state` and the first (placed)
    `batch`, and `eval_step` (make_eval_step) for the placed `val_batch` if there is one, side by side.
    The gradients are traced first, here: the update's arguments are their outputs' shapes."""
    traced = train_step.gradients.trace(state.params, state.step, batch)
    programs = {"gradients": lambda: traced.lower().compile(),
                "update": lambda: train_step.update.lower(state, *traced.out_info).compile()}
    if val_batch is not None:
        programs["evaluate"] = lambda: eval_step.lower(state.params, val_batch).compile()
    return compile_side_by_side(programs)
