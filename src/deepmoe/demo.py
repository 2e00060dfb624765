"""`make demo`: build the tiny model, run a forward pass, print every preset's parameter table.

(Replaced by train-and-sample once the training loop lands.)
"""

from __future__ import annotations

import time


def main() -> None:
    import jax

    import deepmoe as dm
    from deepmoe.info import parameter_table

    cfg = dm.preset("tiny")
    params = dm.init_params(cfg, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 64), 0, cfg.vocab_size)
    start = time.perf_counter()
    out = jax.jit(lambda p, x: dm.forward(p, cfg, x))(params, ids)
    out.logits.block_until_ready()
    print(f"tiny forward: logits {out.logits.shape}, mtp_logits {out.mtp_logits.shape} "
          f"in {time.perf_counter() - start:.1f}s (incl. compile)")
    print(parameter_table())


if __name__ == "__main__":
    main()
