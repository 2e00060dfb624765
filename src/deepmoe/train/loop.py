"""The training loop and the `deepmoe train` command: data -> jitted steps -> metrics.jsonl, checkpoints,
validation, plots; plus a quick full-forward sampler and the `make demo` entry point.

    deepmoe train --preset tiny --steps 300 --out runs/tiny [--data PATH ...] [--resume] ...

DIR/metrics.jsonl holds one JSON object per line: train rows {"step", "loss", "mtp_loss", "balance_loss",
"grad_norm", "lr", "tokens_per_s", "load_max_over_mean": [per layer], "bias_abs_mean": [per layer], ...} and
validation rows {"step", "val_loss", "val_bpb"}. `step` counts completed optimizer steps. DIR/config.json has
the model and train configs; DIR/checkpoints/<step>/ the orbax checkpoints; DIR/*.png the plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepmoe.config import KERNELS, ModelConfig, preset
from deepmoe.model import forward
from deepmoe.train import loss as L
from deepmoe.train.checkpoint import CheckpointError, Checkpointer
from deepmoe.train.data import ByteTokenizer, DataError, DataState, TextDataset
from deepmoe.train.optim import trainable_count
from deepmoe.train.precompile import precompile_training
from deepmoe.train.step import (TrainConfig, TrainState, init_state, make_eval_step, make_train_step,
                                model_config_for_training, replicate, shard_batch)


RAW_METRICS = {"expert_load", "mtp_expert_load"}  # per-expert arrays kept out of metrics.jsonl


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm of a step was NaN/inf (and skipping was not asked for)."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]  # the metrics.jsonl rows written by this call
    val: dict | None  # final {"step", "val_loss", "val_bpb"} (None without validation data)
    out_dir: Path


def _jsonable(x: Any) -> Any:
    a = np.asarray(x)
    if a.ndim == 0:
        v = a.item()
        return round(v, 6) if isinstance(v, float) and math.isfinite(v) else (v if not isinstance(v, float)
                                                                                else str(v))
    return [round(float(v), 6) for v in a.reshape(-1)]


class MetricsLog:
    """Append-only DIR/metrics.jsonl; on resume, rows after the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        rows = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if row.get("step", 0) <= resume_step:
                    rows.append(row)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def evaluate(params, cfg: ModelConfig, tcfg: TrainConfig, batches: Sequence[dict], mesh=None,
             tokenizer: ByteTokenizer | None = None) -> dict:
    """Validation next-token loss (nats/token) and bits per byte over `batches`."""
    tokenizer = tokenizer or ByteTokenizer()
    eval_fn = make_eval_step(cfg, tcfg, mesh)
    ce, tokens, nbytes = 0.0, 0, 0
    for batch in batches:
        out = jax.device_get(eval_fn(params, shard_batch(batch, mesh)))
        ce += float(out["ce_sum"])
        tokens += int(out["tokens"])
        ids = np.asarray(batch["input_ids"])
        mask = np.asarray(L.target_mask(ids, np.asarray(batch["segment_ids"]), 1, tcfg.pad_token_id))
        nbytes += int(np.sum(mask & np.asarray(tokenizer.is_byte(np.asarray(L.shifted(ids, 1, 0))))))
    return {"val_loss": ce / max(tokens, 1), "val_bpb": L.bits_per_byte(ce, nbytes), "val_tokens": tokens}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr)


