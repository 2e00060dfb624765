"""Official DeepSeek-V4 release tensor names -> HF names (spec §10.1, §10.3).

The official layout stores each routed expert separately (`ffn.experts.E.w1/w2/w3`); HF stacks them
(`mlp.experts.gate_up_proj` [E, 2I, D] = w1 rows then w3 rows, `mlp.experts.down_proj` [E, D, I] = w2).
"""

from __future__ import annotations

import re

# Applied in order to the part of a name after `layers.N.` or `mtp.0.`.
_LAYER_RULES = [
    (r"^attn_norm\.", "input_layernorm."),
    (r"^ffn_norm\.", "post_attention_layernorm."),
    (r"^hc_(attn|ffn)_(fn|base|scale)$", r"\1_hc.\2"),
    (r"^attn\.attn_sink$", "self_attn.sinks"),
    (r"^attn\.indexer\.compressor\.", "self_attn.compressor.indexer."),
    (r"^attn\.indexer\.wq_b\.", "self_attn.compressor.indexer.q_b_proj."),
    (r"^attn\.indexer\.weights_proj\.", "self_attn.compressor.indexer.scorer.weights_proj."),
    (r"^attn\.", "self_attn."),
    (r"^ffn\.", "mlp."),
    (r"\.compressor\.(indexer\.)?wkv\.", r".compressor.\1kv_proj."),
    (r"\.compressor\.(indexer\.)?wgate\.", r".compressor.\1gate_proj."),
    (r"\.compressor\.(indexer\.)?ape$", r".compressor.\1position_bias"),
    (r"\.compressor\.(indexer\.)?norm\.", r".compressor.\1kv_norm."),
    (r"^self_attn\.wq_a\.", "self_attn.q_a_proj."),
    (r"^self_attn\.q_norm\.", "self_attn.q_a_norm."),
    (r"^self_attn\.wq_b\.", "self_attn.q_b_proj."),
    (r"^self_attn\.wkv\.", "self_attn.kv_proj."),
    (r"^self_attn\.wo_a\.", "self_attn.o_a_proj."),
    (r"^self_attn\.wo_b\.", "self_attn.o_b_proj."),
    (r"^mlp\.gate\.bias$", "mlp.gate.e_score_correction_bias"),
    (r"^mlp\.shared_experts\.w1\.", "mlp.shared_experts.gate_proj."),
    (r"^mlp\.shared_experts\.w2\.", "mlp.shared_experts.down_proj."),
    (r"^mlp\.shared_experts\.w3\.", "mlp.shared_experts.up_proj."),
]
_GLOBALS = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_MTP_GLOBALS = {"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight"}
EXPERT = re.compile(r"^(layers\.\d+\.|mtp\.0\.)ffn\.experts\.(\d+)\.(w[123])\.weight$")


def is_official_layout(names: list[str]) -> bool:
    return "embed.weight" in names or any(n.startswith("layers.") for n in names)


def _rename_layer_part(rest: str) -> str:
    for pattern, replacement in _LAYER_RULES:
        rest = re.sub(pattern, replacement, rest)
    return rest


def official_to_hf(name: str) -> str | None:
    """HF name of a non-expert official tensor (None for names with no HF counterpart)."""
    if name in _GLOBALS:
        return _GLOBALS[name]
    match = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if match:
        return f"model.layers.{match.group(1)}.{_rename_layer_part(match.group(2))}"
    if name.startswith("mtp.0."):
        rest = name[len("mtp.0."):]
        if rest in _MTP_GLOBALS:
            return name
        hc_head = re.match(r"^hc_head_(fn|base|scale)$", rest)
        if hc_head:
            return f"mtp.0.hc_head.hc_{hc_head.group(1)}"
        return "mtp.0." + _rename_layer_part(rest)
    return None


def hf_expert_prefix(official_prefix: str) -> str:
    """`layers.3.` -> `model.layers.3.`; `mtp.0.` stays."""
    return official_prefix if official_prefix.startswith("mtp.") else "model." + official_prefix
