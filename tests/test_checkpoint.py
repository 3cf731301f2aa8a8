"""jpipe.train.checkpoint: round trip, keep-last-N, SIGKILL mid-save, corruption fallback, mismatch, no clobbering."""

from __future__ import annotations

import asyncio
import gc
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpipe.train.checkpoint import (
    Checkpointer,
    CheckpointExistsError,
    CheckpointFallbackWarning,
    CheckpointMismatchError,
    NoRestorableCheckpointError,
)
from jpipe.train.orbax_shim import ReadLoop, orbax_read_scope

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def make_state(seed: int, sharding: jax.sharding.Sharding | None = None) -> dict:
    """A small train state: params (one sharded), an optimizer-like subtree, RNG key data, a NumPy leaf."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((16, 32), dtype=np.float32))
    if sharding is not None:
        w = jax.device_put(w, sharding)
    return {
        "params": {"w": w, "b": jnp.full((32,), float(seed), jnp.float32)},
        "opt": ({"count": jnp.asarray(seed, jnp.int32)}, [jnp.zeros((3,), jnp.bfloat16)]),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "host": rng.integers(0, 100, size=(5,)).astype(np.int64),
    }


def abstract(state: dict) -> dict:
    """ShapeDtypeStructs (with shardings) for jax leaves, the NumPy leaves themselves as templates."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
        state,
    )


def assert_same(a: dict, b: dict) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def step_dirs(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.isdigit())


# ------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_restores_values_shardings_and_metadata(tmp_path, mesh_factory, async_save):
    mesh = mesh_factory((2, 4), ("a", "b"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    state = make_state(1, sharding)
    meta = {"data_position": 1234, "config": {"stages": 4, "schedule": "1f1b"}, "layout": [[0, 1], [2, 3]]}
    with Checkpointer(tmp_path / "ckpt", async_save=async_save) as ckpt:
        ckpt.save(7, state, meta)
        ckpt.wait()
        assert ckpt.all_steps() == [7] and ckpt.latest_step() == 7
        step, restored, restored_meta = ckpt.restore(abstract(state))
    assert step == 7 and restored_meta == meta
    assert_same(restored, state)
    assert restored["params"]["w"].sharding == sharding
    assert isinstance(restored["host"], np.ndarray)
    assert isinstance(restored["rng"], jax.Array) and restored["rng"].dtype == jnp.uint32


def test_restore_onto_a_different_sharding_and_from_concrete_template(tmp_path, mesh_factory):
    mesh = mesh_factory((2, 4), ("a", "b"))
    saved_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
    new_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "a"))
    state = make_state(2, saved_sharding)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
    template = make_state(99)  # concrete arrays as the template: only their shape/dtype/sharding matter
    template["params"]["w"] = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=new_sharding)
    _, restored, _ = Checkpointer(tmp_path).restore(template)
    assert restored["params"]["w"].sharding == new_sharding
    assert_same(restored, state)


# ---------------------------------------------------------------------------- (1) periodic + keep


def test_periodic_and_final_saves_keep_last_n(tmp_path):
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory, keep=3)
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    final_step = 57
    for step in range(1, final_step + 1):
        if step % 10 == 0 or step == final_step:  # periodic every 10 + a final save
            ckpt.save(step, make_state(step), {"data_position": step * 8})
    ckpt.close()
    assert ckpt.all_steps() == [40, 50, 57]
    assert step_dirs(directory) == ["40", "50", "57"]  # older steps really deleted, no leftovers
    reopened = Checkpointer(directory, keep=3)
    assert reopened.all_steps() == [40, 50, 57] and reopened.latest_step() == 57
    step, state, meta = reopened.restore(abstract(make_state(0)))
    assert step == 57 and meta == {"data_position": 456}
    assert_same(state, make_state(57))
    step, state, _ = reopened.restore(abstract(make_state(0)), step=40)
    assert step == 40
    assert_same(state, make_state(40))
    reopened.close()


