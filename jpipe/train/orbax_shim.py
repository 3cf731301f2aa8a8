"""Shim: orbax reads whose failure leaves nothing behind (orbax-checkpoint 0.12.8, tensorstore 0.1.86).

The problem. Orbax's synchronous API (`CheckpointManager.restore`, `item_metadata`) runs its reads with
`asyncio_utils.run_sync`: a fresh loop from `asyncio.new_event_loop()`, `run_until_complete`, then
`loop.close()`. When one array read fails, `asyncio.gather` raises while its sibling reads are still
pending, and the loop is closed under them. Later, at unpredictable times, tensorstore completing a
stranded read calls `call_soon_threadsafe` on the closed loop ("Event loop is closed", reported as an
unraisable exception), and the stranded coroutines and tasks, when garbage-collected, are reported
("Exception ignored in: <coroutine ...>", "Task was destroyed but it is pending!", "Task exception was
never retrieved" for siblings whose failure `gather` never got to look at). A corrupt checkpoint that
`Checkpointer.restore` falls back from must not leave that behind. Orbax offers no way around it
(checked for 0.12.8: no option cancels the sibling reads or takes a loop of ours), and no way to find a
corrupt array without reading it (its metadata carries no sizes or checksums of the data).

The shim, all through public asyncio and tensorstore interfaces: inside `orbax_read_scope()`,
`asyncio.new_event_loop()` gives a `ReadLoop` (through an event loop policy that delegates everything
else to the policy in place). A `ReadLoop` closes the way `asyncio.run` does: it first cancels the
tasks still pending and runs until they have finished (tensorstore cancels a read whose awaiting
asyncio future is cancelled), retrieving their errors and running the callbacks still queued; and a
completion that tensorstore still
delivers after the close (a read already finishing when it was cancelled) is dropped, as nothing can
run on the loop any more. Its assumptions are asserted one by one by
`tests/test_checkpoint.py::test_orbax_shim_assumption_*`; when an upgrade breaks one, that test fails
and names it. On Python 3.14 event loop policies are deprecated (removal planned for 3.16): the
scope's `DeprecationWarning` then fails the tests (pytest's `filterwarnings = error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["ReadLoop", "orbax_read_scope"]

SETTLE_TIMEOUT_S = 30.0  # how long a closing ReadLoop waits for its cancelled reads to finish


class ReadLoop(asyncio.SelectorEventLoop):
    """An event loop that cancels and finishes its pending tasks on `close()` and ignores late callbacks."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            _cancel_and_settle(self)
        super().close()

    def call_soon_threadsafe(self, callback: Any, *args: Any, context: Any = None) -> Any:
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():  # a read completing after the close: nothing can run here any more
                return None
            raise


def _cancel_and_settle(loop: asyncio.AbstractEventLoop) -> None:
    """Close `loop` the way `asyncio.run` does: cancel its pending tasks and run it until they finish.

    The tasks' errors count as retrieved (the caller already has the read's error). Running the loop
    also runs the callbacks still queued, such as `asyncio.gather`'s, which retrieve the errors of
    reads that failed after the first one.
    """
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        done, _ = loop.run_until_complete(asyncio.wait(pending, timeout=SETTLE_TIMEOUT_S))
        for task in done:
            if not task.cancelled():
                task.exception()
    loop.run_until_complete(loop.shutdown_asyncgens())


class _ReadLoopPolicy(asyncio.AbstractEventLoopPolicy):
    """The policy in place, except that new event loops are `ReadLoop`s."""

    def __init__(self, base: asyncio.AbstractEventLoopPolicy) -> None:
        self.base = base

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return ReadLoop()

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        return self.base.get_event_loop()

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.base.set_event_loop(loop)

    def get_child_watcher(self) -> Any:  # Python < 3.14 only
        return self.base.get_child_watcher()  # type: ignore[attr-defined]

    def set_child_watcher(self, watcher: Any) -> None:  # Python < 3.14 only
        self.base.set_child_watcher(watcher)  # type: ignore[attr-defined]


_lock = threading.Lock()
_depth = 0  # scopes open (in any thread)
_installed: _ReadLoopPolicy | None = None


@contextlib.contextmanager
def orbax_read_scope() -> Iterator[None]:
    """Within it, new event loops (orbax's) are `ReadLoop`s. Nestable and usable from several threads."""
    global _depth, _installed
    with _lock:
        if _depth == 0:
            _installed = _ReadLoopPolicy(asyncio.get_event_loop_policy())
            asyncio.set_event_loop_policy(_installed)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _installed is not None:
                if asyncio.get_event_loop_policy() is _installed:  # unless someone replaced it meanwhile
                    asyncio.set_event_loop_policy(_installed.base)
                _installed = None
