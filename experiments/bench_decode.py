"""Prefill and decode throughput: deepmoe's cached decoding vs transformers' `generate`, same config, same
weights, same process, timed in alternation.

    python experiments/bench_decode.py                 # preset small, fp32, batch 1, 128-token prompt, 64 new
    python experiments/bench_decode.py --quick         # tiny, short: a smoke run
    python experiments/bench_decode.py --speculative   # also MTP self-speculative decoding (acceptance rate)

The weights are deepmoe's random init with sinks and biases re-randomized (both inits zero them), saved with
`save_pretrained` and loaded by transformers, so both sides decode greedily the same model: their tokens are
compared as a sanity check. No stop token, so each side produces exactly --new-tokens tokens. transformers runs
eagerly (its DeepSeek-V4 attention is eager-only).

Timing as `deepmoe bench`: each side's generate of one token (the prefill) and of --new-tokens tokens run round
after round in alternation with the other side's (`deepmoe.bench.interleaved_times`), so a busy spell of a shared
machine falls on both; a round's decode step is its generate less the median prefill, over the tokens after the
first (`deepmoe.bench.decode_step_seconds`). Speedups are the median over rounds of transformers' time / ours in
the same round, printed with the rounds' range. Writes results.json (every round's times) and decode.png.
"""

from __future__ import annotations

import sys
import tempfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from deepmoe import experiment as ex

NAME = "bench_decode"
# quick: 128 new tokens. `tiny` decodes a token in ~0.1 ms, and 16 of them once took no longer than the median
# prefill on a busy host (14 ms): the decode is then unresolved (bench.decode_step_seconds)
QUICK = dict(preset="tiny", prompt_len=32, new_tokens=128, rounds=2)
FULL = dict(preset="small", prompt_len=128, new_tokens=64, rounds=5)


def _parse(argv):
    p = ex.parser(__doc__, NAME, quick_help="tiny, 32-token prompt, 128 new tokens, 2 rounds")
    p.add_argument("--preset", help="model preset (default small; quick tiny)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, help="prompt tokens (default 128; quick 32)")
    p.add_argument("--new-tokens", type=int, help="tokens generated (default 64; quick 128)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of both sides (transformers on CPU is fastest in float32)")
    p.add_argument("--rounds", type=int, help="paired rounds (default 5; quick 2); the medians are reported")
    p.add_argument("--speculative", action="store_true", help="also time MTP self-speculative decoding")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice; on a busy machine 1 is often "
                        "much faster because idle workers spin)")
    args = ex.parse(p, argv, QUICK, FULL)
    for name, least in (("batch", 1), ("prompt_len", 1), ("new_tokens", 2), ("rounds", 1)):
        if getattr(args, name) < least:  # decode is a generate's time past its first token: two at least
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    return args