def test_async_save_is_not_reported_before_it_commits(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    release = threading.Event()
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def gated_finalize(self):  # hold the commit (the rename) until the test says so
        await asyncio.to_thread(release.wait, 30)
        return await original(self)

    ckpt = Checkpointer(tmp_path, keep=None)
    ckpt.save(1, make_state(1), {})
    ckpt.wait()
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", gated_finalize)
    ckpt.save(2, make_state(2), {})  # returns: data copied, write running in the background
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert not (tmp_path / "2").exists()
    release.set()
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    ckpt.close()


# ------------------------------------------------------------------------------ (2) SIGKILL mid-save

CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from jpipe.train.checkpoint import Checkpointer

    directory, mode = sys.argv[1], sys.argv[2]
    ckpt = Checkpointer(directory, keep=3, async_save=True)
    ckpt.save(1, {"w": np.arange(1000, dtype=np.float32), "rng": np.array([1, 2], np.uint32)}, {"step": 1})
    ckpt.wait()
    if mode == "hang":  # freeze the save after all data is written, right before orbax's commit (rename)
        import threading
        from orbax.checkpoint._src.path import atomicity

        async def finalize(self):
            print("WRITTEN", flush=True)
            threading.Event().wait()

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    big = np.random.default_rng(0).integers(0, 2**32 - 1, size=(int(sys.argv[3]),), dtype=np.uint32)
    print("SAVING", flush=True)
    ckpt.save(2, {"w": big.view(np.float32)[:1000].copy(), "big": big, "rng": np.array([3, 4], np.uint32)}, {"step": 2})
    ckpt.wait()
    print("DONE", flush=True)
    """
)


def _start_child(tmp_path: pathlib.Path, mode: str, n_words: int) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "ckpt"), mode, str(n_words)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 60.0) -> None:
    watchdog = threading.Timer(timeout, proc.kill)  # a hung child fails the test instead of hanging it
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.strip() == marker:
                return
    finally:
        watchdog.cancel()
    proc.kill()
    pytest.fail(f"child exited (rc={proc.wait()}) before printing {marker!r}")


def _tmp_dirs(directory: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in directory.iterdir() if TMP_SUFFIX in p.name]


def _dir_bytes(path: pathlib.Path) -> int:
    """Bytes under `path`, tolerating files that vanish while a writer renames them (0 if it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _check_resume_after_kill(directory: pathlib.Path, expect_step: int | None, n_words: int) -> None:
    ckpt = Checkpointer(directory, keep=3)
    latest = ckpt.latest_step()
    if expect_step is not None:
        assert latest == expect_step
    template = {"w": np.zeros(1000, np.float32), "rng": np.zeros(2, np.uint32)}
    if latest == 2:
        template["big"] = np.zeros(n_words, np.uint32)
    step, state, meta = ckpt.restore(template)
    assert step == latest and meta == {"step": latest}
    if latest == 1:
        np.testing.assert_array_equal(state["w"], np.arange(1000, dtype=np.float32))
        np.testing.assert_array_equal(state["rng"], [1, 2])
        # The run goes on: saving the interrupted step again works (the half-written folder is no obstacle).
        ckpt.save(2, {"w": np.ones(1000, np.float32), "rng": np.array([5, 6], np.uint32)}, {"step": 2})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.restore(template)[2] == {"step": 2}
    else:  # the save won the race: what is there must be the complete step 2
        np.testing.assert_array_equal(state["rng"], [3, 4])
    ckpt.close()
    assert not _tmp_dirs(directory), "the next Checkpointer should clean up half-written steps"


def test_sigkill_after_data_written_but_before_commit_restores_previous_step(tmp_path):
    n_words = 1 << 20  # 4 MB
    proc = _start_child(tmp_path, "hang", n_words)
    try:
        _read_until(proc, "WRITTEN")
        directory = tmp_path / "ckpt"
        tmps = _tmp_dirs(directory)
        assert len(tmps) == 1 and tmps[0].name.startswith("2" + TMP_SUFFIX)
        assert _dir_bytes(tmps[0]) >= 4 * n_words, "the big array should be on disk, only uncommitted"
        assert step_dirs(directory) == ["1"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    _check_resume_after_kill(tmp_path / "ckpt", expect_step=1, n_words=n_words)


def test_sigkill_during_a_real_write_restores_a_complete_step(tmp_path):
    n_words = 8 << 20  # 32 MB so that the write takes a while
    proc = _start_child(tmp_path, "plain", n_words)
    directory = tmp_path / "ckpt"
    try:
        _read_until(proc, "SAVING")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:  # kill once part of the data is on disk
            tmps = _tmp_dirs(directory)
            if tmps and _dir_bytes(tmps[0]) >= 1 << 20:
                break
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    _check_resume_after_kill(directory, expect_step=None, n_words=n_words)


def test_stale_temporary_folder_is_ignored(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, make_state(3), {})
    stale = tmp_path / f"9{TMP_SUFFIX}-1234"
    (stale / "state").mkdir(parents=True)
    (stale / "state" / "junk").write_bytes(b"\0" * 100)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3
    assert ckpt.discarded_unfinished == (stale.name,)
    assert ckpt.restore(abstract(make_state(0)))[0] == 3
    ckpt.save(4, make_state(4), {})  # orbax deletes the folder in the background, done before a save
    ckpt.close()
    assert not stale.exists() and Checkpointer(tmp_path).discarded_unfinished == ()


# ------------------------------------------------------------------------ (3) corruption, fallback


def _largest_file(path: pathlib.Path) -> pathlib.Path:
    return max((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


CORRUPTIONS = {
    "truncate-largest-data-file": lambda d: os.truncate(_largest_file(d / "state"), 10),
    "delete-largest-data-file": lambda d: _largest_file(d / "state").unlink(),
    "delete-state-metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "garble-state-metadata": lambda d: (d / "state" / "_METADATA").write_text("{not json"),
    "garble-json-metadata": lambda d: (d / "meta" / "metadata").write_text('{"step": '),
    "delete-state-item": lambda d: shutil.rmtree(d / "state"),
}


def _three_steps(directory: pathlib.Path) -> None:
    with Checkpointer(directory, keep=5) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, make_state(step), {"step": step})


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, corruption):
    _three_steps(tmp_path)
    CORRUPTIONS[corruption](tmp_path / "3")
    ckpt = Checkpointer(tmp_path, keep=5)
    assert ckpt.latest_step() == 3  # still listed: corruption is only found by reading
    with pytest.warns(CheckpointFallbackWarning, match=r"step 3 .* unreadable \(\w+.*\); falling back to step 2"):
        step, state, meta = ckpt.restore(abstract(make_state(0)))
    assert step == 2 and meta == {"step": 2}
    assert_same(state, make_state(2))
    # The resumed run reaches step 3 again: the bad folder is moved aside (never deleted), step 3 re-saved.
    with pytest.warns(CheckpointFallbackWarning, match=r"step 3 was unreadable; moved it to 3\.corrupt-"):
        ckpt.save(3, make_state(33), {"step": 33})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3]
    assert len(list(tmp_path.glob("3.corrupt-*"))) == 1
    step, state, meta = ckpt.restore(abstract(make_state(0)))
    assert (step, meta) == (3, {"step": 33})
    assert_same(state, make_state(33))
    ckpt.close()


def test_every_checkpoint_corrupt_raises_listing_what_was_tried(tmp_path):
    _three_steps(tmp_path)
    CORRUPTIONS["delete-state-metadata"](tmp_path / "3")
    CORRUPTIONS["truncate-largest-data-file"](tmp_path / "2")
    CORRUPTIONS["garble-json-metadata"](tmp_path / "1")
    ckpt = Checkpointer(tmp_path, keep=5)
    with pytest.warns(CheckpointFallbackWarning) as record:
        with pytest.raises(NoRestorableCheckpointError) as info:
            ckpt.restore(abstract(make_state(0)))
    assert [str(w.message).split(" in ")[0] for w in record] == ["checkpoint step 3", "checkpoint step 2"]
    message = str(info.value)
    assert "tried:" in message
    for step in (3, 2, 1):
        assert f"step {step}: " in message
    assert "JSONDecodeError" in message  # the reason is given, not just the step
    ckpt.close()


def test_failed_reads_leave_no_stray_exceptions_behind(tmp_path, monkeypatch, caplog):
    """Orbax strands sibling reads when one fails; they must not surface later as unraisable exceptions,
    nor as asyncio's "Task was destroyed but it is pending!" log records."""
    leaked = []
    monkeypatch.setattr(sys, "unraisablehook", leaked.append)
    rng = np.random.default_rng(0)
    state = {f"layer{i}": jnp.asarray(rng.standard_normal((64, 64), dtype=np.float32)) for i in range(24)}
    with Checkpointer(tmp_path, keep=None) as ckpt:
        ckpt.save(1, state, {})
    for trial in range(6):
        shutil.rmtree(tmp_path / "2", ignore_errors=True)
        shutil.copytree(tmp_path / "1", tmp_path / "2")
        # Array data files only: the small `d/` files hold B-tree nodes, some superseded and never read.
        data = sorted(
            (f for f in (tmp_path / "2" / "state").rglob("d/*") if f.is_file() and f.stat().st_size > 4096),
            key=lambda f: f.stat().st_size,
        )
        victim = data[-1 - trial % min(3, len(data))]
        if trial % 2:
            os.truncate(victim, 7)
        else:
            victim.unlink()
        with Checkpointer(tmp_path, keep=None) as ckpt, pytest.warns(CheckpointFallbackWarning, match="step 2"):
            assert ckpt.restore(abstract(state))[0] == 1
    time.sleep(0.2)
    gc.collect()
    assert leaked == []
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


# Each assumption of jpipe/train/orbax_shim.py, one test each: a failure names the assumption that broke.
SHIM = "jpipe/train/orbax_shim.py relies on this; re-check the shim against the new versions"


def test_orbax_shim_assumption_new_event_loops_come_from_the_policy():
    before = asyncio.get_event_loop_policy()
    with orbax_read_scope():
        loop = asyncio.new_event_loop()
        with orbax_read_scope():  # nested (another read in another thread)
            pass
        assert type(loop) is ReadLoop, f"asyncio.new_event_loop() no longer asks the event loop policy; {SHIM}"
        loop.close()
    assert asyncio.get_event_loop_policy() is before
    other = asyncio.new_event_loop()
    assert type(other) is not ReadLoop
    other.close()


def test_orbax_shim_assumption_orbax_reads_on_a_new_loop_it_closes(tmp_path, monkeypatch):
    closed = []
    original_close = ReadLoop.close
    monkeypatch.setattr(ReadLoop, "close", lambda self: (closed.append(self), original_close(self))[-1])
    with Checkpointer(tmp_path, keep=None, async_save=False) as ckpt:
        ckpt.save(1, make_state(1), {})
        assert ckpt.restore(abstract(make_state(0)))[0] == 1
    assert closed and all(loop.is_closed() for loop in closed), (
        f"orbax's restore no longer runs on a loop from asyncio.new_event_loop() that it then closes; {SHIM}"
    )


def test_orbax_shim_assumption_tensorstore_cancels_a_read_whose_awaiter_is_cancelled():
    ts = pytest.importorskip("tensorstore")
    promise, future = ts.Promise.new()

    async def read():
        return await future

    loop = ReadLoop()
    task = loop.create_task(read())
    loop.run_until_complete(asyncio.sleep(0))  # the task is now awaiting the tensorstore future
    loop.close()  # what orbax does after a failed read: the ReadLoop cancels the task and lets it finish
    assert task.cancelled()
    assert future.cancelled(), f"cancelling an asyncio await of a tensorstore.Future no longer cancels it; {SHIM}"
    del promise


def test_orbax_shim_assumption_tensorstore_delivers_late_results_through_call_soon_threadsafe(monkeypatch):
    ts = pytest.importorskip("tensorstore")
    leaked = []
    monkeypatch.setattr(sys, "unraisablehook", leaked.append)
    calls = []

    class Recording(ReadLoop):
        def call_soon_threadsafe(self, callback, *args, context=None):
            calls.append(self.is_closed())
            return super().call_soon_threadsafe(callback, *args, context=context)

    promise, future = ts.Promise.new()

    async def start_awaiting():
        return future.__await__()

    loop = Recording()
    awaiting = loop.run_until_complete(start_awaiting())
    asyncio.SelectorEventLoop.close(loop)  # closed under a pending read (no cancelling), as orbax does
    promise.set_result(1)  # the read completes after the close
    assert calls == [True], f"tensorstore no longer delivers an awaited result via loop.call_soon_threadsafe; {SHIM}"
    assert leaked == []  # the ReadLoop dropped it: no "Event loop is closed"
    del awaiting


def test_explicit_step_never_falls_back(tmp_path):
    _three_steps(tmp_path)
    CORRUPTIONS["truncate-largest-data-file"](tmp_path / "3")
    ckpt = Checkpointer(tmp_path, keep=5)
    with pytest.raises(NoRestorableCheckpointError, match=r"step 3: "):
        ckpt.restore(abstract(make_state(0)), step=3)
    with pytest.raises(NoRestorableCheckpointError, match=r"no checkpoint for step 4 .* committed steps: \[1, 2, 3\]"):
        ckpt.restore(abstract(make_state(0)), step=4)
    assert ckpt.restore(abstract(make_state(0)), step=2)[0] == 2
    ckpt.close()


def test_empty_directory_raises(tmp_path):
    with pytest.raises(NoRestorableCheckpointError, match="no complete checkpoint"):
        Checkpointer(tmp_path).restore(abstract(make_state(0)))


# ---------------------------------------------------------------------------------- (4) mismatch


def _mismatch_cases() -> dict:
    def shape(t):
        t["params"]["w"] = jax.ShapeDtypeStruct((16, 31), jnp.float32)

    def dtype(t):
        t["params"]["b"] = jax.ShapeDtypeStruct((32,), jnp.bfloat16)

    def missing_leaf(t):
        del t["params"]["b"]

    def extra_leaf(t):
        t["params"]["gamma"] = jax.ShapeDtypeStruct((32,), jnp.float32)

    def structure(t):
        t["opt"] = t["opt"] + ({"mu": jax.ShapeDtypeStruct((3,), jnp.float32)},)

    return {
        "shape": (shape, [r"params/w: expected shape \(16, 31\) dtype float32, found shape \(16, 32\) dtype float32"]),
        "dtype": (dtype, [r"params/b: expected shape \(32,\) dtype bfloat16, found shape \(32,\) dtype float32"]),
        "missing": (missing_leaf, [r"params/b: found shape \(32,\) dtype float32 in the checkpoint, not in the req"]),
        "extra": (extra_leaf, [r"params/gamma: expected shape \(32,\) dtype float32, not in the checkpoint"]),
        "structure": (structure, [r"opt/2/mu: expected shape \(3,\) dtype float32, not in the checkpoint"]),
    }


@pytest.mark.parametrize("case", sorted(_mismatch_cases()))
def test_mismatched_template_names_the_leaf(tmp_path, case):
    edit, patterns = _mismatch_cases()[case]
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, make_state(5), {})
    template = abstract(make_state(0))
    edit(template)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint step 5 does not match") as info:
        ckpt.restore(template)  # no fallback warning: a wrong template is not a corrupt checkpoint
    for pattern in patterns:
        assert any(re.search(pattern, line) for line in str(info.value).splitlines()), str(info.value)
    ckpt.close()


# ------------------------------------------------------------------------------ (5) no clobbering


def test_saving_an_existing_step_raises_and_keeps_the_good_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(10, make_state(10), {"v": 1})
    with pytest.raises(CheckpointExistsError, match="step 10 already exists"):
        ckpt.save(10, make_state(11), {"v": 2})  # still in flight or committed: refused either way
    ckpt.close()
    reopened = Checkpointer(tmp_path)
    with pytest.raises(CheckpointExistsError, match="refusing to overwrite"):
        reopened.save(10, make_state(12), {"v": 3})
    step, state, meta = reopened.restore(abstract(make_state(0)))
    assert (step, meta) == (10, {"v": 1})
    assert_same(state, make_state(10))
    reopened.close()


def test_bad_arguments_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="keep must be a positive int"):
        Checkpointer(tmp_path, keep=0)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(TypeError, match=r"state leaf 'step' is a int"):
        ckpt.save(1, {"step": 3, "w": np.zeros(2)}, {})
    with pytest.raises(TypeError, match="metadata is not JSON-serialisable"):
        ckpt.save(1, {"w": np.zeros(2)}, {"when": object()})
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        ckpt.save(-1, {"w": np.zeros(2)}, {})
    assert ckpt.all_steps() == []
    ckpt.close()
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.save(1, {"w": np.zeros(2)}, {})
