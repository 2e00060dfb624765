"""Training data: local text/code files -> byte tokens -> packed fixed-length rows with document segment ids.

Token scheme (`ByteTokenizer`), fixed so checkpoints and samples agree:

    0 = BOS (cfg.bos_token_id)   1 = EOS (cfg.eos_token_id)   2 = PAD   3 + b = byte b (0..255)

so a byte model needs vocab_size >= 259 (the tiny/small presets have 512; ids 259.. are never produced).
Every file is one document `[BOS] bytes [EOS]`. Documents are split train / validation by a seeded
permutation of the file list (a single-file corpus is split by position instead). Each epoch, the train
documents are shuffled (seed, epoch), concatenated and cut into rows of `seq_len` tokens (documents continue
across row ends: a continuation starts a new segment, its positions restart at 0, and the tail that doesn't
fill a row is dropped); the rows are shuffled too, and consumed `batch_size`
at a time. Inside a row the segment id counts documents from 1, so attention, compression and the loss never
cross a document boundary. The read position is a small `DataState` (epoch, batch index) stored in every
checkpoint, so `--resume` continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


class DataError(ValueError):
    """A data path is missing / unreadable, the corpus is empty or too small, or a resume state doesn't fit."""


# ----- tokenizer -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Byte-level tokenizer: 3 special ids then the 256 byte values (see module docstring)."""

    bos_id: int = 0
    eos_id: int = 1
    pad_id: int = 2
    offset: int = 3  # id of byte 0

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    @classmethod
    def for_config(cls, cfg) -> "ByteTokenizer":
        tok = cls()
        if (cfg.bos_token_id, cfg.eos_token_id) != (tok.bos_id, tok.eos_id):
            raise DataError(f"the byte tokenizer uses bos=0, eos=1 but the model config has bos="
                            f"{cfg.bos_token_id}, eos={cfg.eos_token_id}; set bos_token_id=0, eos_token_id=1")
        if cfg.vocab_size < tok.vocab_size:
            raise DataError(f"the byte tokenizer needs vocab_size >= {tok.vocab_size}, the model has "
                            f"{cfg.vocab_size}")
        return tok

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """str (utf-8) or bytes -> int32 ids [N]."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, np.uint8).astype(np.int32) + self.offset
        parts = ([np.array([self.bos_id], np.int32)] if bos else []) + [ids] + (
            [np.array([self.eos_id], np.int32)] if eos else [])
        return np.concatenate(parts)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """ids -> text; special and out-of-range ids are dropped, invalid utf-8 is replaced."""
        ids = np.asarray(ids).reshape(-1)
        keep = ids[(ids >= self.offset) & (ids < self.offset + 256)]
        return (keep - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def is_byte(self, ids):
        """Mask of ids that stand for one byte (for bits-per-byte): works on numpy and jax arrays."""
        return (ids >= self.offset) & (ids < self.offset + 256)


# ----- corpus files ----------------------------------------------------------------------------------------

_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git", ".hg", ".svn", "node_modules"}


def default_corpus_files() -> list[Path]:
    """The running interpreter's Python standard library sources (*.py, without site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _walk(root, "*.py")


def _walk(root: Path, pattern: str) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.match(pattern) and path.is_file():
                found.append(path)
    return found


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def resolve_files(spec: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """Files named by `spec`: a file, a directory (every text file below it, hidden and cache dirs skipped),
    a glob pattern (`**` recursive), or a list of these. None -> the default corpus (Python stdlib)."""
    if spec is None:
        files = default_corpus_files()
        if not files:
            raise DataError(f"no *.py files found in the Python stdlib at {sysconfig.get_paths()['stdlib']}; "
                            "pass --data")
        return files
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise DataError("empty list of data paths")
    files: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise DataError(f"data glob {text!r} matches no files")
            files.extend(matches)
            continue
        path = Path(text).expanduser()
        if path.is_dir():
            below = [p for p in _walk(path, "*") if not _looks_binary(p)]
            if not below:
                raise DataError(f"data directory {str(path)!r} contains no text files")
            files.extend(below)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"data path {str(path)!r} does not exist")
    seen: set[Path] = set()
    unique = [p for p in files if not (p.resolve() in seen or seen.add(p.resolve()))]
    return unique


# ----- packing ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataState:
    """Read position: `batch` batches of `epoch` have been consumed."""

    epoch: int = 0
    batch: int = 0

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_json(cls, obj: dict) -> "DataState":
        return cls(epoch=int(obj["epoch"]), batch=int(obj["batch"]))


