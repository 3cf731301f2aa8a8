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
import os
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


def _corpus_chunks(files: list[pathlib.Path], max_bytes: int | None):
    """The corpus's bytes, file by file in order, cut at `max_bytes` (unset: all of them)."""
    total = 0
    for file in files:
        data = file.read_bytes()
        if max_bytes is not None:
            data = data[: max_bytes - total]
        yield data
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            return


def _new_digest():
    return hashlib.blake2b(digest_size=10)


def corpus_key(files: list[pathlib.Path], max_bytes: int | None) -> str:
    """A digest of the bytes the corpus of `files` holds: an edited file gives another key.

    Keyed by content (not by path, file count or modification time), so a file rewritten with other
    text, even at the same size within the file system's time resolution, is never read stale.
    Hashing costs one read of the text (about 0.1 s for the 13 MB standard library)."""
    digest = _new_digest()
    for data in _corpus_chunks(files, max_bytes):
        digest.update(data)
    return digest.hexdigest()


def build_corpus(
    path: pathlib.Path | str | None, cache_dir: pathlib.Path | str, max_bytes: int | None = None
) -> pathlib.Path:
    """Concatenate the text under `path` (default: the stdlib) into a cached byte file; return it.

    The cache file `corpus-<key>.bin` in `cache_dir` is named by a digest of its content
    (`corpus_key`), so the cache is reused only while every file reads the same."""
    source = stdlib_path() if path is None else pathlib.Path(path)
    files = _text_files(source)
    cache = pathlib.Path(cache_dir) / f"corpus-{corpus_key(files, max_bytes)}.bin"
    if cache.exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"corpus-{os.getpid()}.partial")
    digest = _new_digest()
    with open(partial, "wb") as out:
        for data in _corpus_chunks(files, max_bytes):
            out.write(data)
            digest.update(data)
    # Named by what was written (a file edited since the key was taken gets its own name); the rename
    # is atomic, so a killed build never leaves a truncated cache behind.
    cache = cache.with_name(f"corpus-{digest.hexdigest()}.bin")
    partial.replace(cache)
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
