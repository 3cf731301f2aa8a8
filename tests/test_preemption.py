"""Preemption: a signal stops the run after the step in flight, with that step saved; resume is exact.

The runs are subprocesses started as a user's CPU run is: fake CPU devices from the command line and
no JAX_PLATFORMS, so JAX loads libtpu (the `tpu` extra) and its failure signal handler, whose native
crash report must not appear. The signals are sent by the run itself at a chosen point
(`JPIPE_TEST_SIGNAL`, `jpipe.train.preemption.fire_test_signal`), so what they interrupt is fixed.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from jpipe.train import cli
from jpipe.train.metrics import read_metrics
from jpipe.train.preemption import SignalNameError, SignalWatch, StepDecider, exit_status, parse_signals

ROOT = pathlib.Path(__file__).resolve().parent.parent
# 8 steps of the tiny GPT (data 2 x stage 2): the two-process run puts one stage on each process.
RUN = ["--preset", "tiny", "--steps", "8", "--eval-every", "100"]
CRASH_REPORTS = ("Traceback", "SIGTERM received", "FailureSignalHandler", "coredump_hook", "Raising signal")


def _user_env(hook: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("XLA_FLAGS", "JAX_PLATFORMS", "JPIPE_TEST_SIGNAL"):
        env.pop(name, None)
    if hook is not None:
        env["JPIPE_TEST_SIGNAL"] = hook
    return env


def _run(*args: str, hook: str | None = None, module: str = "jpipe.train") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=_user_env(hook),
        cwd=ROOT,
    )


def _losses(path: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(path)}


def _checkpoints(out: pathlib.Path) -> list[str]:
    return sorted((p.name for p in (out / "checkpoints").iterdir()), key=lambda name: (len(name), name))


def _assert_clean(result: subprocess.CompletedProcess) -> None:
    for text in CRASH_REPORTS:
        assert text not in result.stderr, result.stderr[-3000:]


def _assert_same_losses(actual: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(actual) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The losses of the uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    result = _run(*RUN, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return _losses(out / "metrics.jsonl")


def test_signals_mid_save_and_mid_run_save_the_reached_step_and_resume_exactly(tmp_path, reference):
    out = tmp_path / "run"
    common = [*RUN, "--checkpoint-every", "2", "--out", str(out)]

    # SIGTERM while step 4's asynchronous save is being written: that save commits, nothing more runs.
    first = _run(*common, hook="in-save:4")
    assert first.returncode == 143, first.stderr[-3000:]
    assert "preempted at step 4; saved; resume with --resume (SIGTERM: exit status 143)" in first.stdout
    _assert_clean(first)
    assert _checkpoints(out) == ["2", "4"]
    assert max(_losses(out / "metrics.jsonl")) == 4

    # SIGTERM after step 5's update, between two periodic saves: step 5 is saved.
    second = _run(*common, "--resume", hook="after-step:5")
    assert second.returncode == 143, second.stderr[-3000:]
    assert "resumed from step 4" in second.stdout
    assert "preempted at step 5; saved" in second.stdout
    _assert_clean(second)
    assert _checkpoints(out) == ["2", "4", "5"]

    # Two signals while step 6 is being saved: the second ends the process at once (killed by SIGTERM's
    # default action, no crash report); step 5 stays intact, step 6 may or may not have committed.
    third = _run(*common, "--resume", hook="in-save:6:2")
    assert third.returncode == -signal.SIGTERM, third.stderr[-3000:]
    assert "preempted" not in third.stdout
    _assert_clean(third)
    assert "5" in _checkpoints(out)

    # A folder left by a killed save never blocks a resume, which says what it skipped; the clock
    # now saves after every step (agreed by the processes: here one).
    (out / "checkpoints" / "7.orbax-checkpoint-tmp-123").mkdir()
    last = _run(*common, "--resume", "--checkpoint-every-minutes", "1e-9")
    assert last.returncode == 0, last.stderr[-3000:]
    assert "resume: continuing from step " in last.stdout
    assert "7.orbax-checkpoint-tmp-123 (a save that never finished; discarded)" in last.stdout
    assert _checkpoints(out) == ["6", "7", "8"]  # keep 3: step 7 was saved by the clock alone
    _assert_same_losses(_losses(out / "metrics.jsonl"), reference)


@pytest.mark.slow
def test_a_signal_to_the_launcher_stops_both_processes_at_the_same_saved_step(tmp_path, reference):
    out = tmp_path / "two"
    common = ["--processes", "2", "--", *RUN, "--checkpoint-every", "4", "--out", str(out)]
    # Process 1 signals the launcher after step 3; the launcher forwards it to both processes.
    stopped = _run(*common, hook="after-step:3:1:parent:1", module="jpipe.launch")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    _assert_clean(stopped)
    log = (out / "process-1.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    reached = max(_losses(out / "metrics.jsonl"))
    assert max(_losses(out / ".metrics.process1.jsonl")) == reached  # both stopped after the same step
    assert f"preempted at step {reached}; saved" in stopped.stdout
    assert str(reached) in _checkpoints(out) and reached < 8

    # Resumed with a save after every step by process 0's clock: both processes save each one.
    resumed = _run(*common, "--resume", "--checkpoint-every-minutes", "1e-9", module="jpipe.launch")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {reached}" in resumed.stdout
    saved = {step for step in (4, reached) if step <= reached} | set(range(reached + 1, 9))
    assert _checkpoints(out) == [str(step) for step in sorted(saved)[-3:]]  # keep 3
    _assert_same_losses(_losses(out / "metrics.jsonl"), reference)


class TestSignalsAndDecisions:
    def test_signal_names(self):
        assert parse_signals("TERM,int, SIGUSR1,TERM") == (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        assert parse_signals("none") == ()
        assert exit_status(signal.SIGTERM) == 143 and exit_status(signal.SIGINT) == 130
        with pytest.raises(SignalNameError, match="unknown signal 'TREM'"):
            parse_signals("TREM")
        with pytest.raises(SignalNameError, match="SIGKILL cannot be caught"):
            parse_signals("KILL")

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--preemption-signals", "KILL"], "--preemption-signals: run.preemption_signals: SIGKILL cannot be"),
            (["--preemption-signals", "HUP,FOO"], "run.preemption_signals: unknown signal 'FOO'"),
            (
                ["--checkpoint-every-minutes", "0"],
                "--checkpoint-every-minutes: run.checkpoint_every_minutes: must be > 0",
            ),
        ],
    )
    def test_bad_flags_are_one_line(self, args, message, capsys):
        assert cli.main(["--preset", "tiny", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1

    def test_the_first_signal_is_recorded_and_the_next_gets_the_default_action(self):
        watch = SignalWatch.install([signal.SIGUSR2])
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert watch.received == signal.SIGUSR2
            assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
        finally:
            watch.uninstall()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # the handler before install

    def test_the_lead_process_clock_decides_timed_saves(self, monkeypatch):
        now = [100.0]
        monkeypatch.setattr("jpipe.train.preemption.time.monotonic", lambda: now[0])
        lead = StepDecider(None, 2.0, processes=1, lead=True)
        other = StepDecider(None, 2.0, processes=1, lead=False)
        now[0] += 119
        assert not lead.decide().save_due
        now[0] += 1
        assert lead.decide().save_due and not other.decide().save_due
        lead.saved()
        assert not lead.decide().save_due
        assert not StepDecider(None, None, processes=1, lead=True).active
