"""The byte corpus cache: keyed by content, so edited data is never read stale."""

from __future__ import annotations

import os

import numpy as np

from jpipe.train.data import ByteDataset, build_corpus


def _write(path, text: str, mtime_ns: int | None = None) -> None:
    path.write_text(text)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_file_edited_after_its_corpus_was_built_gives_the_new_bytes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("first file\n")
    _write(data / "b.md", "old text, the same size as the new\n")
    stamp = (data / "b.md").stat().st_mtime_ns
    first = build_corpus(data, tmp_path / "cache")
    assert first.read_bytes() == b"first file\nold text, the same size as the new\n"

    # The same size and the same modification time: only the content tells the two apart.
    _write(data / "b.md", "NEW TEXT, the same size as the old\n", mtime_ns=stamp)
    second = build_corpus(data, tmp_path / "cache")
    assert second != first
    assert second.read_bytes() == b"first file\nNEW TEXT, the same size as the old\n"
    assert np.asarray(ByteDataset.open(second, seq_len=4).tokens).tobytes() == second.read_bytes()


def test_an_unchanged_source_reuses_its_cache_and_max_bytes_cuts_it(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("0123456789" * 10)
    whole = build_corpus(data, tmp_path / "cache")
    assert build_corpus(data, tmp_path / "cache") == whole
    cut = build_corpus(data, tmp_path / "cache", max_bytes=25)
    assert cut.read_bytes() == b"0123456789" * 2 + b"01234"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted({whole.name, cut.name})


def test_the_test_run_uses_its_own_empty_cache():
    from jpipe.train.loop import cache_dir

    assert cache_dir() != cache_dir().home() / ".cache" / "jpipe"
    assert cache_dir().name.startswith("jpipe-test-cache-")


class _CountingTokens(np.ndarray):
    """A token stream recording which windows (slices) are read."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            self.read.append(index.start)
        return super().__getitem__(index)


def test_a_process_reads_only_the_rows_its_devices_hold():
    """`local_rows` picks the rows of a `[m, b, T]` batch a process's devices hold; `rows` reads only
    those windows, and gives the global batch's rows."""
    import jax

    from jpipe.parallel.mesh import DATA, make_mesh
    from jpipe.train.loop import local_rows

    stream = np.arange(4000, dtype=np.uint16).view(_CountingTokens)
    stream.read = []
    dataset = ByteDataset(stream, seq_len=8)
    whole = dataset.batch(seed=3, step=5, batch_size=8)
    stream.read.clear()
    part = dataset.rows(seed=3, step=5, batch_size=8, rows=[1, 4, 6])
    assert len(stream.read) == 3
    np.testing.assert_array_equal(part["inputs"], whole["inputs"][[1, 4, 6]])
    np.testing.assert_array_equal(part["targets"], whole["targets"][[1, 4, 6]])

    class Process:  # a process holding, of a [2, 4, T] batch split over data 2, the first half of each microbatch
        def addressable_devices_indices_map(self, shape):
            return {0: (slice(None), slice(0, 2), slice(None)), 1: (slice(None), slice(0, 2), slice(None))}

    assert local_rows(Process(), (2, 4, 8)) == [0, 1, 4, 5]
    mesh = make_mesh(data=2, stage=4, tensor=1)
    everything = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, DATA))
    assert local_rows(everything, (2, 4, 8)) == list(range(8))  # one process holds every row
