"""Training: data, losses, Muon/AdamW, the jitted train step, checkpoints and the `deepmoe train` loop.

    cfg, tcfg = deepmoe.preset("tiny"), deepmoe.train.TrainConfig(batch_size=8, seq_len=256)
    state = deepmoe.train.init_state(cfg, tcfg, jax.random.key(0))
    step = deepmoe.train.make_train_step(cfg, tcfg, mesh=None)
    state, metrics = step(state, {"input_ids": ids, "segment_ids": seg})   # loss, mtp_loss, grad_norm, lr, ...

    deepmoe.train.train(cfg, tcfg, "runs/tiny")          # the whole loop (data, checkpoints, metrics, plots)
    deepmoe.train.sample(params, cfg, "def ", 64)         # quick greedy sampler (full forward per token)

Modules: data (byte tokenizer, packing), loss, optim (Muon + AdamW), step, loop (train, CLI), checkpoint
(orbax), plots, demo (`python -m deepmoe.train.demo`).
"""

from deepmoe.train.step import TrainConfig, TrainState, init_state, make_eval_step, make_train_step

_LAZY = {
    "train": "deepmoe.train.loop", "sample": "deepmoe.train.loop", "load_trained": "deepmoe.train.loop",
    "cli_train": "deepmoe.train.loop", "add_train_arguments": "deepmoe.train.loop", "main": "deepmoe.train.loop",
    "Checkpointer": "deepmoe.train.checkpoint",
    "CheckpointError": "deepmoe.train.checkpoint", "TextDataset": "deepmoe.train.data",
    "ByteTokenizer": "deepmoe.train.data", "DataError": "deepmoe.train.data",
}

__all__ = ["TrainConfig", "TrainState", "init_state", "make_eval_step", "make_train_step", *_LAZY]


def __getattr__(name: str):
    # The loop pulls in orbax, tqdm and matplotlib: import it only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepmoe.train' has no attribute {name!r}")
