"""Preemption-safe stopping: a signal ends the run at a step boundary, with the reached step saved.

Schedulers stop jobs with a signal and kill them a grace period later: SIGTERM on preemptible TPU
VMs, Kubernetes and SLURM (`scancel`, the time limit), SIGUSR1 ahead of the limit with SLURM's
`--signal=USR1@SECONDS`, SIGINT from Ctrl-C. `SignalWatch.install(signals)` replaces the default
action of those signals by a handler that only records the first one; the training loop
(`jpipe.train.loop.train`) finishes the step in flight, saves it, waits for the save to commit,
closes its writers and returns, and the command line exits with `exit_status` (128 + the signal's
number, what a shell or Kubernetes reports for a process ended by that signal). The first signal
also gives every watched signal its default action back, so a second one ends the process at once:
orbax commits a checkpoint by renaming its folder, so the last committed checkpoint is never
damaged, and an unfinished save is left as `<step>.orbax-checkpoint-tmp*`, which the next run
discards.

One mechanism only: the command line turns JAX's own preemption service off
(`jax_enable_preemption_service`, whose SIGTERM handler `jax.distributed.initialize` would install),
and it installs these handlers before the JAX backend starts. libtpu (installed with the `tpu`
extra, and loaded by a CPU run too) installs its failure signal handler, which prints a native crash
report, only on signals that still have their default action (seen with libtpu 0.0.42.1), so it
leaves these alone; a handler it had installed earlier would be replaced. Its
`--install_signal_handlers=false` flag (in `LIBTPU_INIT_ARGS`) is not used: it removes every one of
its handlers, SIGSEGV's crash report included, and a flag libtpu does not know makes it exit at
start-up.

Several processes decide together (`StepDecider`): after every step each process contributes the
signal it received (if any) and, on process 0 only, whether `checkpoint_every_minutes` have passed
since the last save; one small all-gather (`multihost_utils.process_allgather`) gives every process
the same answer for the same step, so they all save the same step and stop together, whichever of
them was signalled.

Tests make the timing deterministic with `JPIPE_TEST_SIGNAL` (see `fire_test_signal`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import types
from collections.abc import Sequence

import numpy as np

NO_SIGNALS = "none"
UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)


class SignalNameError(ValueError):
    """A preemption signal list names an unknown or uncatchable signal."""


def parse_signals(text: str) -> tuple[signal.Signals, ...]:
    """`"TERM,INT"` (names with or without `SIG`, any case; "none": none) -> the signals, in order, once each."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if [name.lower() for name in names] == [NO_SIGNALS]:
        return ()
    found: list[signal.Signals] = []
    for name in names:
        upper = name.upper()
        try:
            number = signal.Signals[upper if upper.startswith("SIG") else "SIG" + upper]
        except KeyError:
            raise SignalNameError(
                f"unknown signal {name!r}; expected names such as TERM, INT, USR1 (comma-separated), or none"
            ) from None
        if number in UNCATCHABLE:
            raise SignalNameError(f"{number.name} cannot be caught; expected names such as TERM, INT, USR1")
        if number not in found:
            found.append(number)
    if not found:
        raise SignalNameError(f"no signal named in {text!r}; expected names such as TERM, INT, USR1, or none")
    return tuple(found)


