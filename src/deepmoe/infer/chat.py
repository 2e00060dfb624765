"""Prompt codecs for `deepmoe generate`: the checkpoint's tokenizer with the chat template, or raw bytes.

With a `tokenizer.json` next to the checkpoint (a release checkpoint), prompts go through the DeepSeek chat
template of `deepmoe.io.tokenizer` (the one place it is written): `--mode fast` = non-thinking, `--mode expert` =
thinking, in the V3.1 / V3.2 encoding the V4 release continues (encoding_dsv32):

    <｜begin▁of▁sentence｜><｜User｜>{prompt}<｜Assistant｜></think>      fast   (thinking off)
    <｜begin▁of▁sentence｜><｜User｜>{prompt}<｜Assistant｜><think>       expert (thinking on)

Without one (our byte-level models, `deepmoe.train.data.ByteTokenizer`: 0 BOS, 1 EOS, 2 PAD, 3 + byte) the
prompt is encoded as raw bytes after BOS, and the mode only prints a note.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol

import numpy as np

from deepmoe.io.tokenizer import MODES, HFTokenizer, chat_prompt

__all__ = ["MODES", "ByteCodec", "HFTokenizerCodec", "TextCodec", "codec_for"]


class TextCodec(Protocol):
    def encode_prompt(self, prompt: str, mode: str | None) -> np.ndarray: ...

    def stream_decoder(self): ...  # -> callable(ids) -> text to print


class ByteCodec:
    """Byte-level ids of `deepmoe.train.data.ByteTokenizer`."""

    def __init__(self, cfg):
        from deepmoe.train.data import ByteTokenizer

        self.tokenizer = ByteTokenizer.for_config(cfg)

    def encode_prompt(self, prompt: str, mode: str | None) -> np.ndarray:
        return self.tokenizer.encode(prompt, bos=True)

    def stream_decoder(self):
        tok = self.tokenizer
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def feed(ids) -> str:
            ids = np.asarray(ids).reshape(-1)
            data = (ids[tok.is_byte(ids)] - tok.offset).astype(np.uint8).tobytes()
            return decoder.decode(data)

        return feed


class HFTokenizerCodec:
    """A `tokenizer.json` (HF tokenizers library) with the chat template."""

    def __init__(self, path: Path):
        self.tokenizer = HFTokenizer(path).tokenizer  # the `tokenizers.Tokenizer`

    def encode_prompt(self, prompt: str, mode: str | None) -> np.ndarray:
        # The template writes BOS itself; a raw prompt gets the tokenizer's own special tokens.
        text = chat_prompt([{"role": "user", "content": prompt}], mode) if mode else prompt
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=mode is None).ids, np.int32)

    def stream_decoder(self):
        seen: list[int] = []
        printed = [""]

        def feed(ids) -> str:
            seen.extend(int(i) for i in np.asarray(ids).reshape(-1))
            text = self.tokenizer.decode(seen)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more tokens
                return ""
            new, printed[0] = text[len(printed[0]):], text
            return new

        return feed


def codec_for(cfg, checkpoint: str | None) -> tuple[TextCodec, bool]:
    """-> (codec, whether it has a chat template). A checkpoint dir with tokenizer.json gets the HF tokenizer."""
    if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").is_file():
        return HFTokenizerCodec(Path(checkpoint) / "tokenizer.json"), True
    return ByteCodec(cfg), False
