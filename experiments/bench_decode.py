"""Prefill and decode throughput: deepmoe's cached decoding vs transformers' `generate`, same config, same
random weights, same process.

    python experiments/bench_decode.py                 # preset small, fp32, batch 1, 128-token prompt, 64 new
    python experiments/bench_decode.py --quick         # tiny, short: a smoke run
    python experiments/bench_decode.py --speculative   # also MTP self-speculative decoding (acceptance rate)

Both sides decode greedily with no stop token, so each produces exactly --new-tokens tokens; the tokens are
compared as a sanity check. deepmoe is timed after a warm-up run (compilation excluded, reported separately);
transformers runs eagerly (its DeepSeek-V4 attention is eager-only). Prefill tokens/s = prompt tokens /
prefill time; decode tokens/s = tokens generated after the first / the rest of the time. Results: printed and
written to runs/bench_decode/<preset>-<dtype>-b<batch>[-gather].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import zlib
import tempfile
import time
from pathlib import Path

import numpy as np


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of both sides (transformers on CPU is fastest in float32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (the median is reported)")
    p.add_argument("--speculative", action="store_true", help="also time MTP self-speculative decoding")
    p.add_argument("--quick", action="store_true", help="tiny preset, 32-token prompt, 16 new tokens, 1 repeat")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice; on a busy machine 1 is often "
                        "much faster because idle workers spin)")
    p.add_argument("--gather", action="store_true",
                   help="register deepmoe.infer.expert_gather as moe_dispatch strategy 'gather' for this process "
                        "(until moe_dispatch ships it), so cached decode steps gather their tokens' experts")
    p.add_argument("--out", default="runs/bench_decode")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.prompt_len, args.new_tokens, args.repeats = "tiny", 32, 16, 1
    return args


def _median(xs):
    return statistics.median(xs)


def bench_ours(params, cfg, prompt, new_tokens, repeats, speculative=False):
    from deepmoe.infer import generate
    from deepmoe.params import unstack_layers

    params = unstack_layers(params, cfg)  # per-layer weights, converted once (generate would copy every call)
    t0 = time.perf_counter()
    warm = generate(params, cfg, prompt, new_tokens, stop_tokens=(), speculative=speculative)
    compile_s = time.perf_counter() - t0
    runs = [generate(params, cfg, prompt, new_tokens, stop_tokens=(), speculative=speculative)
            for _ in range(repeats)]
    prefill = _median([r.stats["prefill_s"] for r in runs])
    decode = _median([r.stats["decode_s"] for r in runs])
    result = {
        "first_call_s": compile_s, "prefill_s": prefill, "decode_s": decode,
        "prefill_tokens_per_s": prompt.size / prefill,
        "decode_tokens_per_s": prompt.shape[0] * (new_tokens - 1) / decode,
        "tokens": warm.tokens,
    }
    if speculative:
        result["acceptance_rate"] = runs[-1].stats["acceptance_rate"]
    return result


def bench_transformers(model, prompt, new_tokens, repeats):
    import torch

    ids = torch.as_tensor(prompt, dtype=torch.long)
    prefills, totals, out = [], [], None
    with torch.no_grad():
        model(input_ids=ids, use_cache=True)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            prefills.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
            totals.append(time.perf_counter() - t0)
    prefill, total = _median(prefills), _median(totals)
    return {
        "prefill_s": prefill, "decode_s": total - prefill,
        "prefill_tokens_per_s": prompt.size / prefill,
        "decode_tokens_per_s": prompt.shape[0] * (new_tokens - 1) / max(total - prefill, 1e-9),
        "tokens": out[:, prompt.shape[1]:].numpy(),
    }


def main(argv=None) -> int:
    args = _parse(argv)
    from deepmoe.backend.host_memory import keep_host_buffers

    keep_host_buffers()  # as `deepmoe bench` does, before JAX starts
    import jax
    import torch
    from transformers import DeepseekV4ForCausalLM

    import deepmoe as dm

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.gather:
        import deepmoe.moe_dispatch as md
        from deepmoe.infer import expert_gather

        if "gather" not in md.STRATEGIES:
            md.STRATEGIES["gather"] = expert_gather.run
            md.NAMES = (*md.NAMES, "gather")
    cfg = dm.preset(args.preset).replace(compute_dtype=args.dtype)
    params = dm.init_params(cfg, jax.random.key(0))
    # non-trivial sinks / biases (init_params zeroes them, like transformers)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * jax.random.normal(jax.random.key(zlib.crc32(str(path).encode())), x.shape, x.dtype)
        if str(path[-1]).strip("[]'") in ("sinks", "position_bias", "base", "router_bias") else x, params)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)

    with tempfile.TemporaryDirectory() as tmp:
        dm.save_pretrained(tmp, params, cfg)
        torch_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
        model = DeepseekV4ForCausalLM.from_pretrained(tmp, torch_dtype=torch_dtype).eval()
    model.config._attn_implementation = "eager"

    ours = bench_ours(params, cfg, prompt, args.new_tokens, args.repeats)
    theirs = bench_transformers(model, prompt, args.new_tokens, args.repeats)
    report = {
        "preset": args.preset, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "repeats": args.repeats,
        "decode_moe": "gather" if args.gather else "auto (moe_dispatch's platform default)",
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
        "deepmoe": {k: v for k, v in ours.items() if k != "tokens"},
        "transformers": {k: v for k, v in theirs.items() if k != "tokens"},
        "prefill_speedup": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
        "decode_speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
        "tokens_match": bool(np.array_equal(ours["tokens"], theirs["tokens"])),
        "matching_prefix": int(np.argmax(np.concatenate([(ours["tokens"] != theirs["tokens"]).any(0), [True]]))),
    }
    if args.speculative and cfg.num_mtp_layers:
        spec = bench_ours(params, cfg, prompt, args.new_tokens, args.repeats, speculative=True)
        report["deepmoe_speculative"] = {k: v for k, v in spec.items() if k != "tokens"}
        report["speculative_tokens_match_greedy"] = bool(np.array_equal(spec["tokens"], ours["tokens"]))

    print(f"{args.preset} {args.dtype} batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens "
          f"on {report['device']} ({os.cpu_count()} CPUs), decode MoE: {report['decode_moe']}")
    print(f"{'':<22}{'prefill tok/s':>16}{'decode tok/s':>16}")
    for name, r in (("deepmoe", ours), ("transformers", theirs), ("deepmoe speculative", report.get(
            "deepmoe_speculative"))):
        if r:
            print(f"{name:<22}{r['prefill_tokens_per_s']:>16.1f}{r['decode_tokens_per_s']:>16.1f}")
    print(f"speedup (deepmoe / transformers): prefill {report['prefill_speedup']:.2f}x, decode "
          f"{report['decode_speedup']:.2f}x; greedy tokens match: {report['tokens_match']} "
          f"(first {report['matching_prefix']} identical)")
    if "deepmoe_speculative" in report:
        print(f"speculative: acceptance rate {report['deepmoe_speculative']['acceptance_rate']:.3f} (random "
              f"weights: the MTP module is untrained), output identical to greedy: "
              f"{report['speculative_tokens_match_greedy']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.preset}-{args.dtype}-b{args.batch}{'-gather' if args.gather else ''}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