def exit_status(signum: int) -> int:
    """The exit status of a run stopped by signal `signum`: 128 + its number (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + int(signum)


class SignalWatch:
    """Records the first of `signals` the process receives; a second one ends the process at once.

    Build it with `install` (in the main thread); `uninstall` puts the previous handlers back.
    """

    def __init__(self, signals: Sequence[signal.Signals]):
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @classmethod
    def install(cls, signals: Sequence[signal.Signals]) -> SignalWatch:
        watch = cls(signals)
        for signum in watch.signals:
            watch._previous[signum] = signal.signal(signum, watch._handle)
        return watch

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        # Nothing but bookkeeping here: Python runs this between two bytecodes of the main thread,
        # possibly in the middle of a write to stdout.
        if self.received is None:
            self.received = signal.Signals(signum)
        # The next one, of any of them, ends the process at once. As PID 1 (a container's first
        # process) the kernel ignores a signal left to its default action: exit from Python then.
        second = _exit_at_once if os.getpid() == 1 else signal.SIG_DFL
        for watched in self.signals:
            signal.signal(watched, second)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def _exit_at_once(signum: int, frame: types.FrameType | None) -> None:
    os._exit(exit_status(signum))


@dataclasses.dataclass(frozen=True)
class Decision:
    """What every process does after a step.

    Attributes:
      stop_signal: the signal that stops the run (received by any process), or None to go on.
      save_due: `checkpoint_every_minutes` have passed since the last save (on process 0's clock).
    """

    stop_signal: signal.Signals | None
    save_due: bool


class StepDecider:
    """After each step, one decision for all processes: stop (which signal) and whether a timed save is due.

    Args:
      watch: the installed signals (None: signals are not watched).
      checkpoint_every_minutes: save when this many minutes have passed since the last save (None: never).
      processes: how many processes decide together; with more than one, `decide` is a collective
        that every process must call after the same steps.
      lead: whether this process's clock decides `save_due` (process 0).
    """

    def __init__(
        self, watch: SignalWatch | None, checkpoint_every_minutes: float | None, *, processes: int, lead: bool
    ):
        self.watch = watch
        self.interval = None if checkpoint_every_minutes is None else checkpoint_every_minutes * 60.0
        self.processes = processes
        self.lead = lead
        self.last_save = time.monotonic()

    @property
    def active(self) -> bool:
        """Whether there is anything to decide (else `decide` is never needed)."""
        return self.watch is not None or self.interval is not None

    def saved(self) -> None:
        """A checkpoint was just saved: the timed interval starts again."""
        self.last_save = time.monotonic()

    def decide(self) -> Decision:
        """This step's decision, the same on every process (a collective when `processes > 1`)."""
        received = self.watch.received if self.watch is not None else None
        due = self.lead and self.interval is not None and time.monotonic() - self.last_save >= self.interval
        local = np.array([0 if received is None else int(received), int(due)], np.int32)
        if self.processes > 1:
            from jax.experimental import multihost_utils

            gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(self.processes, 2)
            local = gathered.max(axis=0)
        return Decision(signal.Signals(int(local[0])) if local[0] else None, bool(local[1]))


# ----------------------------------------------------------------------------------- test hook
# `JPIPE_TEST_SIGNAL="<where>:<step>[:<count>[:<target>[:<process>]]]"` sends the first watched signal
# `count` times (default 1) to this process (`target` "self", the default) or to its parent
# ("parent": the `jpipe.launch` launcher) when the loop reaches `where` at `step`, on process
# `process` only when given. `where` is "after-step" (the step's update is done) or "in-save" (the
# step's asynchronous checkpoint write has started and may not have committed).
TEST_HOOK_ENV = "JPIPE_TEST_SIGNAL"


def fire_test_signal(where: str, step: int, watch: SignalWatch | None, process: int) -> None:
    """Send the signal `JPIPE_TEST_SIGNAL` asks for at (`where`, `step`); nothing when it is unset."""
    spec = os.environ.get(TEST_HOOK_ENV)
    if not spec or watch is None or not watch.signals:
        return
    parts = spec.split(":")
    at, at_step = parts[0], int(parts[1])
    count = int(parts[2]) if len(parts) > 2 else 1
    target = parts[3] if len(parts) > 3 else "self"
    if (at, at_step) != (where, step) or (len(parts) > 4 and int(parts[4]) != process):
        return
    pid = os.getppid() if target == "parent" else os.getpid()
    for _ in range(count):
        os.kill(pid, watch.signals[0])
