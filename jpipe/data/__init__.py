"""Tokenized training data: token-id files on disk, and the command that writes them.

A token folder (written by `python -m jpipe.data.prepare`) holds

- `tokens.bin`: every document's token ids, one after the other, each document followed by the
  end-of-document token; a flat array of `uint16` (vocabularies up to 65,536) or `uint32`, no
  header: nanoGPT's `.bin` layout, readable with `np.memmap(path, dtype=...)`;
- `tokens.json`: what the ids mean (`TokenMeta`: vocabulary size, dtype, end-of-document id,
  token and document counts, the tokenizer file);
- `tokenizer.json`: the Hugging Face `tokenizers` tokenizer that wrote them.

Training (`--data-path <folder>`) memory-maps `tokens.bin`, takes the model's vocabulary from
`tokens.json` and draws windows exactly as it does from the byte corpus (`jpipe.train.data`).
Nothing here imports JAX: data is prepared and checked before JAX starts.
"""

from jpipe.data.tokens import BIN_NAME, META_NAME, TOKENIZER_NAME, DataError, TokenMeta, is_token_folder, read_meta

__all__ = ["BIN_NAME", "META_NAME", "TOKENIZER_NAME", "DataError", "TokenMeta", "is_token_folder", "read_meta"]
