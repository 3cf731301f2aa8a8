"""Crash-safe training checkpoints on top of `orbax.checkpoint.CheckpointManager`.

One `Checkpointer` owns one directory. Each step is a folder `<directory>/<step>/` holding two items:
`state` (a pytree of arrays: params, optimizer state, RNG key data...) written by orbax's
`StandardCheckpointHandler`, and `meta` (a JSON-able dict: data position, config, layout) written by
its `JsonCheckpointHandler`.

Guarantees, each covered by `tests/test_checkpoint.py`:

- **Atomic steps.** Orbax writes a step into `<step>.orbax-checkpoint-tmp...` and renames it to
  `<step>` only after every file (and `commit_success.txt`) is written. A process killed mid-save
  (even with SIGKILL) leaves only a temporary folder, which `latest_step()`/`all_steps()` ignore and
  the next `Checkpointer` on the directory deletes (it names it in `discarded_unfinished`). A step
  whose asynchronous save is still in flight is not reported either.
- **Keep-last-N.** `keep` newest steps are retained; older ones are deleted only after the newer
  save has committed.
- **Fallback on corruption.** `restore()` (no explicit step) tries the newest step first; if it
  cannot be read, it emits a `CheckpointFallbackWarning` naming the step and the reason and tries the
  next older one. If none can be read, `NoRestorableCheckpointError` lists every step tried and why.
- **Clear mismatch errors.** Before reading any data, the requested tree structure, shapes and dtypes
  are compared with the checkpoint's own metadata; a difference raises `CheckpointMismatchError`
  naming each differing leaf with the expected and the found value (no silent cast, pad or
  truncation). A mismatch is a caller error, so it never triggers the fallback.
- **No clobbering.** Saving a step that already exists raises `CheckpointExistsError`; a good
  checkpoint is never overwritten. The one exception is a step that this `Checkpointer`'s own
  `restore()` found unreadable: saving that step again first moves the bad folder aside to
  `<step>.corrupt-<time>` (with a warning) so a resumed run can re-save it.

Typical use::

    ckpt = Checkpointer(out / "checkpoints", keep=3)
    if ckpt.latest_step() is not None:
        step, state, meta = ckpt.restore(abstract_state)   # ShapeDtypeStructs with shardings
    ...
    ckpt.save(step, state, {"data_position": pos, "config": cfg})   # returns once arrays are copied
    ...
    ckpt.close()   # waits for the last asynchronous save

Restored leaves take the kind of their template leaf: a `jax.ShapeDtypeStruct` or `jax.Array`
template gives a `jax.Array` on the template's sharding (on `jax.local_devices()[0]` when a
`ShapeDtypeStruct` has no sharding); a NumPy template gives a NumPy array. The metadata comes back
as `json.loads` would give it (tuples become lists, dict keys become strings).
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_manager import StepAlreadyExistsError

from jpipe.train.orbax_shim import orbax_read_scope

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFallbackWarning",
    "CheckpointMismatchError",
    "Checkpointer",
    "NoRestorableCheckpointError",
]

_STATE = "state"
_META = "meta"
_MAX_LISTED_DIFFERENCES = 12
_UNFINISHED = re.compile(r"\d+\.orbax-checkpoint-tmp.*")  # orbax's folder for a step being written


class CheckpointError(RuntimeError):
    """Base class of the checkpoint layer's errors."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """Saving a step that already has a checkpoint (it is never overwritten)."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The requested state's tree structure, shapes or dtypes differ from the checkpoint's."""


class NoRestorableCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint could be restored (none exists, or every candidate is unreadable)."""


class CheckpointFallbackWarning(UserWarning):
    """A checkpoint step could not be read and an older one is used instead."""


def _leaf_kind_error(path: str, leaf: Any) -> str | None:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        return None
    return (
        f"state leaf {path!r} is a {type(leaf).__name__}; only jax/NumPy arrays can be saved "
        "(wrap scalars with np.asarray, or put plain values in `metadata`)"
    )


def _key_name(entry: Any) -> str:
    """One path entry as orbax names it on disk (namedtuple fields and dict keys by name, sequences by index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(_key_name(entry) for entry in path) or "<root>"


def _flatten(tree: Any, is_leaf: Any = None) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {_path_str(path): leaf for path, leaf in leaves}


def _is_array_metadata(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _describe(shape: Any, dtype: Any) -> str:
    return f"shape {tuple(shape)} dtype {np.dtype(dtype).name}"


def _is_key_dtype(dtype: Any) -> bool:
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _to_restore_target(template: Any) -> Any:
    """The tree orbax restores into: ShapeDtypeStructs with shardings, NumPy arrays where NumPy is asked for."""

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, (np.ndarray, np.generic)):
            return np.asarray(leaf)  # a NumPy target makes orbax restore NumPy
        if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
            sharding = getattr(leaf, "sharding", None)
            if sharding is None:
                sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        raise TypeError(
            f"abstract_state leaves must be jax.ShapeDtypeStruct, jax.Array or NumPy arrays; got {type(leaf).__name__}"
        )

    return jax.tree.map(convert, template)


def _match_template(template: Any, restored: Any) -> Any:
    """Give each restored leaf the kind (NumPy or jax.Array on a sharding) of its template leaf."""

    def fix(target: Any, value: Any) -> Any:
        if isinstance(target, np.ndarray):
            return np.asarray(value)
        if not isinstance(value, jax.Array) or value.sharding != target.sharding:
            return jax.device_put(value, target.sharding)
        return value

    return jax.tree.map(fix, template, restored)


class Checkpointer:
    """Periodic, asynchronous, crash-safe checkpoints of a train state plus JSON metadata.

    Args:
        directory: folder holding one sub-folder per saved step (created if missing). Local paths
            are made absolute; `gs://`-style paths are passed to orbax unchanged.
        keep: how many of the newest steps to retain (`None`: keep all).
        async_save: if True, `save` returns once the arrays are copied off the accelerator and the
            files are written by a background thread; call `wait()` (or `close()`) to block until
            they are committed. If False, `save` returns after the step is committed.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int | None = 3, async_save: bool = True) -> None:
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive int or None (keep every step), got {keep!r}")
        text = os.fspath(directory)
        self._directory = epath.Path(text if "://" in text else os.path.abspath(text))
        self._keep = keep
        # Read before orbax deletes them (cleanup_tmp_directories below), so a resume can say so.
        self._discarded = _unfinished_saves(self._directory)
        self._async = bool(async_save)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=self._async,
            cleanup_tmp_directories=True,  # remove half-written steps left by a killed process
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=options,
            item_handlers={_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()},
        )
        self._in_flight: int | None = None  # step of an async save that may not have committed yet
        self._unreadable: set[int] = set()  # steps this object's restore() found corrupt
        self._closed = False

    # ----------------------------------------------------------------------------------- queries

    @property
    def directory(self) -> epath.Path:
        """The checkpoint folder."""
        return self._directory

    @property
    def discarded_unfinished(self) -> tuple[str, ...]:
        """Folders of unfinished saves (`<step>.orbax-checkpoint-tmp*`) found on opening.

        Orbax deletes them in the background; the first `save` waits for that.
        """
        return self._discarded

    @property
    def unreadable_steps(self) -> tuple[int, ...]:
        """Steps this object's `restore()` found unreadable (and skipped), ascending."""
        return tuple(sorted(self._unreadable))

    def _step_path(self, step: int) -> epath.Path:
        return self._directory / str(step)

    def all_steps(self) -> list[int]:
        """Committed steps, ascending. Half-written steps and a still-running async save are excluded."""
        steps = sorted(int(s) for s in self._manager.all_steps())
        if self._in_flight is not None:
            if self._step_path(self._in_flight).exists():  # the rename is atomic: present means committed
                self._in_flight = None
            else:
                steps = [s for s in steps if s != self._in_flight]
        return steps

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -------------------------------------------------------------------------------------- save

    def save(self, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
        """Save `state` (a pytree of jax/NumPy arrays) and `metadata` (a JSON-able dict) as `step`.

        With `async_save=True` this returns once the arrays are copied to host memory; the write
        continues in the background (a previous pending save is waited for first).

        Raises:
            CheckpointExistsError: `step` already has a checkpoint (committed or being written).
            TypeError: a state leaf is not an array, or `metadata` is not JSON-serialisable.
        """
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        problems = [err for path, leaf in _flatten(state).items() if (err := _leaf_kind_error(path, leaf))]
        if problems:
            raise TypeError("; ".join(problems))
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as err:
            raise TypeError(f"metadata is not JSON-serialisable: {err}") from err

        self.wait()  # one save in flight at a time; also makes the existence check below exact
        if step in self._unreadable and self._step_path(step).exists():
            self._quarantine(step)
        if step in self._manager.all_steps() or self._step_path(step).exists():
            raise CheckpointExistsError(
                f"checkpoint step {step} already exists in {self._directory}; refusing to overwrite it "
                "(delete it by hand if it really should be replaced)"
            )
        args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(dict(metadata))})
        try:
            # force=True: the caller decides when to save; orbax still refuses existing steps.
            self._manager.save(step, args=args, force=True)
        except StepAlreadyExistsError as err:
            raise CheckpointExistsError(
                f"checkpoint step {step} already exists in {self._directory}; refusing to overwrite it"
            ) from err
        if self._async:
            self._in_flight = step

    def _quarantine(self, step: int) -> None:
        """Move an unreadable step aside (`<step>.corrupt-<time>`) so that it can be saved again."""
        target = self._directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9}"
        if jax.process_index() == 0:
            self._step_path(step).rename(target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"jpipe_checkpoint_quarantine_{step}_{target.name}")
        self._manager.reload()
        self._unreadable.discard(step)
        warnings.warn(
            f"checkpoint step {step} was unreadable; moved it to {target.name} before saving step {step} again",
            CheckpointFallbackWarning,
            stacklevel=3,
        )

    def wait(self) -> None:
        """Block until every pending asynchronous save is committed (re-raises a failed save's error)."""
        self._manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._manager.close()
        self._in_flight = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"Checkpointer for {self._directory} is closed")

    # ----------------------------------------------------------------------------------- restore

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
        """Restore `(step, state, metadata)`.

        Args:
            abstract_state: the pytree to restore into; leaves are `jax.ShapeDtypeStruct` (with
                `sharding` to place the result), `jax.Array` (its sharding is used) or NumPy arrays.
                Tree structure, shapes and dtypes must equal the checkpoint's.
            step: the step to restore; None means the newest readable one, falling back to older
                steps (with a `CheckpointFallbackWarning`) when newer ones are corrupt. An explicit
                step never falls back.

        Raises:
            NoRestorableCheckpointError: no checkpoint exists, `step` does not exist, or every
                candidate is unreadable (the message lists each step tried and why).
            CheckpointMismatchError: the template differs from the checkpoint (which leaf, expected vs
                found).
        """
        self._check_open()
        self.wait()
        available = self.all_steps()
        if step is not None:
            step = int(step)
            if step not in available:
                raise NoRestorableCheckpointError(
                    f"no checkpoint for step {step} in {self._directory}; committed steps: {available}"
                )
            candidates = [step]
        else:
            candidates = sorted(available, reverse=True)
            if not candidates:
                raise NoRestorableCheckpointError(f"no complete checkpoint in {self._directory}")
        target = _to_restore_target(abstract_state)

        failures: list[tuple[int, str]] = []
        for index, candidate in enumerate(candidates):
            try:
                with orbax_read_scope():
                    saved = self._saved_tree(candidate)
            except Exception as err:  # noqa: BLE001 - any read failure means this step is unusable
                reason = _reason(err)
            else:
                _check_compatible(target, saved, candidate)  # caller error: raise, no fallback
                try:
                    with orbax_read_scope():
                        restored = self._manager.restore(
                            candidate,
                            args=ocp.args.Composite(
                                **{_STATE: ocp.args.StandardRestore(target), _META: ocp.args.JsonRestore()}
                            ),
                        )
                    metadata = restored[_META]
                    if not isinstance(metadata, dict):
                        raise ValueError(f"metadata item is {type(metadata).__name__}, not a JSON object")
                    state = _match_template(target, restored[_STATE])
                except Exception as err:  # noqa: BLE001
                    reason = _reason(err)
                else:
                    return candidate, state, metadata
            failures.append((candidate, reason))
            self._unreadable.add(candidate)
            if step is None and index + 1 < len(candidates):
                warnings.warn(
                    f"checkpoint step {candidate} in {self._directory} is unreadable ({reason}); "
                    f"falling back to step {candidates[index + 1]}",
                    CheckpointFallbackWarning,
                    stacklevel=2,
                )
        tried = "\n".join(f"  step {s}: {why}" for s, why in failures)
        raise NoRestorableCheckpointError(f"no restorable checkpoint in {self._directory}; tried:\n{tried}")

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata saved with `step` (default: the newest), without reading the state.

        Raises NoRestorableCheckpointError when there is no such step.
        """
        self._check_open()
        self.wait()
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self.all_steps():
            raise NoRestorableCheckpointError(f"no checkpoint for step {step} in {self._directory}")
        with orbax_read_scope():
            restored = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        metadata = restored[_META]
        return metadata if isinstance(metadata, dict) else {}

    def _saved_tree(self, step: int) -> Any:
        """The checkpoint's own tree of array metadata (shape, dtype) for `state` at `step`."""
        item = self._manager.item_metadata(step)[_STATE]
        tree = getattr(item, "tree", item)
        if tree is None:
            raise FileNotFoundError(f"state metadata of step {step} is missing")
        return tree


