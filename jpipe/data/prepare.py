"""`python -m jpipe.data.prepare`: text files, folders and `.jsonl` files -> a token folder.

    python -m jpipe.data.prepare notes/ wiki.jsonl --out data/wiki --vocab-size 8192
    python -m jpipe.data.prepare corpus/ --out data/corpus --tokenizer my/tokenizer.json
    python -m jpipe.train --data-path data/wiki --model llama

Documents: every `.txt`, `.md`, `.rst` and `.py` file is one document; every line of a `.jsonl` file
is one, its `--text-field` (default "text"). Folders are read whole and in sorted path order
(hidden files and folders excepted), so the same sources give the same tokens. Each document is
followed by the end-of-document token (`--eod-token`), so documents are packed into one stream
with explicit boundaries.

The tokenizer is either trained here (a byte-level BPE of `--vocab-size` tokens, Hugging Face
`tokenizers`, on the same documents; nothing is downloaded) or a `tokenizer.json` of the user's
(`--tokenizer`, which must know the end-of-document token). It is copied into the folder, with
`tokens.bin` and `tokens.json` (`jpipe.data`). A problem with the sources is one line on stderr,
exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jpipe.data.tokens import BIN_NAME, TOKENIZER_NAME, DataError, TokenMeta, dtype_for

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIX = ".jsonl"
DEFAULT_EOD = "<|endoftext|>"
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte
_ENCODE_BATCH = 256  # documents per `encode_batch` call


def find_files(sources: Sequence[pathlib.Path | str]) -> list[pathlib.Path]:
    """The text and `.jsonl` files of `sources` (files taken as given, folders read in sorted order)."""
    files: list[pathlib.Path] = []
    for source in map(pathlib.Path, sources):
        if source.is_file():
            files.append(source)
        elif source.is_dir():
            found = sorted(
                path
                for path in source.rglob("*")
                if path.is_file()
                and path.suffix in (*TEXT_SUFFIXES, JSONL_SUFFIX)
                and not any(part.startswith(".") for part in path.relative_to(source).parts)
            )
            if not found:
                kinds = ", ".join((*TEXT_SUFFIXES, JSONL_SUFFIX))
                raise DataError(f"{source}: holds no {kinds} files")
            files.extend(found)
        else:
            raise DataError(f"{source}: no such file or folder")
    return files


def documents(files: Sequence[pathlib.Path], text_field: str = "text") -> Iterator[str]:
    """Each file's documents in order: a text file is one, a `.jsonl` line one (its `text_field`)."""
    for path in files:
        if path.suffix != JSONL_SUFFIX:
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield _jsonl_text(line, text_field, f"{path}:{number}")


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not a JSON object ({error.msg})") from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: expected a string field {text_field!r} (--text-field), found {keys or 'no fields'}")
    return text


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError(
            "a tokenizer needs the Hugging Face tokenizers package: pip install tokenizers "
            "(or install jpipe with its data extra)"
        ) from None
    return tokenizers


def train_tokenizer(files: Sequence[pathlib.Path], text_field: str, vocab_size: int, eod_token: str):
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` tokens (at most) trained on the documents.

    Its first token (id 0) is `eod_token`; every byte has a token, so any text encodes."""
    if vocab_size < BYTE_ALPHABET + 1:
        raise DataError(
            f"--vocab-size: expected at least {BYTE_ALPHABET + 1} (every byte and the end-of-document token), "
            f"got {vocab_size}"
        )
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eod_token],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents(files, text_field), trainer)
    return tokenizer


def load_tokenizer(path: pathlib.Path | str):
    """A user's `tokenizer.json` (`tokenizers.Tokenizer`); DataError naming the file when it is unreadable."""
    tk = _tokenizers()
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for both I/O and parse errors
        raise DataError(f"--tokenizer: cannot read {path} as a tokenizers tokenizer.json ({error})") from None


def write_tokens(tokenizer, docs: Iterator[str], path: pathlib.Path, eod_id: int, dtype: str) -> tuple[int, int]:
    """Encode `docs` (no special tokens added), each followed by `eod_id`, into the flat file `path`.

    Returns `(tokens, documents)` written. The file is written under a temporary name and renamed,
    so an interrupted run leaves no truncated `tokens.bin`."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    num_tokens = num_documents = 0
    with open(partial, "wb") as out:
        for batch in _batches(docs, _ENCODE_BATCH):
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                ids = np.asarray([*encoding.ids, eod_id], dtype=dtype)
                out.write(ids.tobytes())
                num_tokens += len(ids)
            num_documents += len(batch)
    partial.replace(path)
    return num_tokens, num_documents


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def prepare(
    sources: Sequence[pathlib.Path | str],
    out: pathlib.Path | str,
    *,
    tokenizer_path: pathlib.Path | str | None = None,
    vocab_size: int = 8192,
    text_field: str = "text",
    eod_token: str = DEFAULT_EOD,
) -> TokenMeta:
    """Write the token folder `out` from `sources` (see the module's docstring); returns its metadata."""
    files = find_files(sources)
    if tokenizer_path is None:
        tokenizer = train_tokenizer(files, text_field, vocab_size, eod_token)
    else:
        tokenizer = load_tokenizer(tokenizer_path)
        for _ in documents(files, text_field):  # every source problem surfaces before anything is written
            pass
    eod_id = tokenizer.token_to_id(eod_token)
    if eod_id is None:
        raise DataError(f"--eod-token: the tokenizer {tokenizer_path} has no token {eod_token!r}; name one it has")
    # Ids run to the largest one the tokenizer knows (added tokens may leave gaps below it).
    vocab = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for(vocab)
    num_tokens, num_documents = write_tokens(tokenizer, documents(files, text_field), out / BIN_NAME, eod_id, dtype)
    tokenizer.save(str(out / TOKENIZER_NAME))
    meta = TokenMeta(vocab, dtype, eod_id, num_tokens, num_documents, TOKENIZER_NAME, eod_token)
    meta.write(out)
    return meta


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def parser() -> argparse.ArgumentParser:
    result = _OneLineParser(
        prog="python -m jpipe.data.prepare",
        description="Tokenize text files, folders and .jsonl files into a token folder for --data-path.",
    )
    result.add_argument("sources", nargs="+", metavar="SOURCE", help="text files, .jsonl files or folders of them")
    result.add_argument(
        "--out", required=True, help="the token folder to write (tokens.bin, tokens.json, tokenizer.json)"
    )
    group = result.add_mutually_exclusive_group()
    group.add_argument(
        "--tokenizer", default=None, metavar="PATH", help="a tokenizer.json to use instead of training one"
    )
    group.add_argument("--vocab-size", type=int, default=8192, help="tokens of the BPE trained here (default: 8192)")
    result.add_argument(
        "--text-field", default="text", help="the field of a .jsonl line that holds its text (default: text)"
    )
    result.add_argument("--eod-token", default=DEFAULT_EOD, help=f"the end-of-document token (default: {DEFAULT_EOD})")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 written, 2 a problem with the arguments or the sources)."""
    args = parser().parse_args(argv)
    try:
        meta = prepare(
            args.sources,
            args.out,
            tokenizer_path=args.tokenizer,
            vocab_size=args.vocab_size,
            text_field=args.text_field,
            eod_token=args.eod_token,
        )
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta.num_tokens} tokens ({meta.num_documents} documents, vocabulary {meta.vocab_size}, "
        f"{meta.dtype}) to {pathlib.Path(args.out) / BIN_NAME}; train with --data-path {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
