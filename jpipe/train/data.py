"""Byte-level language-model data: any text file or folder, memory-mapped, deterministic, sharded.

The embedded default corpus needs no download: the `.py` sources of the running Python's standard
library (real text every Python install has). Text is concatenated in sorted-path order into one
byte stream, cached as a flat `uint8` file and memory-mapped; the last `eval_fraction` of it is held
out for evaluation. Batches are windows of `seq_len + 1` bytes at offsets drawn from a seeded
permutation, so the order depends only on (seed, step) and a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

import numpy as np

VOCAB_SIZE = 256  # bytes


def stdlib_path() -> pathlib.Path:
    """Folder of the Python standard library's sources."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _text_files(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"data path {str(path)!r} is neither a file nor a folder")
    suffixes = {".py", ".txt", ".md", ".rst"}
    skip = {"test", "tests", "site-packages", "dist-packages", "__pycache__"}
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes and not skip & set(p.relative_to(path).parts)
    )
    if not files:
        raise FileNotFoundError(f"data path {str(path)!r} holds no .py/.txt/.md/.rst files")
    return files


def build_corpus(
    path: pathlib.Path | str | None, cache_dir: pathlib.Path | str, max_bytes: int | None = None
) -> pathlib.Path:
    """Concatenate the text under `path` (default: the stdlib) into a cached byte file; return it."""
    source = stdlib_path() if path is None else pathlib.Path(path)
    files = _text_files(source)
    key = hashlib.sha1(f"{source.resolve()}|{len(files)}|{max_bytes}".encode()).hexdigest()[:12]
    cache = pathlib.Path(cache_dir) / f"corpus-{key}.bin"
    if cache.exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    total = 0
    with open(partial, "wb") as out:
        for file in files:
            data = file.read_bytes()
            if max_bytes is not None:
                data = data[: max_bytes - total]
            out.write(data)
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                break
    partial.rename(cache)  # atomic: a killed build never leaves a truncated cache behind
    return cache


@dataclasses.dataclass(frozen=True)
class ByteDataset:
    """Windows of a memory-mapped byte corpus.

    Attributes:
      tokens: the `uint8` corpus (memory-mapped).
      seq_len: tokens per example; examples are `seq_len + 1` bytes (inputs and shifted targets).
      split: "train" or "eval"; eval is the last `eval_fraction` of the corpus.
    """

    tokens: np.ndarray
    seq_len: int
    split: str = "train"
    eval_fraction: float = 0.01

    @classmethod
    def open(cls, corpus: pathlib.Path, seq_len: int, split: str = "train", eval_fraction: float = 0.01) -> ByteDataset:
        tokens = np.memmap(corpus, dtype=np.uint8, mode="r")
        return cls(tokens, seq_len, split, eval_fraction)

    @property
    def _bounds(self) -> tuple[int, int]:
        cut = int(len(self.tokens) * (1.0 - self.eval_fraction))
        return (0, cut) if self.split == "train" else (cut, len(self.tokens))

    @property
    def num_windows(self) -> int:
        start, stop = self._bounds
        return max(0, (stop - start - 1) // self.seq_len)

    def batch(
        self, seed: int, step: int, batch_size: int, shard: int = 0, num_shards: int = 1
    ) -> dict[str, np.ndarray]:
        """Examples `[batch_size // num_shards, seq_len]` of inputs and targets for this shard.

        The global batch at `step` is a deterministic function of (seed, step); shard `i` of
        `num_shards` (data-parallel rank or process) gets rows `i::num_shards` of it.
        """
        if batch_size % num_shards:
            raise ValueError(f"batch_size {batch_size} must divide over {num_shards} data shards")
        windows = self.num_windows
        if windows < batch_size:
            raise ValueError(
                f"{self.split} split holds {windows} windows of {self.seq_len + 1} bytes; need {batch_size}"
            )
        epoch, index = divmod(step * batch_size, windows)
        order = np.random.default_rng([seed, epoch]).permutation(windows)
        rows = np.take(order, np.arange(index, index + batch_size), mode="wrap")[shard::num_shards]
        start = self._bounds[0]
        examples = np.stack(
            [self.tokens[start + r * self.seq_len : start + r * self.seq_len + self.seq_len + 1] for r in rows]
        )
        examples = examples.astype(np.int32)
        return {"inputs": examples[:, :-1], "targets": examples[:, 1:]}