def _unfinished_saves(directory: epath.Path) -> tuple[str, ...]:
    """Names of the half-written step folders orbax left in `directory` (a killed save), sorted."""
    if not directory.is_dir():
        return ()
    return tuple(sorted(path.name for path in directory.iterdir() if _UNFINISHED.fullmatch(path.name)))


def _reason(err: BaseException) -> str:
    """`Type: message` of the error, plus its innermost cause (where tensorstore puts the real reason)."""

    def short(e: BaseException, limit: int) -> str:
        text = " ".join(str(e).split())
        return f"{type(e).__name__}: {text[:limit] + '...' if len(text) > limit else text}"

    root = err
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return short(err, 200) if root is err else f"{short(err, 120)}; caused by {short(root, 240)}"


def _check_compatible(target: Any, saved_tree: Any, step: int) -> None:
    """Raise CheckpointMismatchError listing every leaf whose presence, shape or dtype differs."""
    expected = _flatten(target)
    found = _flatten(saved_tree, is_leaf=_is_array_metadata)
    differences: list[str] = []
    for path, leaf in expected.items():
        if _is_key_dtype(leaf.dtype):  # typed PRNG keys are stored as their uint32 key data
            leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        if path not in found:
            differences.append(f"{path}: expected {_describe(leaf.shape, leaf.dtype)}, not in the checkpoint")
            continue
        meta = found[path]
        if not _is_array_metadata(meta):
            differences.append(f"{path}: expected an array, checkpoint holds {type(meta).__name__}")
        elif tuple(meta.shape) != tuple(leaf.shape) or np.dtype(meta.dtype) != np.dtype(leaf.dtype):
            differences.append(
                f"{path}: expected {_describe(leaf.shape, leaf.dtype)}, found {_describe(meta.shape, meta.dtype)}"
            )
    for path, meta in found.items():
        if path not in expected:
            what = _describe(meta.shape, meta.dtype) if _is_array_metadata(meta) else type(meta).__name__
            differences.append(f"{path}: found {what} in the checkpoint, not in the requested state")
    if differences:
        shown = differences[:_MAX_LISTED_DIFFERENCES]
        more = len(differences) - len(shown)
        lines = "\n".join(f"  {d}" for d in shown) + (f"\n  ... and {more} more" if more else "")
        raise CheckpointMismatchError(
            f"checkpoint step {step} does not match the requested state ({len(differences)} difference(s)):\n{lines}"
        )
