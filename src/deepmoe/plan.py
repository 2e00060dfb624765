"""Memory / FLOP / communication planner on abstract parameters (nothing is allocated).

    deepmoe plan --preset v4-pro --mesh data=4,expert=64,tensor=8 --device ascend-910c

Per device, for a mesh and the ShardingRules of sharding.py (the layout `shard_params` really uses):

* parameters: every ParamSpec's bytes / the number of shards its logical axes get on the mesh. Leaves the spec
  keeps in float32 (norms, mHC, router, sinks, compressor position bias) stay float32; the hash tables are
  int32 buffers. Training keeps float32 master weights (as `train/step.py`); inference defaults to bf16.
* gradients (train): float32, sharded like the parameters (frozen leaves have none).
* optimizer state (train): float32; AdamW = 2 states (m, v) per element, Muon = 1 (momentum) per element of
  the matrices `train/optim.py` gives to Muon, AdamW for the rest, nothing for frozen leaves.
* FSDP gather buffer: one layer's parameters gathered over the `gathered` axes, in the compute dtype.
* activations (estimate, see `layer_activation_bytes`): tokens per device = sequences per device x seq_len.
  remat="full" keeps only each layer's input streams plus one layer's working set; remat="none" keeps every
  layer's working set. Attention is assumed fused (score matrices not stored). float32 logits and their
  gradient for the main head and the MTP head, vocab split over `tensor`. Against XLA:CPU's gradient program
  (memory-ordered schedule, `small`, fp32, remat="full"): within 7 % at T=512-2048, 1.3-1.4x more at 4096-8192.
  XLA's attention (kernels="reference") keeps score buffers of up to `query_chunks.SCORE_CHUNK_BYTES` per chunk
  (`experiments/memory_vs_context.py`, docs/performance.md).
* KV cache (infer): bytes per token from `infer/accounting.py` (spec §9.3: V4-Flash 3.51 KB, V4-Pro 5.03 KB in
  the release FP8 layout) x context + the fixed per-sequence state, per sequence on the device. The single
  KV head is replicated over `tensor`.

FLOPs per token, forward:  F = 2 * A + attention
  A = active matmul parameters: every weight used in a matmul once per token (all >= 2-d leaves except the
      embedding lookup table, hash tables and the compressors' position bias), routed experts counted
      experts_per_token / num_experts of the way, the MTP hidden projection counted residual_streams times
      (it maps every stream), the LM head counted once per head (main + MTP).
  attention per layer and token with k visible keys:  4 * H * c * k  (q.k and p.v over the shared 512-d head);
      k = window (SWA), window + min(top-k, entries) (CSA), window + entries (HCA), entries = position / ratio;
      CSA adds the indexer, 2 * H_I * (c_I + 1) * entries.
  Training averages these over the positions of a seq_len sequence; inference takes position = context.
  Training = 3 F per token (forward + backward), plus F again when remat recomputes the forward.

Communication per token (bytes leaving a device): expert all-to-all = 2 (dispatch + combine) x K x D x
compute bytes x (G-1)/G per MoE layer, x the capacity padding for `ep_all_to_all` (E/K when dropless);
tensor all-reduce = 2 per layer (attention and MoE outputs) x 2 (G_t-1)/G_t x D x compute bytes.

Device figures are approximate vendor numbers (dense BF16, no sparsity): NVIDIA H100 SXM 80 GB / 989 TFLOP/s,
H200 141 GB / 989, B200 (HGX) 180 GB / ~2250; Google TPU v5p 95 GB / 459; Huawei Ascend 910B 64 GB / ~320 and
910C 128 GB / ~780 (press figures; Huawei does not publish a BF16 datasheet number).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any, Sequence

import numpy as np

from deepmoe.config import CSA, HCA, PRESETS, SLIDING, ModelConfig, preset

GB = 1e9
HEADROOM = 0.9  # fits when the total stays under 90 % of HBM (XLA scratch, collectives, fragmentation)
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float8": 1.0, "float4": 0.5}


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    hbm_bytes: float
    peak_bf16_flops: float  # dense
    source: str


DEVICES = {
    "h100": Device("NVIDIA H100 SXM", 80 * GB, 989e12, "NVIDIA H100 datasheet (dense BF16)"),
    "h200": Device("NVIDIA H200 SXM", 141 * GB, 989e12, "NVIDIA H200 datasheet (dense BF16)"),
    "b200": Device("NVIDIA B200 (HGX)", 180 * GB, 2250e12, "NVIDIA HGX B200 spec (dense BF16, approx.)"),
    "tpu-v5p": Device("Google TPU v5p", 95 * GB, 459e12, "Google Cloud TPU v5p docs"),
    "ascend-910b": Device("Huawei Ascend 910B", 64 * GB, 320e12, "approx. press figure (FP16/BF16)"),
    "ascend-910c": Device("Huawei Ascend 910C", 128 * GB, 780e12, "approx. press figure (BF16)"),
}


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    mode: str = "train"  # train | infer
    global_batch: int | None = None  # sequences; default one per batch shard
    seq_len: int = 4096
    context: int | None = None  # infer: KV length (default seq_len)
    param_dtype: str | None = None  # default float32 (train, master weights) / bfloat16 (infer)
    expert_dtype: str | None = None  # routed experts (e.g. float4 for the release weights); default param_dtype
    compute_dtype: str = "bfloat16"
    optimizer: str = "muon"  # muon | adamw
    remat: str = "full"  # full | none
    capacity_factor: float | None = None  # ep_all_to_all padding; None = dropless
    kv_layout: str = "fp8"  # fp8 (release) | ours


# ----- parameters ------------------------------------------------------------------------------------------

def _leaves(cfg: ModelConfig):
    import jax

    from deepmoe.params import is_spec, param_specs

    from deepmoe.sharding import _path_name

    flat, _ = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=is_spec)
    return [(_path_name(path), spec) for path, spec in flat]


def _optimizer_states(cfg: ModelConfig, optimizer: str) -> dict[str, int]:
    """Leaf name -> float32 optimizer states per element (AdamW 2, Muon 1, frozen 0)."""
    import jax

    from deepmoe.sharding import _path_name
    from deepmoe.train.optim import param_labels

    flat, _ = jax.tree_util.tree_flatten_with_path(param_labels(cfg, optimizer))
    return {_path_name(path): {"adamw": 2, "muon": 1, "frozen": 0}[label] for path, label in flat}


def _is_routed(name: str) -> bool:
    return "/moe/experts/" in f"/{name}"


def _leaf_bytes(name: str, spec, opts: PlanOptions, param_dtype: str) -> float:
    if spec.dtype is not None:  # float32 islands and int32 hash tables keep their dtype
        return 4.0
    if _is_routed(name) and opts.expert_dtype:
        return DTYPE_BYTES[opts.expert_dtype]
    return DTYPE_BYTES[param_dtype]


def parameter_memory(cfg: ModelConfig, mesh: dict[str, int], rules=None, opts: PlanOptions = PlanOptions()
                     ) -> dict[str, float]:
    """Per-device bytes of params, grads, optimizer state and one layer's FSDP-gathered weights."""
    from deepmoe.sharding import ShardingRules, check_model, spec_shards

    rules = rules or ShardingRules()
    check_model(cfg, mesh, rules)
    param_dtype = opts.param_dtype or ("float32" if opts.mode == "train" else "bfloat16")
    states = _optimizer_states(cfg, opts.optimizer) if opts.mode == "train" else {}
    out = dict(params=0.0, grads=0.0, optimizer=0.0, fsdp_gather=0.0, params_total=0.0)
    layer_gathered: dict[str, float] = {}
    for name, spec in _leaves(cfg):
        elements = math.prod(spec.shape)
        shards = math.prod(spec_shards(rules.spec(spec.axes), mesh))
        nbytes = _leaf_bytes(name, spec, opts, param_dtype)
        out["params"] += elements * nbytes / shards
        out["params_total"] += elements * nbytes
        if opts.mode == "train" and states.get(name, 0):
            out["grads"] += elements * 4.0 / shards
            out["optimizer"] += states[name] * elements * 4.0 / shards
        if spec.axes and spec.axes[0] == "layers":  # one layer of a stack, gathered over the FSDP axes
            group = name.split("/")[:3]  # segments/s/p
            gathered = math.prod(spec_shards(rules.spec(spec.axes, gathered=True), mesh))
            layer = elements / spec.shape[0] * DTYPE_BYTES[opts.compute_dtype] / gathered
            layer_gathered["/".join(group)] = layer_gathered.get("/".join(group), 0.0) + layer
    if any(mesh.get(a, 1) > 1 for a in rules.gathered):
        out["fsdp_gather"] = max(layer_gathered.values(), default=0.0)
    return out