@dataclasses.dataclass
class _Packed:
    tokens: np.ndarray  # [N] uint16 concatenated documents
    starts: np.ndarray  # [num_docs] start offset of each document in `tokens`

    def rows(self, row_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
        offsets = row_ids[:, None] * seq_len + np.arange(seq_len)[None, :]  # [B, T]
        doc = np.searchsorted(self.starts, offsets, side="right") - 1  # document of each token
        segment = doc - doc[:, :1] + 1
        return {"input_ids": self.tokens[offsets].astype(np.int32), "segment_ids": segment.astype(np.int32)}


def _pack(docs: Sequence[np.ndarray], order: Sequence[int]) -> _Packed:
    lengths = np.array([len(docs[i]) for i in order], np.int64)
    tokens = np.concatenate([docs[i] for i in order]) if len(order) else np.zeros(0, np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return _Packed(tokens, starts)


class TextDataset:
    """Packed byte-token batches from local files (see module docstring). Deterministic given the file list,
    `seed`, `seq_len` and `batch_size`; `batch(state)` is a pure function of the state."""

    def __init__(self, files: Sequence[Path], *, seq_len: int, batch_size: int, seed: int = 0,
                 val_fraction: float = 0.05, tokenizer: ByteTokenizer | None = None):
        if seq_len < 2 or batch_size < 1:
            raise DataError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        self.tokenizer = tokenizer or ByteTokenizer()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.files = list(files)
        docs, sizes = [], []
        for path in self.files:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise DataError(f"cannot read data file {str(path)!r}: {e}") from e
            sizes.append(len(data))
            if data:
                docs.append(self._document(data))
        if not docs:
            raise DataError(f"the corpus is empty: {len(self.files)} file(s), all empty "
                            f"(first: {str(self.files[0]) if self.files else 'none'!r})")
        self.num_bytes = int(sum(sizes))
        self.train_docs, self.val_docs = self._split(docs, val_fraction)
        self.fingerprint = self._fingerprint(sizes, val_fraction)
        self._epoch_cache: tuple[int, _Packed, np.ndarray] | None = None
        train_tokens = sum(len(d) for d in self.train_docs)
        if train_tokens // seq_len < batch_size:
            raise DataError(f"the corpus is too small: {train_tokens} training tokens make fewer than "
                            f"batch_size={batch_size} rows of seq_len={seq_len} (files: {len(self.files)})")
        self.val = _pack(self.val_docs, range(len(self.val_docs)))

    @classmethod
    def from_paths(cls, spec=None, **kwargs) -> "TextDataset":
        return cls(resolve_files(spec), **kwargs)

    def _document(self, data: bytes) -> np.ndarray:
        tok = self.tokenizer
        body = np.frombuffer(data, np.uint8).astype(np.uint16) + tok.offset
        return np.concatenate([np.array([tok.bos_id], np.uint16), body, np.array([tok.eos_id], np.uint16)])

    def _split(self, docs: list[np.ndarray], val_fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if val_fraction <= 0:
            return docs, []
        if len(docs) >= 2:
            order = np.random.default_rng([self.seed, 0x5EED]).permutation(len(docs))
            n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
            return [docs[i] for i in sorted(order[n_val:])], [docs[i] for i in sorted(order[:n_val])]
        # One document: the tail becomes validation (its own BOS/EOS framing).
        doc = docs[0][1:-1]
        cut = int(len(doc) * (1 - val_fraction))
        head, tail = doc[:cut], doc[cut:]
        wrap = lambda x: self._document((x - self.tokenizer.offset).astype(np.uint8).tobytes())  # noqa: E731
        return [wrap(head)], ([wrap(tail)] if len(tail) else [])

    def _fingerprint(self, sizes: list[int], val_fraction: float) -> str:
        h = hashlib.sha1()
        common = os.path.commonpath([str(Path(p).resolve()) for p in self.files]) if self.files else ""
        for path, size in zip(self.files, sizes):
            h.update(f"{os.path.relpath(Path(path).resolve(), common)}:{size};".encode())
        h.update(f"seed={self.seed};seq={self.seq_len};batch={self.batch_size};val={val_fraction}".encode())
        return h.hexdigest()[:16]

    # ----- train batches ---------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[_Packed, np.ndarray]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            packed = _pack(self.train_docs, rng.permutation(len(self.train_docs)))
            n_rows = len(packed.tokens) // self.seq_len
            self._epoch_cache = (epoch, packed, rng.permutation(n_rows))
        return self._epoch_cache[1:]

    @property
    def batches_per_epoch(self) -> int:
        _, rows = self._epoch(0)
        return len(rows) // self.batch_size

    def batch(self, state: DataState) -> tuple[dict[str, np.ndarray], DataState]:
        """The batch at `state` and the state after it: {"input_ids", "segment_ids"} int32 [B, T]."""
        packed, rows = self._epoch(state.epoch)
        if (state.batch + 1) * self.batch_size > len(rows):
            state = DataState(state.epoch + 1, 0)
            packed, rows = self._epoch(state.epoch)
        ids = rows[state.batch * self.batch_size:(state.batch + 1) * self.batch_size]
        return packed.rows(ids, self.seq_len), DataState(state.epoch, state.batch + 1)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        state = DataState()
        while True:
            batch, state = self.batch(state)
            yield batch

    # ----- validation ------------------------------------------------------------------------------------
    @property
    def num_val_rows(self) -> int:
        return len(self.val.tokens) // self.seq_len

    def val_batches(self, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
        """Fixed validation batches (same every call): consecutive rows of the held-out documents."""
        n = self.num_val_rows // self.batch_size
        if max_batches is not None:
            n = min(n, max_batches)
        return [self.val.rows(np.arange(i * self.batch_size, (i + 1) * self.batch_size), self.seq_len)
                for i in range(n)]

    def check_state(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise DataError("the data set differs from the one the checkpoint was trained on (file list/sizes, "
                            "seed, seq_len, batch_size or val_fraction changed: fingerprint "
                            f"{fingerprint} != {self.fingerprint}); resume with the same --data and settings")
