"""Inference: compressed KV caches, prefill + cached decode, sampling, MTP speculative decoding, generation,
cache byte accounting and the `deepmoe generate` command.

    logits, cache = prefill(params, cfg, prompt_ids, lengths, max_len)     # right-padded [B, T]
    logits, cache = decode_step(params, cfg, cache, token)                  # [B] -> [B, V]; cache donated
    tokens, lengths = generate(params, cfg, prompt_ids, max_new_tokens=32, temperature=0.0)
    table = cache_accounting(cfg)                                           # bytes per token, fixed state
"""

from deepmoe.infer.accounting import cache_accounting, format_accounting
from deepmoe.infer.cache import DecodeCache, cache_axes, cache_shapes, init_cache, shard_cache
from deepmoe.infer.decode import InferenceError, decode_step, prefill
from deepmoe.infer.generate import GenerateResult, generate, pad_prompts
from deepmoe.infer.sampling import filter_logits, sample, sampling_params

__all__ = ["DecodeCache", "GenerateResult", "InferenceError", "cache_accounting", "cache_axes", "cache_shapes",
           "decode_step", "filter_logits", "format_accounting", "generate", "init_cache", "pad_prompts", "prefill",
           "sample", "sampling_params", "shard_cache"]
