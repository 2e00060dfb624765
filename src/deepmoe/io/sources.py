"""An HF-named, dequantized view over any checkpoint directory: HF layout or the official release layout,
plain or FP8 / MXFP4 quantized. `params_from_reader` reads through it one tensor at a time."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from deepmoe.io.official_names import EXPERT, hf_expert_prefix, is_official_layout, official_to_hf
from deepmoe.io.quant import dequantize
from deepmoe.io.safetensors_io import CheckpointError, CheckpointReader


def _scale_name(reader: CheckpointReader, name: str) -> str | None:
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    for candidate in (f"{base}.scale", f"{name}_scale_inv", f"{base}.weight_scale_inv", f"{name}.scale"):
        if candidate in reader:
            return candidate
    return None


class TensorSource:
    """keys() are HF names; get(name) returns the dequantized tensor. `consumed(name)` lists the raw tensors
    (weights and scales) behind an HF name, for the strict unexpected-tensor check."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        raw = reader.keys()
        self.official = is_official_layout(raw)
        self._raw_of: dict[str, list[str]] = {}
        self._experts: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
        scales = {s for n in raw if (s := _scale_name(reader, n)) is not None and s != n}
        for name in raw:
            if name in scales:
                continue
            expert = EXPERT.match(name) if self.official else None
            if expert:
                self._experts[hf_expert_prefix(expert.group(1))][expert.group(3)][int(expert.group(2))] = name
                continue
            hf = official_to_hf(name) if self.official else name
            self._raw_of[hf if hf is not None else name] = [name]
        for prefix, by_matrix in self._experts.items():
            self._raw_of[f"{prefix}mlp.experts.gate_up_proj"] = [*by_matrix["w1"].values(), *by_matrix["w3"].values()]
            self._raw_of[f"{prefix}mlp.experts.down_proj"] = list(by_matrix["w2"].values())

    def keys(self) -> list[str]:
        return list(self._raw_of)

    def __contains__(self, name: str) -> bool:
        return name in self._raw_of

    def consumed(self, name: str) -> list[str]:
        names = list(self._raw_of[name])
        return names + [s for n in names if (s := _scale_name(self.reader, n)) is not None]

    def _read(self, raw_name: str) -> np.ndarray:
        weight = self.reader.get(raw_name)
        scale_name = _scale_name(self.reader, raw_name)
        return dequantize(weight, self.reader.get(scale_name) if scale_name else None, raw_name)

    def _stack_experts(self, prefix: str, matrices: tuple[str, ...], name: str) -> np.ndarray:
        by_matrix = self._experts[prefix]
        count = max(len(by_matrix[m]) for m in matrices)
        for m in matrices:
            missing = sorted(set(range(count)) - set(by_matrix[m]))
            if missing:
                raise CheckpointError(f"checkpoint is missing tensor '{prefix.removeprefix('model.')}"
                                      f"ffn.experts.{missing[0]}.{m}.weight' (needed for {name!r})")
        rows = [np.concatenate([self._read(by_matrix[m][e]) for m in matrices], axis=0) for e in range(count)]
        return np.stack(rows)

    def get(self, name: str) -> np.ndarray:
        if name not in self._raw_of:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        if self.official and name.endswith("mlp.experts.gate_up_proj"):
            return self._stack_experts(name[: -len("mlp.experts.gate_up_proj")], ("w1", "w3"), name)
        if self.official and name.endswith("mlp.experts.down_proj"):
            return self._stack_experts(name[: -len("mlp.experts.down_proj")], ("w2",), name)
        return self._read(self._raw_of[name][0])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.get(name).shape)
