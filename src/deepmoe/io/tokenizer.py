"""Tokenizers: the release `tokenizer.json` (through the `tokenizers` library) and the V4 chat template.

Chat modes (the release's two reasoning modes): `fast` answers directly (the assistant turn opens with a
closed think block), `expert` thinks first (the assistant turn opens with `<think>`). The template follows
the DeepSeek V3.x chat format the V4 tokenizer ships special tokens for. This is the one copy of the template:
`deepmoe generate --mode` reaches it through `deepmoe.infer.chat`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MODES = ("fast", "expert")


def chat_prompt(messages: Sequence[dict[str, str]], mode: str = "fast") -> str:
    """Render [{"role": "system"|"user"|"assistant", "content": ...}] into the prompt text that ends with the
    opening of the assistant's turn in the chosen mode."""
    if mode not in MODES:
        raise ValueError(f"unknown chat mode {mode!r}; choose one of {MODES}")
    text = BOS
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            text += content
        elif role == "user":
            text += USER + content
        elif role == "assistant":
            text += ASSISTANT + THINK_CLOSE + content + EOS
        else:
            raise ValueError(f"unknown chat role {role!r}; use system, user or assistant")
    return text + ASSISTANT + (THINK_OPEN if mode == "expert" else THINK_CLOSE)


class HFTokenizer:
    """A `tokenizer.json` (+ optional `tokenizer_config.json`) from a checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        self.tokenizer = Tokenizer.from_file(str(file))
        config_file = file.with_name("tokenizer_config.json")
        self.config = json.loads(config_file.read_text()) if config_file.exists() else {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode_chat(self, messages: Sequence[dict[str, str]], mode: str = "fast") -> list[int]:
        return self.encode(chat_prompt(messages, mode))


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer | None:
    """The checkpoint's tokenizer, or None when the directory has no tokenizer.json."""
    path = Path(path)
    return HFTokenizer(path) if (path / "tokenizer.json").exists() or path.suffix == ".json" else None