def _weights(cfg):
    """deepmoe's init with non-zero sinks and biases (both libraries' inits zero them: spec §13)."""
    import jax

    import deepmoe as dm

    params = dm.init_params(cfg, jax.random.key(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * jax.random.normal(jax.random.key(zlib.crc32(str(path).encode())), x.shape, x.dtype)
        if str(path[-1]).strip("[]'") in ("sinks", "position_bias", "base", "router_bias") else x, params)


def _transformers_model(params, cfg, dtype: str):
    import torch
    from transformers import DeepseekV4ForCausalLM

    import deepmoe as dm

    with tempfile.TemporaryDirectory() as tmp:
        dm.save_pretrained(tmp, params, cfg)
        model = DeepseekV4ForCausalLM.from_pretrained(
            tmp, torch_dtype=torch.float32 if dtype == "float32" else torch.bfloat16).eval()
    model.config._attn_implementation = "eager"
    return model


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    import jax
    import torch

    import deepmoe as dm
    from deepmoe import bench
    from deepmoe.bench_plot import plot_comparison
    from deepmoe.infer import generate

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg = dm.preset(args.preset).replace(compute_dtype=args.dtype)
    params = _weights(cfg)
    model = _transformers_model(params, cfg, args.dtype)
    params = dm.unstack_layers(params, cfg)  # per-layer weights, converted once (generate would copy every call)
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    ids = torch.as_tensor(prompt, dtype=torch.long)
    speculative = args.speculative and cfg.num_mtp_layers > 0
    if args.speculative and not speculative:
        print(f"--speculative: preset {args.preset} has no MTP module to draft with; timing greedy decoding only")
    last = {}  # the latest result of each of our runs: tokens, and the acceptance rate

    def ours(n, spec=False):
        def run():
            last[(n, spec)] = generate(params, cfg, prompt, n, stop_tokens=(), speculative=spec)
            jax.block_until_ready(last[(n, spec)].tokens)
        return run

    def theirs(n):
        def run():
            with torch.no_grad():
                last[("transformers", n)] = model.generate(ids, max_new_tokens=n, min_new_tokens=n,
                                                           do_sample=False, pad_token_id=0)
        return run

    runs = {"deepmoe prefill": ours(1), "deepmoe generate": ours(args.new_tokens),
            "transformers prefill": theirs(1), "transformers generate": theirs(args.new_tokens)}
    if speculative:
        runs["deepmoe speculative generate"] = ours(args.new_tokens, spec=True)
    print(f"{args.preset} {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens: "
          f"{args.rounds} rounds of {', '.join(runs)} ...", flush=True)
    times = bench.interleaved_times(runs, args.rounds)

    def decode(who, generates=None):
        return bench.decode_step_seconds(times[f"{who} prefill"], times[generates or f"{who} generate"],
                                         args.new_tokens, who)

    prompt_tokens, per_step = prompt.size, args.batch
    try:
        parts = {"prefill": (bench.timing(times["deepmoe prefill"], prompt_tokens),
                             bench.versus(times["deepmoe prefill"], times["transformers prefill"], prompt_tokens)),
                 "decode": (bench.timing(decode("deepmoe"), per_step),
                            bench.versus(decode("deepmoe"), decode("transformers"), per_step))}
        spec_steps = decode("deepmoe", "deepmoe speculative generate") if speculative else None
    except bench.UnresolvedDecode as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tokens = np.asarray(last[(args.new_tokens, False)].tokens)
    their_tokens = last[("transformers", args.new_tokens)][:, args.prompt_len:].numpy()
    differs = np.concatenate([(tokens != their_tokens).any(0), [True]])
    report = {"tokens_match": bool(np.array_equal(tokens, their_tokens)), "matching_prefix": int(np.argmax(differs))}
    print(f"{'':<22}{'prefill tok/s':>16}{'decode tok/s':>16}")
    for name, side in (("deepmoe", 0), ("transformers", 1)):
        prefill, step = parts["prefill"][side], parts["decode"][side]
        print(f"{name:<22}{prefill['tokens_per_s']:>16.1f}{step['tokens_per_s']:>16.1f}")
    if speculative:
        spec = bench.timing(spec_steps, per_step)
        spec_tokens = np.asarray(last[(args.new_tokens, True)].tokens)
        report["speculative"] = {"decode": spec, "acceptance_rate": last[(args.new_tokens, True)].stats[
            "acceptance_rate"], "tokens_match_greedy": bool(np.array_equal(spec_tokens, tokens))}
        print(f"{'deepmoe speculative':<22}{'':>16}{spec['tokens_per_s']:>16.1f}")
    for part, (_, other) in parts.items():
        each = other["speedup_each"]
        print(f"{part} speedup (deepmoe / transformers): {other['speedup']:.2f}x "
              f"(median of {len(each)} paired rounds: {min(each):.2f}-{max(each):.2f}x)")
    print(f"greedy tokens match: {report['tokens_match']} (first {report['matching_prefix']} identical)")
    if speculative:
        print(f"speculative: acceptance rate {report['speculative']['acceptance_rate']:.3f} (random weights: the "
              f"MTP module is untrained), output identical to greedy: {report['speculative']['tokens_match_greedy']}")
    out = ex.output_dir(args)
    title = (f"{args.preset} {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, "
             f"{args.new_tokens} new tokens")
    png = Path(plot_comparison(parts, title, str(out / "decode.png")))
    ex.write_results(out, NAME, args.quick, [png], preset=args.preset, dtype=args.dtype, batch=args.batch,
                     prompt_len=args.prompt_len, new_tokens=args.new_tokens, rounds=args.rounds,
                     torch_threads=torch.get_num_threads(), jax_device=str(jax.devices()[0]),
                     deepmoe={part: mine for part, (mine, _) in parts.items()},
                     transformers={part: other for part, (_, other) in parts.items()},
                     seconds_each=times, **report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
