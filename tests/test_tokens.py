"""Tokenized data: `python -m jpipe.data.prepare` writes token folders, training reads them, and
every data problem is one line (exit 2) before JAX starts."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib

import numpy as np
import pytest

from jpipe.data import prepare as prep
from jpipe.data.tokens import BIN_NAME, META_NAME, TOKENIZER_NAME, open_tokens, read_meta
from jpipe.train import cli
from jpipe.train.data import TokenDataset, build_corpus, count_windows

DOCS = [f"Document {i}: the pipeline sends activation {i} forward and its gradient back.\n" * 3 for i in range(6)]


@pytest.fixture(autouse=True)
def _standard_promotion():
    """optax mixes Python floats with int32 step counts, which strict promotion refuses."""
    import jax

    with jax.numpy_dtype_promotion("standard"):
        yield


def _sources(root: pathlib.Path) -> pathlib.Path:
    """A folder of two text files and a `.jsonl` of four documents (in sorted order: DOCS)."""
    (root / "notes").mkdir(parents=True)
    (root / "a.txt").write_text(DOCS[0])
    (root / "notes" / "b.md").write_text(DOCS[1])
    with open(root / "notes" / "c.jsonl", "w") as lines:
        for doc in DOCS[2:]:
            lines.write(json.dumps({"id": 7, "text": doc}) + "\n")
        lines.write("\n")  # blank lines are not documents
    return root


def _prepared(tmp_path: pathlib.Path, vocab_size: int = 300) -> pathlib.Path:
    out = tmp_path / "tokens"
    assert prep.main([str(_sources(tmp_path / "src")), "--out", str(out), "--vocab-size", str(vocab_size)]) == 0
    return out


def test_prepare_writes_documents_with_end_of_document_tokens_and_their_tokenizer(tmp_path, capsys):
    out = _prepared(tmp_path)
    assert "train with --data-path" in capsys.readouterr().out
    tokens, meta = open_tokens(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([BIN_NAME, META_NAME, TOKENIZER_NAME])
    assert (meta.dtype, meta.num_documents, meta.num_tokens) == ("uint16", len(DOCS), len(tokens))
    assert meta.eod_token == "<|endoftext|>" and 257 <= meta.vocab_size <= 300
    assert tokens.max() < meta.vocab_size and tokens[-1] == meta.eod_id
    # Each document decodes back from the ids between end-of-document tokens, in sorted-path order.
    tokenizer = prep.load_tokenizer(out / TOKENIZER_NAME)
    bounds = np.flatnonzero(tokens == meta.eod_id)
    pieces = np.split(np.asarray(tokens), bounds + 1)[:-1]
    assert [tokenizer.decode(list(piece[:-1])) for piece in pieces] == DOCS


def test_a_users_tokenizer_gives_the_same_tokens(tmp_path):
    first = _prepared(tmp_path)
    again = tmp_path / "again"
    assert prep.main([str(tmp_path / "src"), "--out", str(again), "--tokenizer", str(first / TOKENIZER_NAME)]) == 0
    assert (again / BIN_NAME).read_bytes() == (first / BIN_NAME).read_bytes()
    assert read_meta(again) == read_meta(first)


def test_token_windows_are_a_function_of_seed_and_step(tmp_path):
    out = _prepared(tmp_path)
    data = TokenDataset.open(out, seq_len=8, eval_fraction=0.2)
    first, again = data.batch(3, 5, 4), data.batch(3, 5, 4)
    np.testing.assert_array_equal(first["inputs"], again["inputs"])
    np.testing.assert_array_equal(first["inputs"][:, 1:], first["targets"][:, :-1])
    assert first["inputs"].dtype == np.int32 and first["inputs"].shape == (4, 8)
    halves = [data.batch(3, 5, 4, shard=i, num_shards=2)["inputs"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), first["inputs"][[0, 2, 1, 3]])


def _bad_jsonl(root: pathlib.Path, line: str) -> list[str]:
    root.mkdir()
    (root / "x.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    return [str(root), "--out", str(root.parent / "out")]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: [str(d / "nowhere"), "--out", str(d / "o")], "nowhere: no such file or folder"),
        (lambda d: (d / "empty").mkdir() or [str(d / "empty"), "--out", str(d / "o")], "empty: holds no .txt, .md"),
        (
            lambda d: _bad_jsonl(d / "j", '{"body": "x"}'),
            "x.jsonl:2: expected a string field 'text' (--text-field), found body",
        ),
        (lambda d: _bad_jsonl(d / "j", "{oops"), "x.jsonl:2: not a JSON object"),
        (lambda d: _bad_jsonl(d / "j", "{}") + ["--vocab-size", "100"], "--vocab-size: expected at least 257"),
        (lambda d: _bad_jsonl(d / "j", "{}") + ["--tokenizer", str(d / "no.json")], "--tokenizer: cannot read"),
        (lambda d: [str(d), "--out", str(d / "o"), "--vocab-size", "x"], "argument --vocab-size: invalid int value"),
    ],
)
def test_prepare_refuses_bad_sources_in_one_line(tmp_path, capsys, make_args, message):
    args = make_args(tmp_path)
    try:
        status = prep.main(args)
    except SystemExit as exit:  # argparse's own errors leave through sys.exit
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_a_tokenizer_without_the_end_of_document_token_is_refused(tmp_path, capsys):
    out = _prepared(tmp_path)
    args = [str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--tokenizer", str(out / TOKENIZER_NAME)]
    assert prep.main([*args, "--eod-token", "</s>"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --eod-token: the tokenizer") and "has no token '</s>'" in err, err


def test_a_users_folder_is_read_whole_test_folders_included(tmp_path):
    (tmp_path / "split" / "test").mkdir(parents=True)
    (tmp_path / "split" / "train.txt").write_text("train text ")
    (tmp_path / "split" / "test" / "held.txt").write_text("test text")
    assert build_corpus(tmp_path / "split", tmp_path / "cache").read_bytes() == b"test text" + b"train text "


def _train_error(capsys, *args: str) -> str:
    """The one stderr line of a training command refused before JAX starts (exit status 2)."""
    assert cli.main(["--preset", "tiny", "--out", "/nonexistent/never-written", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_data_problems_stop_training_in_one_line(tmp_path, capsys):
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "a.jsonl").write_text('{"text": "x"}\n')
    err = _train_error(capsys, "--data-path", str(jsonl))
    assert "holds no .py/.txt/.md/.rst files (it holds .jsonl); to train on .jsonl, tokenize it first" in err
    assert "python -m jpipe.data.prepare" in err
    err = _train_error(capsys, "--model.vocab-size", "32000")
    assert "--model.vocab-size: model.vocab_size: the model's vocabulary must be the data's: byte-level text" in err
    assert "has 256 tokens, got 32000" in err

    out = _prepared(tmp_path)
    meta = read_meta(out)
    enough = ("--data-path", str(out), "--data.eval-fraction", "0.3")
    err = _train_error(capsys, *enough, "--model.vocab-size", "256")
    assert f"the token folder {out} has {meta.vocab_size} tokens, got 256" in err
    err = _train_error(capsys, "--data-path", str(out), "--batch-size", "64", "--microbatches", "2")
    assert "--data-path, --batch-size: data.path: the train split of the token folder" in err
    windows = count_windows(meta.num_tokens, 16, "train", 0.01)
    assert f"holds {windows} examples of 17 tokens; a batch needs 64 (data.batch_size): give more data, or a" in err
    with open(out / BIN_NAME, "ab") as tokens:
        tokens.write(b"\0")  # one byte more than tokens.json says
    err = _train_error(capsys, *enough)
    assert f"expected {meta.num_tokens} uint16 token ids ({2 * meta.num_tokens} bytes), found" in err


def test_compiling_alone_takes_any_vocabulary_and_reads_no_data():
    """`python -m jpipe.compile` builds its config without `training`: a given vocabulary stays."""
    args = cli.parse(["--preset", "tiny", "--model.vocab-size", "512", "--batch-size", "4096", "--microbatches", "2"])
    config = cli.build_config(args)
    assert (config.model.vocab_size, config.data.batch_size) == (512, 4096)


def test_training_on_token_files_resumes_mid_epoch_with_the_same_losses(tmp_path):
    """Llama on a prepared folder, its vocabulary the data's: 4 steps straight, and 2 + 2 resumed (the
    epoch ends after step 3, so the stop at step 2 is mid-epoch)."""
    from jpipe.train.loop import train

    data = _prepared(tmp_path)
    meta = read_meta(data)
    args = ["--preset", "tiny", "--model", "llama", "--data-path", str(data), "--data.eval-fraction", "0.3"]
    config = cli.build_config(cli.parse([*args, "--steps", "4", "--eval-every", "100"]))
    assert config.model.vocab_size == meta.vocab_size and config.model.family == "llama"
    windows = count_windows(meta.num_tokens, config.data.seq_len, "train", config.data.eval_fraction)
    assert 2 * config.data.batch_size < windows <= 3 * config.data.batch_size, windows  # epoch 1 ends in step 3

    def run(out: str, stop_at_step: int | None = None, resume: bool = False):
        changed = dataclasses.replace(config.run, out=str(tmp_path / out), stop_at_step=stop_at_step)
        return train(dataclasses.replace(config, run=changed), resume=resume, stream=io.StringIO())

    reference = run("reference")
    assert run("stopped", stop_at_step=2).last_step == 2
    resumed = run("stopped", resume=True)
    assert resumed.first_step == 3
    np.testing.assert_allclose(resumed.losses, reference.losses[2:], rtol=1e-6, atol=0)
    assert reference.losses[0] == pytest.approx(np.log(meta.vocab_size), rel=0.05)
