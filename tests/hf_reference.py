"""Build a random transformers DeepseekV4ForCausalLM for a deepmoe config (spec §13), as the parity oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_hf_model(cfg, seed: int = 1):
    """A float32 eager HF model whose zero-initialised parts (sinks, biases, hc base, tid2eid) are re-randomised."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    hf = cfg.to_hf()
    hf["num_nextn_predict_layers"] = 0
    hf_cfg = DeepseekV4Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(hf_cfg).eval().float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("hc_scale") or name.endswith(".scale"):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                std = 0.5 if name.endswith(("sinks", "position_bias", "base")) else 0.05
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            if name.endswith("tid2eid"):
                rows = [torch.randperm(cfg.num_experts, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]
                b.copy_(torch.stack(rows))
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits.float().numpy()


def save_hf_checkpoint(model, directory: Path) -> Path:
    """`model.state_dict()` in one safetensors file + config.json, the layout of spec §13."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    model.config.save_pretrained(str(directory))
    return directory