def train(cfg: ModelConfig, tcfg: TrainConfig, out_dir: str | Path, *, data: Any = None,
          save_every: int = 100, keep: int = 3, eval_every: int | None = None, val_batches: int = 4,
          log_every: int = 1, resume: bool = False, progress: bool = True, mesh=None, plots: bool = True,
          val_fraction: float = 0.05, params: Any = None, stop_after: int | None = None) -> TrainResult:
    """Train `cfg` per `tcfg` on `data` (paths / glob / list, a TextDataset, or None for the Python stdlib),
    writing everything under `out_dir`. `resume=True` continues from the latest checkpoint there (a fresh
    run refuses to start over existing checkpoints). `stop_after` ends the call early after that many steps
    in total (the schedule still follows tcfg.steps), saving a checkpoint: for tests and time-boxed runs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = ByteTokenizer.for_config(cfg)
    if isinstance(data, TextDataset):
        dataset = data
    else:
        dataset = TextDataset.from_paths(data, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed,
                                         val_fraction=val_fraction, tokenizer=tokenizer)
    if (dataset.seq_len, dataset.batch_size) != (tcfg.seq_len, tcfg.batch_size):
        raise DataError(f"dataset rows are {dataset.batch_size}x{dataset.seq_len}, the train config wants "
                        f"{tcfg.batch_size}x{tcfg.seq_len}")
    ckpt = Checkpointer(out / "checkpoints", keep=keep)
    data_state = DataState()
    resume_step = None
    if resume and ckpt.latest_step() is not None:
        state, data_json = ckpt.restore(cfg, tcfg)
        dataset.check_state(data_json.get("fingerprint", ""))
        data_state = DataState.from_json(data_json)
        resume_step = int(state.step)
        print(f"resuming from {ckpt.directory}/{resume_step}", file=sys.stderr)
    else:
        if ckpt.steps():
            raise CheckpointError(f"{ckpt.directory} already holds checkpoints (steps {ckpt.steps()}); pass "
                                  "--resume to continue that run or choose another --out")
        if resume:
            print(f"no checkpoint in {ckpt.directory}: starting from scratch", file=sys.stderr)
        state = init_state(cfg, tcfg, jax.random.key(tcfg.seed), params=params)
    (out / "config.json").write_text(json.dumps(
        {"model": dataclasses.asdict(cfg), "train": tcfg.to_dict(), "tokenizer": "bytes+3 (0 bos, 1 eos, 2 pad)",
         "data_fingerprint": dataset.fingerprint}, indent=2))
    log = MetricsLog(out / "metrics.jsonl", resume_step if resume_step is not None else 0)
    val_set = dataset.val_batches(val_batches) if val_batches else []
    eval_every = eval_every if eval_every is not None else max(save_every, 1)

    if progress:
        counts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sorted(trainable_count(cfg, tcfg).items()))
        print(f"deepmoe train: {cfg.num_layers} layers, parameters by update rule: {counts}; "
              f"{dataset.num_bytes / 1e6:.1f} MB of text in {len(dataset.files)} files", file=sys.stderr)
    step_fn = make_train_step(cfg, tcfg, mesh, donate=True)
    state = replicate(state, mesh)
    start = int(state.step)
    end = tcfg.steps if stop_after is None else min(tcfg.steps, stop_after)
    if end > start:  # the first batch, peeked (batch() returns the next state, it does not advance this one)
        seconds = precompile_training(step_fn, make_eval_step(cfg, tcfg, mesh), state,
                                      shard_batch(dataset.batch(data_state)[0], mesh),
                                      shard_batch(val_set[0], mesh) if val_set else None)
        if progress:
            # "or loaded": with the compilation cache on (the commands), a later run loads them
            print(f"compiled or loaded the programs side by side in {max(seconds.values()):.1f}s (ready after: "
                  f"{', '.join(f'{k} {v:.1f}s' for k, v in seconds.items())})", file=sys.stderr)
    history: list[dict] = []
    val_row = None

    def save():
        ckpt.save(state, {**data_state.to_json(), "fingerprint": dataset.fingerprint}, cfg, tcfg)

    def validate(step: int):
        nonlocal val_row
        if not val_set:
            return
        val_row = {"step": step, **{k: _jsonable(v) for k, v in
                                    evaluate(state.params, cfg, tcfg, val_set, mesh, tokenizer).items()}}
        log.write(val_row)
        history.append(val_row)

    bar = _progress(end, start, progress)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    t_start = time.perf_counter()
    try:
        for step in range(start + 1, end + 1):
            t0 = time.perf_counter()
            batch, data_state = dataset.batch(data_state)
            state, metrics = step_fn(state, shard_batch(batch, mesh))
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            if metrics["skipped"] and not tcfg.skip_nonfinite:
                raise NonFiniteError(f"non-finite loss or gradient at step {step} (loss={metrics['loss']}, "
                                     f"grad_norm={metrics['grad_norm']}); nothing was saved for this step. "
                                     "Lower the LR, or pass --skip-nonfinite to drop such steps")
            if step % log_every == 0 or step == end:
                row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items() if k not in RAW_METRICS},
                       "skipped_total": int(state.skipped), "tokens_per_s": round(tokens_per_step / dt, 1),
                       "elapsed_s": round(time.perf_counter() - t_start, 2)}
                log.write(row)
                history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
            if eval_every and step % eval_every == 0 and step != end:
                validate(step)
            if save_every and step % save_every == 0 and step != end:
                save()
        if end > start or val_row is None:
            validate(end)
        if end > start:
            save()
    finally:
        bar.close()
        ckpt.close()
    if plots:
        from deepmoe.train.plots import write_plots

        write_plots(out / "metrics.jsonl", out)
    return TrainResult(state=state, history=history, val=val_row, out_dir=out)


# ----- loading and sampling -------------------------------------------------------------------------------


def load_trained(out_dir: str | Path, step: int | None = None) -> tuple[ModelConfig, dict]:
    """(model config, fp32 params) from a `deepmoe train` output directory (latest step by default)."""
    out = Path(out_dir)
    conf_path = out / "config.json"
    if not conf_path.exists():
        raise CheckpointError(f"{out} is not a training directory (no config.json)")
    conf = json.loads(conf_path.read_text())
    model = {k: tuple(v) if isinstance(v, list) else v for k, v in conf["model"].items()}
    cfg = ModelConfig(**model)
    tcfg = TrainConfig.from_dict(conf["train"])
    state, _ = Checkpointer(out / "checkpoints").restore(cfg, tcfg, step)
    return cfg, state.params


@functools.lru_cache(maxsize=8)
def _next_token_fn(cfg: ModelConfig):
    @jax.jit
    def next_token(params, buf, pos, key, temperature):
        logits = forward(params, cfg, buf, mtp=False).logits[0, pos - 1]
        greedy = jnp.argmax(logits)
        drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)

    return next_token


def sample_ids(params, cfg: ModelConfig, prompt_ids: Sequence[int], n: int, *, temperature: float = 0.0,
               key: jax.Array | None = None, eos_id: int | None = None, pad_id: int = 2) -> list[int]:
    """Append up to `n` tokens to `prompt_ids` by re-running the full forward for each (no cache). The
    window is a fixed bucket (multiple of 64), padded after the cursor: the model is causal, so padding
    never changes the logits at the cursor, and one compilation serves the whole generation."""
    ids = list(int(i) for i in prompt_ids)
    length = max(64, -(-(len(ids) + n) // 64) * 64)
    buf = np.full((1, length), pad_id, np.int32)
    buf[0, :len(ids)] = ids
    key = jax.random.key(0) if key is None else key
    fn = _next_token_fn(cfg)
    for i in range(n):
        pos = len(ids)
        tok = int(fn(params, jnp.asarray(buf), pos, jax.random.fold_in(key, i), jnp.float32(temperature)))
        ids.append(tok)
        buf[0, pos] = tok
        if eos_id is not None and tok == eos_id:
            break
    return ids


def sample(params, cfg: ModelConfig, prompt: str, n: int = 64, *, temperature: float = 0.0,
           key: jax.Array | None = None) -> str:
    """Continue `prompt` (text, byte tokenizer) by up to `n` bytes; returns the prompt plus the continuation."""
    tok = ByteTokenizer.for_config(cfg)
    ids = sample_ids(params, cfg, tok.encode(prompt, bos=True), n, temperature=temperature, key=key,
                     eos_id=tok.eos_id, pad_id=tok.pad_id)
    return tok.decode(ids)


# ----- CLI ------------------------------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = TrainConfig()
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, ...)")
    p.add_argument("--out", required=True, help="output directory (metrics.jsonl, checkpoints, plots)")
    p.add_argument("--data", nargs="*", default=None,
                   help="files, directories or globs of text/code (default: the Python stdlib sources)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch_size, help="sequences per optimizer step")
    p.add_argument("--seq", type=int, default=d.seq_len, help="tokens per sequence")
    p.add_argument("--accum", type=int, default=d.grad_accum, help="gradient-accumulation micro-batches")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=d.warmup_steps)
    p.add_argument("--decay-start", type=float, default=d.decay_start,
                   help="fraction of steps after which the cosine decay (and MTP weight drop) begins")
    p.add_argument("--optimizer", choices=("muon", "adamw"), default=d.optimizer)
    p.add_argument("--wd", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip_norm, help="global-norm clip (0: off)")
    p.add_argument("--mtp-weight", type=float, default=d.mtp_weight)
    p.add_argument("--mtp-weight-after-decay", type=float, default=d.mtp_weight_after_decay)
    p.add_argument("--balance-weight", type=float, default=d.balance_weight)
    p.add_argument("--bias-speed", type=float, default=d.bias_update_speed)
    p.add_argument("--z-loss", type=float, default=d.z_loss_weight)
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default=d.remat)
    p.add_argument("--kernels", choices=KERNELS, default=d.kernels,
                   help="attention core and the sorted MoE's grouped matmul: reference (jnp), pallas (pallas_kernels; "
                        "interpreted, so slow, where there is no Pallas lowering, e.g. CPU), auto (Pallas on GPU); "
                        "default: the preset's")
    p.add_argument("--scan-layers", choices=("auto", "yes", "no"), default="auto",
                   help="train over stacked layers scanned per segment (yes) or per-layer params, unrolled (no: "
                        "faster steps, longer compile); auto: per-layer for models of at most 16 layers whose "
                        "schedule repeats (deepmoe.train.step.layers_scanned)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--skip-nonfinite", action="store_true", help="skip (and count) non-finite steps")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--eval-every", type=int, default=None, help="validation interval (default: --save-every)")
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="end this invocation after STEP total steps (saving a checkpoint; --resume goes on)")
    p.add_argument("--data-parallel", type=int, default=1, help="shard the batch over this many devices")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sample", default=None, metavar="PROMPT", help="print a greedy sample at the end")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    cfg = preset(args.preset)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, grad_accum=args.accum,
                       lr=args.lr, warmup_steps=args.warmup, decay_start=args.decay_start,
                       optimizer=args.optimizer, weight_decay=args.wd, clip_norm=args.clip,
                       mtp_weight=args.mtp_weight, mtp_weight_after_decay=args.mtp_weight_after_decay,
                       balance_weight=args.balance_weight, bias_update_speed=args.bias_speed,
                       z_loss_weight=args.z_loss, compute_dtype=args.compute_dtype, remat=args.remat,
                       kernels=args.kernels, seed=args.seed, skip_nonfinite=args.skip_nonfinite,
                       scan_layers={"auto": None, "yes": True, "no": False}[args.scan_layers])
    return cfg, tcfg


def make_data_mesh(n: int):
    if n <= 1:
        return None
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(f"--data-parallel {n} needs {n} devices, found {len(devices)}")
    return jax.sharding.Mesh(np.array(devices[:n]), ("data",))


def cli_train(args: argparse.Namespace) -> int:
    """Run `deepmoe train` from parsed arguments; returns the exit status."""
    try:
        cfg, tcfg = config_from_args(args)
        result = train(cfg, tcfg, args.out, data=args.data or None, save_every=args.save_every, keep=args.keep,
                       eval_every=args.eval_every, val_batches=args.val_batches, resume=args.resume,
                       progress=not args.no_progress, mesh=make_data_mesh(args.data_parallel),
                       stop_after=args.stop_after)
    except (DataError, CheckpointError, NonFiniteError, ValueError) as e:
        print(f"deepmoe train: error: {e}", file=sys.stderr)
        return 2
    last = next((r for r in reversed(result.history) if "loss" in r), None)
    summary = {"out": str(result.out_dir), "step": int(result.state.step)}
    if last:
        summary["loss"] = last["loss"]
    if result.val:
        summary.update(val_loss=result.val["val_loss"], val_bpb=result.val["val_bpb"])
    print(json.dumps(summary))
    if args.sample is not None:
        params = jax.device_get(result.state.params)
        print(sample(params, model_config_for_training(cfg, tcfg), args.sample, 128))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_train_arguments(argparse.ArgumentParser(prog="deepmoe train", description=__doc__.split("\n")[0]))
    return cli_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
