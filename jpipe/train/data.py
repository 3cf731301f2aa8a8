"""Language-model data, memory-mapped, deterministic, sharded: byte-level text or a token folder.

`--data-path` names one of two kinds of data (`inspect_data` tells which, before JAX starts):

- **Text** (a file, or a folder of .py/.txt/.md/.rst files, all of them in sorted-path order), read
  as bytes: a vocabulary of 256. Unset, the embedded default needs no download: the `.py` sources of
  the running Python's standard library (real text every Python install has; its test suites and
  installed packages left out). The text is concatenated into one byte stream, cached as a flat
  `uint8` file in the cache folder (`cache_dir`: `$JPIPE_CACHE`, default `~/.cache/jpipe`) named
  by a digest of its content, and memory-mapped.
- **A token folder** written by `python -m jpipe.data.prepare` (`jpipe.data`): `tokens.bin`
  memory-mapped as it is (`uint16` or `uint32` ids, documents separated by an end-of-document
  token); the model's vocabulary is the folder's.

Either way the last `eval_fraction` of the stream is held out for evaluation, and batches are
windows of `seq_len + 1` tokens at offsets drawn from a seeded permutation per epoch, so the order
depends only on (seed, step): the step is the whole iterator state, and a resumed run sees the same
batches as an uninterrupted one, mid-epoch included. Windows pack documents: one may start in a
document and end in the next, across its end-of-document token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sysconfig
from typing import TYPE_CHECKING

import numpy as np

from jpipe.data.tokens import DataError, TokenMeta, is_token_folder, open_tokens, read_meta
from jpipe.train.config import ConfigError, DataConfig

if TYPE_CHECKING:
    from jpipe.train.presets import TrainConfig

VOCAB_SIZE = 256  # bytes
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
# Left out of the standard library's sources (the default corpus) only: a user's folder is read whole.
STDLIB_SKIP = frozenset({"test", "tests", "site-packages", "dist-packages", "__pycache__"})


def cache_dir() -> pathlib.Path:
    """Where byte corpora are cached: `$JPIPE_CACHE`, default `~/.cache/jpipe` (safe to delete)."""
    return pathlib.Path(os.environ.get("JPIPE_CACHE", pathlib.Path.home() / ".cache" / "jpipe"))


def stdlib_path() -> pathlib.Path:
    """Folder of the Python standard library's sources."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _text_files(path: pathlib.Path, skip: frozenset[str] = frozenset()) -> list[pathlib.Path]:
    """The text files of `path` (itself, or the folder's in sorted order, none under a `skip` folder).

    DataError naming the path when there are none, saying what it holds instead."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{str(path)!r} is neither a file nor a folder")
    found = sorted(p for p in path.rglob("*") if p.is_file() and not skip & set(p.relative_to(path).parts))
    files = [p for p in found if p.suffix in TEXT_SUFFIXES]
    if not files:
        others = sorted({p.suffix or p.name for p in found})
        hint = ""
        if ".jsonl" in others or ".json" in others:
            hint = f"; to train on .jsonl, tokenize it first: python -m jpipe.data.prepare {path} --out <token folder>"
        holds = f"it holds {', '.join(others[:6])}{' ...' if len(others) > 6 else ''}" if others else "it is empty"
        raise DataError(f"{str(path)!r} holds no {'/'.join(TEXT_SUFFIXES)} files ({holds}){hint}")
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
    files = _text_files(stdlib_path(), STDLIB_SKIP) if path is None else _text_files(pathlib.Path(path))
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


def split_bounds(num_tokens: int, split: str, eval_fraction: float) -> tuple[int, int]:
    """`(start, stop)` of `split` ("train" or "eval", the last `eval_fraction`) in a stream of `num_tokens`."""
    cut = int(num_tokens * (1.0 - eval_fraction))
    return (0, cut) if split == "train" else (cut, num_tokens)


def count_windows(num_tokens: int, seq_len: int, split: str, eval_fraction: float) -> int:
    """Examples of `seq_len + 1` tokens (windows at stride `seq_len`) in `split` of a stream of `num_tokens`."""
    start, stop = split_bounds(num_tokens, split, eval_fraction)
    return max(0, (stop - start - 1) // seq_len)


@dataclasses.dataclass(frozen=True)
class TokenDataset:
    """Windows of a memory-mapped token stream (bytes of the text corpus, or a token folder's ids).

    Attributes:
      tokens: the `[num_tokens]` stream (`uint8` bytes, `uint16` or `uint32` ids; memory-mapped).
      seq_len: tokens per example; examples are `seq_len + 1` tokens (inputs and shifted targets).
      split: "train" or "eval"; eval is the last `eval_fraction` of the corpus.
    """

    tokens: np.ndarray
    seq_len: int
    split: str = "train"
    eval_fraction: float = 0.01

    @classmethod
    def open(
        cls, corpus: pathlib.Path, seq_len: int, split: str = "train", eval_fraction: float = 0.01
    ) -> TokenDataset:
        """A byte corpus file (`build_corpus`) or a token folder (`jpipe.data`), memory-mapped."""
        if is_token_folder(corpus):
            tokens, _ = open_tokens(corpus)
        else:
            tokens = np.memmap(corpus, dtype=np.uint8, mode="r")
        return cls(tokens, seq_len, split, eval_fraction)

    @property
    def _bounds(self) -> tuple[int, int]:
        return split_bounds(len(self.tokens), self.split, self.eval_fraction)

    @property
    def num_windows(self) -> int:
        return count_windows(len(self.tokens), self.seq_len, self.split, self.eval_fraction)

    def batch(
        self, seed: int, step: int, batch_size: int, shard: int = 0, num_shards: int = 1
    ) -> dict[str, np.ndarray]:
        """Examples `[batch_size // num_shards, seq_len]` of inputs and targets for this shard.

        The global batch at `step` is a deterministic function of (seed, step); shard `i` of
        `num_shards` (data-parallel rank or process) gets rows `i::num_shards` of it.
        """
        if batch_size % num_shards:
            raise ValueError(f"batch_size {batch_size} must divide over {num_shards} data shards")
        return self.rows(seed, step, batch_size, np.arange(batch_size)[shard::num_shards])

    def rows(self, seed: int, step: int, batch_size: int, rows: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Rows `rows` (indices into the global batch at `step`) of inputs and targets: `[len(rows), seq_len]`.

        Reads only those rows' windows: a process reads the rows its devices hold.
        """
        windows = self.num_windows
        if windows < batch_size:
            raise ValueError(
                f"{self.split} split holds {windows} windows of {self.seq_len + 1} tokens; need {batch_size}"
            )
        epoch, index = divmod(step * batch_size, windows)
        order = np.random.default_rng([seed, epoch]).permutation(windows)
        rows = np.take(order, np.arange(index, index + batch_size), mode="wrap")[np.asarray(rows, dtype=np.int64)]
        start = self._bounds[0]
        examples = np.zeros((len(rows), self.seq_len + 1), np.int32)
        for i, window in enumerate(rows):
            offset = start + int(window) * self.seq_len
            examples[i] = self.tokens[offset : offset + self.seq_len + 1]
        return {"inputs": examples[:, :-1], "targets": examples[:, 1:]}


ByteDataset = TokenDataset  # the byte corpus is a token stream with a vocabulary of 256


@dataclasses.dataclass(frozen=True)
class DataSource:
    """What `--data-path` names: text read as bytes (`meta` None) or a token folder (its `meta`).

    Attributes:
      path: the path given, or None for the default corpus (the standard library's sources).
      num_tokens: tokens in the stream (bytes of text, at most `max_corpus_bytes`).
      meta: the token folder's metadata, or None for text.
    """

    path: pathlib.Path | None
    num_tokens: int
    meta: TokenMeta | None = None

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE if self.meta is None else self.meta.vocab_size

    def describe(self) -> str:
        if self.meta is None:
            return f"byte-level text ({'the standard library' if self.path is None else self.path})"
        return f"the token folder {self.path}"


def inspect_data(path: pathlib.Path | str | None, max_corpus_bytes: int | None = None) -> DataSource:
    """Which data `path` is, checked without reading it; DataError (one line) when it is unusable.

    A token folder's metadata must match its `tokens.bin`; text must hold text files (their sizes,
    cut at `max_corpus_bytes`, are its token count)."""
    if path is not None and is_token_folder(path):
        meta = read_meta(path)
        return DataSource(pathlib.Path(path), meta.num_tokens, meta)
    files = _text_files(stdlib_path(), STDLIB_SKIP) if path is None else _text_files(pathlib.Path(path))
    size = sum(file.stat().st_size for file in files)
    return DataSource(None if path is None else pathlib.Path(path), min(size, max_corpus_bytes or size))


def _check_size(source: DataSource, data: DataConfig) -> None:
    """ConfigError naming `data.path` when a split holds fewer windows than one batch."""
    for split in ("train", "eval"):
        windows = count_windows(source.num_tokens, data.seq_len, split, data.eval_fraction)
        if windows < data.batch_size:
            larger = " a larger data.eval_fraction," if split == "eval" else ""
            raise ConfigError(
                f"data.path: the {split} split of {source.describe()} ({source.num_tokens} tokens, eval fraction "
                f"{data.eval_fraction}) holds {windows} examples of {data.seq_len + 1} tokens; a batch needs "
                f"{data.batch_size} (data.batch_size): give more data,{larger} or a smaller data.batch_size"
            )


def check_vocab(source: DataSource, vocab_size: int) -> None:
    """ConfigError (naming `model.vocab_size`) unless the model's `vocab_size` is the data's."""
    if vocab_size != source.vocab_size:
        raise ConfigError(
            f"model.vocab_size: the model's vocabulary must be the data's: {source.describe()} has "
            f"{source.vocab_size} tokens, got {vocab_size}"
        )


def _inspect(data: DataConfig) -> DataSource:
    try:
        return inspect_data(data.path, data.max_corpus_bytes)
    except DataError as error:
        raise ConfigError(f"data.path: {error}") from None


def resolve_data(config: TrainConfig, vocab_given: bool, training: bool = True) -> TrainConfig:
    """`config` with the model's vocabulary taken from its data, checked before JAX starts.

    Raises ConfigError, one line naming `data.path` or `model.vocab_size`, when the data is unusable
    or when the vocabulary is `vocab_given` (by a flag, a config file or a saved run), not the
    data's, and `training` (compiling a step alone reads no data: any given vocabulary goes). Whether
    the data holds a batch is `check_data_size`'s. The model's `document_end` is the data's
    end-of-document id with `data.cross_document_attention` false (`resolve_document_end`)."""
    source = _inspect(config.data)
    if vocab_given:
        if training:
            check_vocab(source, config.model.vocab_size)
        return resolve_document_end(config, source)
    model = dataclasses.replace(config.model, vocab_size=source.vocab_size)
    return resolve_document_end(dataclasses.replace(config, model=model), source)


def resolve_document_end(config: TrainConfig, source: DataSource) -> TrainConfig:
    """`config` with `model.document_end` set from `data.cross_document_attention` and the data.

    True (attention crosses documents): it stays unset. False: the token folder's end-of-document
    id. ConfigError when false on byte-level text (no end-of-document token) or when the model's
    `document_end` is given otherwise (it follows the data).
    """
    end = config.model.document_end
    if config.data.cross_document_attention:
        if end is not None:
            raise ConfigError(
                f"model.document_end: set from the data by data.cross_document_attention false, got {end} with "
                "data.cross_document_attention true; leave it unset"
            )
        return config
    if source.meta is None:
        raise ConfigError(
            f"data.cross_document_attention: false needs a token folder (python -m jpipe.data.prepare), whose "
            f"documents end with an end-of-document token; {source.describe()} has none"
        )
    if end is not None and end != source.meta.eod_id:
        raise ConfigError(
            f"model.document_end: must be the data's end-of-document id {source.meta.eod_id} ({source.describe()}), "
            f"got {end}"
        )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, document_end=source.meta.eod_id))


def check_data_size(data: DataConfig) -> None:
    """ConfigError naming `data.path` when the train or eval split holds fewer windows than one batch."""
    _check_size(_inspect(data), data)


def open_datasets(data: DataConfig, vocab_size: int, cache: pathlib.Path) -> tuple[TokenDataset, TokenDataset]:
    """The train and eval splits of `data.path` (`inspect_data`) for a model of `vocab_size` tokens.

    ConfigError when the data is unusable or its vocabulary is not `vocab_size`; `max_corpus_bytes`
    cuts text only (a token folder is used whole)."""
    source = _inspect(data)
    _check_size(source, data)
    check_vocab(source, vocab_size)
    stream = source.path if source.meta is not None else build_corpus(data.path, cache, data.max_corpus_bytes)
    return (
        TokenDataset.open(stream, data.seq_len, "train", data.eval_fraction),
        TokenDataset.open(stream, data.seq_len, "eval", data.eval_fraction),
    )
