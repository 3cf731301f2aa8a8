"""Multi-host through jax.distributed, exercised with local processes over loopback (gloo)."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from jpipe.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
# tiny GPT on data 2 x stage 4: with 2 processes x 4 devices, stages 0-1 live on process 0 and 2-3 on 1.
RUN = ["--preset", "tiny", "--data", "2", "--stages", "4", "--steps", "5", "--eval-every", "100"]


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return env


def _losses(out: pathlib.Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    single = subprocess.run(
        [sys.executable, "-m", "jpipe.train", *RUN, "--out", str(tmp_path / "one")],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(
        [sys.executable, "-m", "jpipe.launch", "--processes", "2", "--", *RUN, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    assert "mesh: data=2 x stage=4 x tensor=1 (8 cpu devices)" in double.stdout
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert two == pytest.approx(one, rel=1e-6)
    assert (tmp_path / "two" / "checkpoints" / "5").is_dir()


@pytest.mark.slow
def test_a_killed_peer_stops_the_other_process_with_an_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "run"
    logs = [tmp_path / f"process-{i}.log" for i in range(2)]
    handles = [open(log, "w") for log in logs]  # noqa: SIM115 - closed in finally
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jpipe.train",
                *RUN,
                "--steps",
                "1000",
                "--checkpoint-every",
                "1000",
                "--out",
                str(out),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--heartbeat-timeout",
                "10",
            ],
            stdout=handles[i],
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=ROOT,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        deadline = time.time() + 300
        while "step 3/" not in logs[0].read_text():
            assert time.time() < deadline, logs[0].read_text()[-2000:]
            assert processes[0].poll() is None, logs[0].read_text()[-2000:]
            time.sleep(0.2)
        processes[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        code = processes[0].wait(timeout=60)
        assert time.time() - killed_at < 60
        assert code != 0
        assert "another task died" in logs[0].read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for handle in handles:
            handle.close()
