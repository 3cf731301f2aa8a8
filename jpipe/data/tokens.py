"""The token folder format: `tokens.bin` (flat token ids) described by `tokens.json` (`TokenMeta`)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

BIN_NAME = "tokens.bin"
META_NAME = "tokens.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT = "jpipe-tokens-1"
DTYPES = ("uint16", "uint32")


class DataError(ValueError):
    """Data that cannot be used as asked; the message names the path, what was expected and what was found."""


def dtype_for(vocab_size: int) -> str:
    """The smallest token dtype holding ids `0 .. vocab_size - 1`: uint16 up to 65,536, else uint32."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


@dataclasses.dataclass(frozen=True)
class TokenMeta:
    """What a token folder's `tokens.bin` holds.

    Attributes:
      vocab_size: token ids are `0 .. vocab_size - 1`; the model's vocabulary.
      dtype: "uint16" or "uint32", the ids' storage type (no header, native little-endian).
      eod_id: the end-of-document token written after every document.
      num_tokens: ids in `tokens.bin` (its size is `num_tokens x` the dtype's bytes).
      num_documents: documents (= end-of-document tokens) in it.
      tokenizer: the tokenizer's file name in the folder, or "" when none was stored.
      eod_token: the end-of-document token's text (e.g. "<|endoftext|>").
      format: the format's version, `FORMAT`.
    """

    vocab_size: int
    dtype: str
    eod_id: int
    num_tokens: int
    num_documents: int
    tokenizer: str = TOKENIZER_NAME
    eod_token: str = ""
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise DataError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 1 <= self.vocab_size <= np.iinfo(self.dtype).max + 1:
            raise DataError(
                f"vocab_size: expected 1 to {np.iinfo(self.dtype).max + 1} for {self.dtype}, got {self.vocab_size}"
            )
        if not 0 <= self.eod_id < self.vocab_size:
            raise DataError(f"eod_id: expected 0 to {self.vocab_size - 1}, got {self.eod_id}")

    def write(self, folder: pathlib.Path) -> None:
        (folder / META_NAME).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")


def is_token_folder(path: pathlib.Path | str) -> bool:
    """Whether `path` is a folder written by `jpipe.data.prepare` (it holds `tokens.json`)."""
    return (pathlib.Path(path) / META_NAME).is_file()


def read_meta(folder: pathlib.Path | str) -> TokenMeta:
    """`folder/tokens.json`, checked against `folder/tokens.bin`'s size; DataError naming the file otherwise."""
    folder = pathlib.Path(folder)
    path = folder / META_NAME
    try:
        fields = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read token metadata ({error})") from None
    known = {field.name for field in dataclasses.fields(TokenMeta)}
    if not isinstance(fields, dict) or fields.get("format") != FORMAT or not known >= set(fields):
        raise DataError(f"{path}: expected {FORMAT!r} token metadata written by python -m jpipe.data.prepare")
    try:
        meta = TokenMeta(**fields)
    except (TypeError, DataError) as error:
        raise DataError(f"{path}: {error}") from None
    tokens = folder / BIN_NAME
    expected = meta.num_tokens * np.dtype(meta.dtype).itemsize
    size = tokens.stat().st_size if tokens.is_file() else None
    if size != expected:
        found = "no such file" if size is None else f"{size} bytes"
        raise DataError(
            f"{tokens}: expected {meta.num_tokens} {meta.dtype} token ids ({expected} bytes), found {found}"
        )
    return meta


def open_tokens(folder: pathlib.Path | str) -> tuple[np.ndarray, TokenMeta]:
    """The folder's token ids `[num_tokens]` (memory-mapped, read-only) and their metadata."""
    meta = read_meta(folder)
    tokens = np.memmap(pathlib.Path(folder) / BIN_NAME, dtype=meta.dtype, mode="r")
    return tokens, meta