def decode_weight_bytes(cfg: ModelConfig, param_dtype: str = "float32", batch: int = 1) -> float:
    """Bytes of weights one decode step reads, the MTP module left out: every matrix and vector once, one row of
    the embedding and of each hash table per sequence, and of each MoE layer's routed experts the ones its
    tokens pick (k per sequence, at most all E; at batch 1 exactly k). A decode step cannot run faster than this
    over the machine's read bandwidth; `deepmoe bench` reports the achieved fraction (MBU)."""
    opts = PlanOptions(mode="infer", param_dtype=param_dtype)
    experts_read = min(cfg.num_experts, batch * cfg.experts_per_token)
    total = 0.0
    for name, spec in _leaves(cfg):
        if name.startswith("mtp/"):
            continue
        elements = float(math.prod(spec.shape))
        if name.split("/")[-1] in ("embed", "tid2eid"):  # [..., vocab, width] tables: one row per token
            vocab = spec.shape[-2]
            elements *= min(batch, vocab) / vocab
        elif _is_routed(name):
            elements *= experts_read / cfg.num_experts
        total += elements * _leaf_bytes(name, spec, opts, param_dtype)
    return total


# ----- FLOPs -----------------------------------------------------------------------------------------------

def active_matmul_params(cfg: ModelConfig) -> float:
    """A of the FLOP formula (see module docstring)."""
    total = 0.0
    for name, spec in _leaves(cfg):
        last = name.split("/")[-1]
        matrix_dims = len(spec.shape) - (spec.axes[:1] == ("layers",))  # the stacked axis is not a matmul dim
        if matrix_dims < 2 or last in ("embed", "tid2eid", "position_bias"):
            continue
        elements = float(math.prod(spec.shape))
        if _is_routed(name):
            elements *= cfg.experts_per_token / cfg.num_experts
        if name == "mtp/hidden_proj":
            elements *= cfg.residual_streams
        total += elements
    if cfg.num_mtp_layers:  # the MTP head reuses lm_head
        total += cfg.hidden_size * cfg.vocab_size
    return total


