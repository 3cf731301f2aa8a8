"""Start several local processes of one training run (multi-host on one machine, over loopback).

    python -m jpipe.launch --processes 2 -- --preset tiny --out runs/two-process

Each process runs `python -m jpipe.train <args> --coordinator 127.0.0.1:PORT --num-processes N
--process-id I` with its share of fake CPU devices and gloo collectives: the same code path as a
real multi-host run, where each host starts its process itself (see tpu_scripts/). The training
flags are checked once, before any process starts (a bad one is a one-line error, exit status 2).
Process 0's output is shown; the others' goes to `<out>/process-<i>.log` (the run's `--out`). If a
process fails, the launcher stops the rest and exits with that process's return code.
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
        children.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT if index else None))
    try:
        return _watch(children)
    finally:
        for log in logs:
            log.close()


def _watch(children: list[subprocess.Popen]) -> int:
    """Wait for all; when one fails, stop the others and return its code."""
    while True:
        codes = [child.poll() for child in children]
        failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
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
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
