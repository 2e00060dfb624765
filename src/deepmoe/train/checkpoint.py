"""Training checkpoints with orbax's CheckpointManager.

Layout: DIR/checkpoints/<step>/{state, data, meta}:
  state  the TrainState as a pytree (fp32 params incl. router biases and hash tables, optimizer state, step,
         raw RNG key, skip count)  -- StandardSave
  data   the data read position and the corpus fingerprint                   -- JsonSave
  meta   model config, train config, format version                           -- JsonSave

Atomicity comes from orbax: a step is written into a temporary directory and renamed only once complete, and
`latest_step()` ignores unfinished ones (they are removed on the next start), so a kill during a save leaves
the previous checkpoint as the latest. Saves are synchronous (nothing half-written while training goes on).
A state with non-finite parameters is never written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from deepmoe.config import ModelConfig
from deepmoe.train.step import TrainConfig, TrainState, init_state, layers_scanned

FORMAT_VERSION = 1
# Train-config fields that may differ on resume (they don't change the state's structure or meaning; remat,
# moe_strategy and kernels only choose how the same math executes).
RESUMABLE_CHANGES = {"steps", "skip_nonfinite", "remat", "moe_strategy", "kernels"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, incompatible with the current config, or would contain NaNs."""


def _manager(directory: Path, keep: int | None, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False, read_only=read_only)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "data", "meta"))


class Checkpointer:
    """Save / restore TrainState + data position under `directory` (keeps the last `keep` steps)."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep
        self._mngr: ocp.CheckpointManager | None = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._mngr is None:
            self._mngr = _manager(self.directory, self.keep)
        return self._mngr

    def steps(self) -> list[int]:
        if not self.directory.exists():
            return []
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        if not self.directory.exists():
            return None
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: dict, cfg: ModelConfig, tcfg: TrainConfig) -> int:
        """Write `state` at its step. Raises CheckpointError (writing nothing) if any parameter is non-finite."""
        step = int(state.step)
        host_state = jax.device_get(state.to_dict())
        # checked in numpy on the copy being saved: a jnp check per leaf compiled two small programs per
        # parameter shape, ~5 s of the first save of `tiny` on a 2-core CPU
        bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(host_state["params"])
               if jnp.issubdtype(x.dtype, jnp.floating) and not np.isfinite(x).all()]
        if bad:
            raise CheckpointError(f"refusing to save step {step}: non-finite values in {', '.join(bad[:5])}")
        meta = {"format": FORMAT_VERSION, "model": dataclasses.asdict(cfg), "train": tcfg.to_dict()}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        return step

    def read_meta(self, step: int) -> dict:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"])
        except Exception as e:  # noqa: BLE001 -- orbax raises many types; the message matters
            raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable ({_brief(e)})") from e

    def restore(self, cfg: ModelConfig, tcfg: TrainConfig, step: int | None = None
                ) -> tuple[TrainState, dict]:
        """Latest (or given) step -> (TrainState, data state dict). Checks that the saved model / train configs
        match the current ones and that every array arrives with the expected shape and dtype."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no finished checkpoint in {self.directory}")
        meta = self.read_meta(step)
        check_compatible(meta, cfg, tcfg, f"{self.directory}/{step}")
        abstract = jax.eval_shape(lambda: init_state(cfg, tcfg, jax.random.key(0)).to_dict())
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            earlier = [s for s in self.steps() if s < step]
            hint = (f"; to go back to step {earlier[-1]}, move {self.directory}/{step} away" if earlier else "")
            raise CheckpointError(f"checkpoint {self.directory}/{step} is corrupt or incompatible ({_brief(e)})"
                                  f"{hint}") from e
        restored = out["state"]
        _check_tree(restored, abstract, f"{self.directory}/{step}")
        state = TrainState.from_dict(jax.device_put(restored))  # one transfer; jnp.asarray compiled per shape
        return state, dict(out["data"])

    def close(self) -> None:
        if self._mngr is not None:
            self._mngr.close()
            self._mngr = None


def check_compatible(meta: dict, cfg: ModelConfig, tcfg: TrainConfig, where: str) -> None:
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {where} has format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    saved_model = meta.get("model", {})
    current = dataclasses.asdict(cfg)
    diff = sorted(k for k in set(saved_model) | set(current) if _norm(saved_model.get(k)) != _norm(current.get(k)))
    if diff:
        detail = ", ".join(f"{k}: saved {saved_model.get(k)!r} vs now {current.get(k)!r}" for k in diff[:6])
        raise CheckpointError(f"checkpoint {where} was trained with a different model config ({detail})")
    saved_train, now = dict(meta.get("train", {})), tcfg.to_dict()
    # What must match is the parameter layout, not how it was chosen; checkpoints written before the setting
    # existed hold the stacked layout.
    saved_train["scan_layers"] = layers_scanned(cfg, tcfg.replace(scan_layers=saved_train.get("scan_layers", True)))
    now["scan_layers"] = layers_scanned(cfg, tcfg)
    diff = sorted(k for k in set(saved_train) | set(now)
                  if k not in RESUMABLE_CHANGES and _norm(saved_train.get(k)) != _norm(now.get(k)))
    if diff:
        detail = ", ".join(f"{k}: saved {saved_train.get(k)!r} vs now {now.get(k)!r}" for k in diff[:6])
        raise CheckpointError(f"checkpoint {where} was trained with different training settings ({detail}); "
                              "resume with the same settings")


def _brief(e: Exception) -> str:
    text = str(e).split("[tensorstore_spec")[0].strip()  # tensorstore appends kilobytes of spec
    return f"{type(e).__name__}: {text[:400]}"


def _norm(x: Any) -> Any:
    return json.loads(json.dumps(x))  # tuples -> lists, so saved JSON and live values compare equal


def _check_tree(restored: Any, abstract: Any, where: str) -> None:
    got = jax.tree_util.tree_leaves_with_path(restored)
    want = jax.tree_util.tree_leaves_with_path(abstract)
    if len(got) != len(want):
        raise CheckpointError(f"checkpoint {where} has {len(got)} arrays, the current config needs {len(want)}")
    for (path, x), (_, spec) in zip(got, want):
        if tuple(np.shape(x)) != tuple(spec.shape) or np.asarray(x).dtype != spec.dtype:
            raise CheckpointError(f"checkpoint {where}: {jax.tree_util.keystr(path)} is {np.shape(x)} "
                                  f"{np.asarray(x).dtype}, expected {spec.shape} {spec.dtype}")


logging.getLogger("absl").setLevel(logging.WARNING)