def _visible_keys(cfg: ModelConfig, layer_type: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(attended keys, indexer-scored entries) at each position (0-based)."""
    window = np.minimum(cfg.sliding_window, positions + 1).astype(np.float64)
    if layer_type == SLIDING:
        return window, np.zeros_like(window)
    entries = np.floor((positions + 1) / cfg.compress_ratio(layer_type))
    if layer_type == HCA:
        return window + entries, np.zeros_like(window)
    return window + np.minimum(cfg.indexer_topk, entries), entries


def attention_flops(cfg: ModelConfig, positions: np.ndarray) -> float:
    """Mean attention FLOPs per token over `positions` for all layers (+ the MTP block, sliding)."""
    types = list(cfg.layer_types) + [SLIDING] * cfg.num_mtp_layers
    flops = 0.0
    for layer_type in types:
        keys, scored = _visible_keys(cfg, layer_type, positions)
        flops += 4.0 * cfg.num_heads * cfg.head_dim * keys.mean()
        flops += 2.0 * cfg.indexer_heads * (cfg.indexer_head_dim + 1) * scored.mean()
    return flops


def flops_per_token(cfg: ModelConfig, opts: PlanOptions = PlanOptions()) -> dict[str, float]:
    if opts.mode == "train":
        positions = np.arange(opts.seq_len)
    else:
        positions = np.array([(opts.context or opts.seq_len) - 1])
    matmul = 2.0 * active_matmul_params(cfg)
    attention = attention_flops(cfg, positions)
    forward = matmul + attention
    out = {"active_matmul_params": matmul / 2, "forward_matmul": matmul, "forward_attention": attention,
           "forward": forward}
    if opts.mode == "train":
        out["model"] = 3.0 * forward  # forward + backward (2x)
        out["hardware"] = out["model"] + (forward if opts.remat == "full" else 0.0)
    else:
        out["model"] = out["hardware"] = forward
    return out


# ----- activations, KV cache -------------------------------------------------------------------------------

def layer_activation_bytes(cfg: ModelConfig, layer_type: str, tensor: int, compute_bytes: float) -> float:
    """Bytes one layer keeps per token for its backward (no remat), tensor-split dims divided by `tensor`.

    compute dtype: attention input, query latent, q and attention output (H/t x c each), kv, group latents,
    outputs; MoE input, K dispatched + K returned rows of D, gate/up/activation of the K routed and the shared
    expert (I/t each). float32: mHC streams read by both sub-blocks (n x D twice), router affinities (E),
    compressor kv/gate projections (CSA 2 x 2c, HCA 2 x c), indexer queries (H_I/t x c_I) and its keys."""
    d, n, h, c = cfg.hidden_size, cfg.residual_streams, cfg.num_heads, cfg.head_dim
    i, k = cfg.expert_hidden_dim, cfg.experts_per_token
    half = (d + cfg.query_latent_dim + 2 * h * c / tensor + c
            + cfg.output_groups * cfg.output_group_latent_dim / tensor + d)
    half += d + 2 * k * d + 3 * (k + 1) * i / tensor
    f32 = 2 * n * d * 2 + cfg.num_experts
    if layer_type == CSA:
        f32 += 4 * c + cfg.indexer_heads * cfg.indexer_head_dim / tensor + 4 * cfg.indexer_head_dim
    elif layer_type == HCA:
        f32 += 2 * c
    return half * compute_bytes + f32 * 4.0


def activation_memory(cfg: ModelConfig, mesh: dict[str, int], rules=None, opts: PlanOptions = PlanOptions()
                      ) -> dict[str, float]:
    from deepmoe.sharding import ShardingRules, axis_product

    rules = rules or ShardingRules()
    c = DTYPE_BYTES[opts.compute_dtype]
    tensor = axis_product(mesh, rules.mesh_axes("heads"))
    vocab_split = axis_product(mesh, rules.mesh_axes("vocab"))
    seqs = sequences_per_device(mesh, rules, opts)
    types = list(cfg.layer_types) + [SLIDING] * cfg.num_mtp_layers
    per_layer = [layer_activation_bytes(cfg, t, tensor, c) for t in types]
    if opts.mode == "train":
        tokens = seqs * opts.seq_len
        streams = len(types) * cfg.residual_streams * cfg.hidden_size * c
        kept = streams + (max(per_layer) if opts.remat == "full" else sum(per_layer))
        heads = 1 + cfg.num_mtp_layers
        logits = 2 * heads * cfg.vocab_size / vocab_split * 4.0  # logits and their gradient, float32
        return {"tokens": tokens, "layers": tokens * kept, "logits": tokens * logits,
                "total": tokens * (kept + logits)}
    tokens = seqs * opts.seq_len  # one prefill chunk of seq_len tokens per sequence; layers run one at a time
    work = tokens * max(per_layer) + seqs * cfg.vocab_size / vocab_split * 4.0
    return {"tokens": tokens, "layers": work, "logits": seqs * cfg.vocab_size / vocab_split * 4.0, "total": work}


def sequences_per_device(mesh: dict[str, int], rules, opts: PlanOptions) -> float:
    from deepmoe.sharding import axis_product

    shards = axis_product(mesh, rules.mesh_axes("batch"))
    batch = opts.global_batch or shards
    return batch / shards


def kv_cache(cfg: ModelConfig, mesh: dict[str, int], rules=None, opts: PlanOptions = PlanOptions()
             ) -> dict[str, float]:
    from deepmoe.infer.accounting import layout_accounting
    from deepmoe.sharding import ShardingRules

    rules = rules or ShardingRules()
    context = opts.context or opts.seq_len
    release = layout_accounting(cfg, "fp8")
    ours = layout_accounting(cfg, "ours")
    chosen = release if opts.kv_layout == "fp8" else ours
    per_sequence = chosen["bytes_per_token"] * context + chosen["fixed_bytes"]
    seqs = sequences_per_device(mesh, rules, opts)
    return {"bytes_per_token_fp8": release["bytes_per_token"], "bytes_per_token_ours": ours["bytes_per_token"],
            "per_sequence": per_sequence, "per_device": per_sequence * seqs if opts.mode == "infer" else 0.0}


# ----- communication ---------------------------------------------------------------------------------------

def communication_per_token(cfg: ModelConfig, mesh: dict[str, int], rules=None, opts: PlanOptions = PlanOptions()
                            ) -> dict[str, float]:
    from deepmoe.sharding import ShardingRules, axis_product

    rules = rules or ShardingRules()
    c = DTYPE_BYTES[opts.compute_dtype]
    layers = cfg.num_layers + cfg.num_mtp_layers
    g = axis_product(mesh, rules.mesh_axes("experts"))
    t = axis_product(mesh, rules.mesh_axes("heads"))
    remote = (g - 1) / g
    ragged = 2 * cfg.experts_per_token * cfg.hidden_size * c * remote * layers
    padding = (cfg.num_experts / cfg.experts_per_token if opts.capacity_factor is None
               else min(opts.capacity_factor, cfg.num_experts / cfg.experts_per_token))
    tensor = 2 * 2 * (t - 1) / t * cfg.hidden_size * c * layers
    passes = 1.0 if opts.mode != "train" else (3.0 if opts.remat == "full" else 2.0)  # fwd (+ recompute) + bwd
    return {"expert_all_to_all_ragged": ragged * passes, "expert_all_to_all_fixed": ragged * padding * passes,
            "capacity_padding": padding, "tensor_all_reduce": tensor * passes, "passes": passes}


# ----- the plan --------------------------------------------------------------------------------------------

def plan(cfg: ModelConfig, mesh: dict[str, int] | str, device: str | Device | None = None, rules=None,
         opts: PlanOptions = PlanOptions()) -> dict[str, Any]:
    """Everything above as one dict (bytes, FLOPs), plus the fit verdict when a device is given."""
    from deepmoe.sharding import ShardingRules, check_batch, mesh_shape, parse_mesh

    mesh = mesh_shape(parse_mesh(mesh) if isinstance(mesh, str) else mesh)
    rules = rules or ShardingRules()
    if opts.global_batch is not None:
        check_batch(opts.global_batch, mesh, rules)
    memory = parameter_memory(cfg, mesh, rules, opts)
    acts = activation_memory(cfg, mesh, rules, opts)
    kv = kv_cache(cfg, mesh, rules, opts)
    memory.update(activations=acts["total"], kv_cache=kv["per_device"])
    memory["total"] = sum(memory[k] for k in ("params", "grads", "optimizer", "fsdp_gather", "activations",
                                              "kv_cache"))
    flops = flops_per_token(cfg, opts)
    devices = math.prod(mesh.values())
    seqs = sequences_per_device(mesh, rules, opts)
    result = {"mesh": mesh, "devices": devices, "options": dataclasses.asdict(opts), "memory": memory,
              "activations": acts, "kv": kv, "flops_per_token": flops,
              "communication_per_token": communication_per_token(cfg, mesh, rules, opts),
              "sequences_per_device": seqs}
    if device is not None:
        dev = DEVICES[device] if isinstance(device, str) else device
        tokens = seqs * devices * (opts.seq_len if opts.mode == "train" else 1)
        result["device"] = dataclasses.asdict(dev)
        result["fits"] = memory["total"] <= HEADROOM * dev.hbm_bytes
        result["hbm_fraction"] = memory["total"] / dev.hbm_bytes
        # the whole mesh at 100 % of peak: tokens/s and the time of one step (train) or decode token (infer)
        result["tokens_per_s_at_peak"] = devices * dev.peak_bf16_flops / flops["hardware"]
        result["step_s_at_peak"] = tokens / result["tokens_per_s_at_peak"]
    return result


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_plan(result: dict[str, Any], title: str = "") -> str:
    m, f, comm, opts = result["memory"], result["flops_per_token"], result["communication_per_token"], \
        result["options"]
    mesh = ",".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [f"plan {title} mesh {mesh} ({result['devices']} devices), mode {opts['mode']}, "
             f"seq_len {opts['seq_len']}, {result['sequences_per_device']:g} sequence(s)/device"]
    rows = [("parameters", m["params"]), ("gradients (fp32)", m["grads"]),
            (f"optimizer ({opts['optimizer']}, fp32)", m["optimizer"]), ("FSDP gather (1 layer)", m["fsdp_gather"]),
            (f"activations (remat {opts['remat']}, fused attn)", m["activations"]), ("KV cache", m["kv_cache"]),
            ("total per device", m["total"])]
    lines += ["  memory per device"] + [f"    {k:<38}{_fmt_bytes(v):>12}" for k, v in rows]
    kv = result["kv"]
    lines.append(f"  KV cache per token: {kv['bytes_per_token_fp8'] / 1e3:.2f} KB release FP8 layout, "
                 f"{kv['bytes_per_token_ours'] / 1e3:.2f} KB ours ({opts['compute_dtype']})")
    lines.append(f"  FLOPs per token: forward {f['forward'] / 1e9:.2f} G (matmul 2 x "
                 f"{f['active_matmul_params'] / 1e9:.2f} G active params + attention "
                 f"{f['forward_attention'] / 1e9:.2f} G); model {f['model'] / 1e9:.2f} G, "
                 f"hardware {f['hardware'] / 1e9:.2f} G")
    lines.append(f"  comm per token: expert all-to-all {_fmt_bytes(comm['expert_all_to_all_ragged'])} ragged / "
                 f"{_fmt_bytes(comm['expert_all_to_all_fixed'])} fixed capacity (x{comm['capacity_padding']:.2f}), "
                 f"tensor all-reduce {_fmt_bytes(comm['tensor_all_reduce'])}")
    if "device" in result:
        dev = result["device"]
        verdict = "fits" if result["fits"] else "DOES NOT FIT"
        lines.append(f"  {dev['name']}: {_fmt_bytes(dev['hbm_bytes'])} HBM, {dev['peak_bf16_flops'] / 1e12:.0f} "
                     f"TFLOP/s bf16 ({dev['source']}) -> {verdict}: {100 * result['hbm_fraction']:.1f} % of HBM "
                     f"(limit {100 * HEADROOM:.0f} %)")
        lines.append(f"  at 100 % of peak: {result['tokens_per_s_at_peak']:,.0f} tokens/s on the mesh, "
                     f"{result['step_s_at_peak']:.3g} s per {'step' if opts['mode'] == 'train' else 'decode token'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepmoe plan", description="Per-device memory, FLOPs and communication "
                                "of a model on a mesh, from abstract parameters (no allocation).")
    p.add_argument("--preset", default="v4-flash", choices=list(PRESETS), help="a preset (deepmoe info)")
    p.add_argument("--config", help="an HF config.json instead of a preset")
    p.add_argument("--mesh", default="data=1", help="e.g. data=4,expert=64,tensor=8 (axes data,fsdp,expert,tensor)")
    p.add_argument("--device", choices=sorted(DEVICES), help="check the fit on this accelerator")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--batch", type=int, help="global sequences (default: one per batch shard)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--context", type=int, help="infer: KV-cache length (default: seq-len)")
    p.add_argument("--param-dtype", choices=sorted(DTYPE_BYTES), help="default float32 (train) / bfloat16 (infer)")
    p.add_argument("--expert-dtype", choices=sorted(DTYPE_BYTES), help="routed experts (release: float4)")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    p.add_argument("--remat", choices=("full", "none"), default="full")
    p.add_argument("--capacity-factor", type=float, help="ep_all_to_all capacity (default: dropless)")
    p.add_argument("--kv-layout", choices=("fp8", "ours"), default="fp8")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from deepmoe.sharding import ShardingError

    args = build_parser().parse_args(argv)
    cfg = ModelConfig.from_hf(args.config) if args.config else preset(args.preset)
    opts = PlanOptions(mode=args.mode, global_batch=args.batch, seq_len=args.seq_len, context=args.context,
                       param_dtype=args.param_dtype, expert_dtype=args.expert_dtype,
                       compute_dtype=args.compute_dtype, optimizer=args.optimizer, remat=args.remat,
                       capacity_factor=args.capacity_factor, kv_layout=args.kv_layout)
    try:
        result = plan(cfg, args.mesh, args.device, opts=opts)
    except ShardingError as error:
        print(f"deepmoe plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=float) if args.json
          else format_plan(result, args.config or args.preset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
