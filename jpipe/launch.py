"""Start several local processes of one training run (multi-host on one machine, over loopback).

    python -m jpipe.launch --processes 2 -- --preset tiny --out runs/two-process

Each process runs `python -m jpipe.train <args> --coordinator 127.0.0.1:PORT --num-processes N
--process-id I` with its share of fake CPU devices and gloo collectives: the same code path as a
real multi-host run, where each host starts its process itself (see tpu_scripts/). The training
flags are checked once, before any process starts (a bad one is a one-line error, exit status 2).
Process 0's output is shown; the others' goes to `<out>/process-<i>.log` (the run's `--out`). If a
process fails, the launcher stops the rest and exits with that process's return code.

The processes run in a session of their own, so a signal for the launcher's process group (Ctrl-C
in a terminal) reaches them once, through the launcher: it forwards SIGTERM, SIGINT and the run's
other `--preemption-signals` to every process. On a preemption signal they all save the same step
and exit with 128 + the signal's number (`jpipe.train.preemption`). A process that exits that way
is not a failure: the launcher waits for the others to finish saving, however long that takes, and
exits with the same status. A second signal is forwarded too: every process exits at once. (In
their own session, the processes outlive a launcher killed with SIGKILL.)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

from jpipe.train.cli import build_config, parse
from jpipe.train.config import ConfigError
from jpipe.train.preemption import exit_status, parse_signals


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jpipe.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="number of local processes")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for python -m jpipe.train (after --)")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes: must be >= 1, got {args.processes}")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:  # check the training flags once, here, rather than in every process
        config = build_config(parse(train_args))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = pathlib.Path(config.run.out)
    out.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    children: list[subprocess.Popen] = []
    logs = []
    signals = parse_signals(config.run.preemption_signals)
    # SIGTERM and SIGINT always: with --preemption-signals none they end the processes, as they end the launcher.
    forwarded = dict.fromkeys([*signals, signal.SIGTERM, signal.SIGINT])
    previous = {signum: signal.signal(signum, _forward(children)) for signum in forwarded}
    for index in range(args.processes):
        command = [
            sys.executable, "-m", "jpipe.train", *train_args,
            "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", str(args.processes),
            "--process-id", str(index),
        ]  # fmt: skip
        if index == 0:
            stdout = None
        else:
            stdout = open(out / f"process-{index}.log", "w")  # noqa: SIM115 - closed below
            logs.append(stdout)
        children.append(
            subprocess.Popen(
                command,
                env=env,
                stdout=stdout,
                stderr=subprocess.STDOUT if index else None,
                start_new_session=True,  # signals reach them through `_forward` only, once each
            )
        )
    try:
        return _watch(children, {exit_status(signum) for signum in signals})
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for log in logs:
            log.close()


def _forward(children: list[subprocess.Popen]):
    """A signal handler that sends the signal it gets to every child still running."""

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.returncode is None:
                child.send_signal(signum)

    return forward


def _watch(children: list[subprocess.Popen], preempted: set[int]) -> int:
    """Wait for all; when one fails, stop the others and return its code.

    An exit status in `preempted` (a process stopped by a preemption signal, its step saved, or ended
    at once by a second one) is not a failure: the others are saving the same step, and are waited
    for. When every process has exited 0 or with such a status, that status is returned (0 when all
    finished).
    """
    while True:
        codes = [_status(child.poll()) for child in children]
        failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0, *preempted)]
        if all(code is not None for code in codes) and not failed:
            return max(codes)
        if failed:
            index, code = failed[0]
            print(f"jpipe.launch: process {index} exited with code {code}; stopping the others", file=sys.stderr)
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            deadline = time.time() + 10
            for child in children:
                try:
                    child.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    child.kill()
            return code if code > 0 else 1
        time.sleep(0.1)


def _status(code: int | None) -> int | None:
    """A return code as a shell shows it: 128 + N for a process ended by signal N."""
    return 128 - code if code is not None and code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
