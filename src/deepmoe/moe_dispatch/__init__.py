"""Interchangeable MoE execution strategies behind one signature:

    run(experts_params, cfg, x [B,T,D], expert_ids [B,T,K], weights [B,T,K]) -> [B,T,D] float32

`dense` evaluates every expert on every token (the reference); `sorted` groups token copies by expert and runs
`jax.lax.ragged_dot` (dropless, the default).
"""

from __future__ import annotations

from deepmoe.moe_dispatch.dense import run as run_dense
from deepmoe.moe_dispatch.sorted import run as run_sorted

STRATEGIES = {"dense": run_dense, "sorted": run_sorted}


def run_experts(strategy: str, params, cfg, x, expert_ids, weights):
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](params, cfg, x, expert_ids, weights)
