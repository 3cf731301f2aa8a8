"""The training system: CLI errors, resume after kill -9, layout-changing resume, NaN stop, quick start."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jpipe.train import cli
from jpipe.train.config import ConfigError
from jpipe.train.metrics import flat_metrics, read_metrics, routing_summary
from jpipe.train.presets import preset

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _standard_promotion():
    """optax mixes Python floats with int32 step counts, which strict promotion refuses."""
    import jax

    with jax.numpy_dtype_promotion("standard"):
        yield


def _tiny(out: pathlib.Path, **run_changes):
    config = preset("tiny")
    return dataclasses.replace(config, run=dataclasses.replace(config.run, out=str(out), **run_changes))


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "jpipe.train", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def _losses(out: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


class TestCommandLineErrors:
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--stages", "0"], "--stages: parallel.stage: must be an integer >= 1, got 0"),
            (["--schedule", "1f2b"], "unknown schedule '1f2b'; known: 1f1b, dualpipev"),
            (["--remat", "most"], "--remat: parallel.remat: expected one of"),
            (["--batch-size", "7"], "data.batch_size (7) must divide into microbatches x data"),
            (["--steps", "0"], "--steps: run.steps: must be >= 1, got 0"),
            (["--data-path", "/no/such/place"], "--data-path: data.path: '/no/such/place' does not exist"),
            (["--preset", "huge"], "--preset: unknown preset 'huge'"),
            (["--profile-steps", "5..3"], "--profile-steps: run.profile_steps: the first step comes after the last"),
            (["--profile-steps", "x"], "--profile-steps: run.profile_steps: expected N..M (the first and last step"),
            (["--profile-steps", "3..9"], "--profile-steps: run.profile_steps: the last step must be <= steps (6)"),
            (["--profile-steps", "0..2"], "--profile-steps: run.profile_steps: the first step must be >= 1"),
        ],
    )
    def test_bad_values_are_named_before_anything_runs(self, args, message, capsys):
        assert cli.main(["--preset", "tiny", *args] if "--preset" not in args else args) == 2
        assert message in capsys.readouterr().err

    def test_schedule_rules_are_checked_with_the_config(self):
        with pytest.raises(ConfigError, match="virtual"):
            cli.build_config(cli.parser().parse_args(["--preset", "tiny", "--schedule", "zbv", "--virtual", "3"]))


def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path):
    common = ["--preset", "tiny", "--steps", "8", "--checkpoint-every", "2", "--eval-every", "100"]
    reference = _cli(*common, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "jpipe.train", *common, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until step 5 is done (checkpoint 4 exists), then kill -9
        if (out / "metrics.jsonl").exists() and max(_losses(out), default=0) >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed_at = max(_losses(out))
    assert killed_at < 8, "the run finished before it could be killed"

    resumed = _cli(*common, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout
    expected, actual = _losses(tmp_path / "reference"), _losses(out)
    assert sorted(actual) == list(range(1, 9))
    for step in range(1, 9):
        assert actual[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step


def test_resume_with_another_layout_and_schedule_continues_the_same_run(tmp_path):
    from jpipe.train.loop import train

    base = _tiny(tmp_path / "reference", steps=6, checkpoint_every=3, eval_every=100)
    interleaved = dataclasses.replace(
        base.parallel, stage=2, virtual=2, schedule="interleaved_1f1b", microbatches=2, data=2
    )
    reference = train(dataclasses.replace(base, parallel=interleaved), stream=io.StringIO())

    out = tmp_path / "changed"
    first = dataclasses.replace(
        base, parallel=interleaved, run=dataclasses.replace(base.run, out=str(out), stop_at_step=3)
    )
    train(first, stream=io.StringIO())
    # Same run, now on 4 pipeline devices with one stage each, zero-bubble schedule, no data parallelism.
    other = dataclasses.replace(base.parallel, stage=4, virtual=1, schedule="zb_h1", microbatches=2, data=1)
    second = dataclasses.replace(base, parallel=other, run=dataclasses.replace(base.run, out=str(out)))
    resumed = train(second, resume=True, stream=io.StringIO())
    assert resumed.first_step == 4
    np.testing.assert_allclose(resumed.losses, reference.losses[3:], rtol=1e-5)


def test_nonfinite_loss_stops_without_overwriting_a_good_checkpoint(tmp_path):
    out = tmp_path / "diverge"
    result = _cli(
        "--preset",
        "tiny",
        "--steps",
        "30",
        "--checkpoint-every",
        "1",
        "--learning-rate",
        "1e9",
        "--warmup-steps",
        "0",
        "--out",
        str(out),
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "non-finite loss" in result.stderr and "the last good one" in result.stdout
    records = read_metrics(out / "metrics.jsonl")
    bad_step = next(r["step"] for r in records if r.get("nonfinite"))
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == bad_step - 1


def test_corrupted_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    from jpipe.train.loop import train

    out = tmp_path / "corrupt"
    train(_tiny(out, steps=4, checkpoint_every=2, eval_every=100), stream=io.StringIO())
    latest = out / "checkpoints" / "4"
    for file in latest.rglob("*"):
        if file.is_file() and file.stat().st_size > 0 and "metadata" not in file.name:
            file.write_bytes(b"\0" * 7)
    with pytest.warns(UserWarning, match="4"):
        resumed = train(_tiny(out, steps=4, checkpoint_every=2, eval_every=100), resume=True, stream=io.StringIO())
    assert resumed.first_step == 3


@pytest.mark.slow
def test_readme_quick_start_trains_with_falling_loss(tmp_path):
    """`bash scripts/train.sh` as in the README (output redirected to a temporary folder)."""
    out = tmp_path / "quickstart"
    env = {**os.environ}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        ["bash", "scripts/train.sh", "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh: data=2 x stage=4 x tensor=1 (8 cpu devices)" in result.stdout
    assert "step 150/150" in result.stdout
    losses = _losses(out)
    assert np.mean([losses[s] for s in range(1, 11)]) - np.mean([losses[s] for s in range(141, 151)]) > 1.5
    for name in ("metrics.jsonl", "loss.png", "schedule.png", "schedule.txt", "config.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "checkpoints" / "150").is_dir()
    config = json.loads((out / "config.json").read_text())
    assert config["parallel"]["schedule"] == "1f1b"


def test_checkpoint_written_before_the_pipeline_memory_changes_still_resumes(tmp_path):
    """A tiny-preset checkpoint (step 2 of 4) written by jpipe at commit c36cb8d, before the
    embedding moved into the pipeline and inputs stopped being replicated. Checkpoints are stored
    by layer, so the resumed run must give that version's losses for steps 3 and 4.

    The run read the fixture's own corpus (that commit's README), not the default corpus: the
    Python standard library's sources differ between Python versions, and so would the batches."""
    import shutil

    from jpipe.train.loop import train

    fixture = pathlib.Path(__file__).parent / "fixtures" / "checkpoint-c36cb8d"
    out = tmp_path / "run"
    shutil.copytree(fixture / "2", out / "checkpoints" / "2")
    old = {row["step"]: row["loss"] for row in map(json.loads, (fixture / "metrics.jsonl").read_text().splitlines())}
    config = _tiny(out, steps=4, checkpoint_every=2, eval_every=100)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(fixture / "corpus.md")))
    resumed = train(config, resume=True, stream=io.StringIO())
    assert resumed.first_step == 3
    np.testing.assert_allclose(resumed.losses, [old[3], old[4]], rtol=1e-5)


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tensorboard_scalars(folder: pathlib.Path) -> dict[str, dict[int, float]]:
    """Tag -> step -> value, as TensorBoard reads `folder`'s event files: TFRecord framing (checked with
    its CRCs), files in name order, and a `SessionLog.START` at step s hiding earlier events at steps >= s."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
            record = data[offset + 12 : offset + 12 + length]
            (record_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
            assert header_crc == _masked_crc32c(header) and record_crc == _masked_crc32c(record), path
            offset += 16 + length
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for values in scalars.values():
                    for step in [step for step in values if step >= event.step]:
                        del values[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_metrics_reach_tensorboard_and_profile_steps_write_a_trace(tmp_path):
    """A run stopped at step 2 and resumed to step 4, profiling steps 2..3 (the second half after the
    resume): TensorBoard's scalars equal metrics.jsonl, and each part wrote a non-empty trace."""
    from jpipe.train.loop import train

    out = tmp_path / "run"
    config = _tiny(out, steps=4, checkpoint_every=2, eval_every=2, profile_steps="2..3")
    first = io.StringIO()
    train(dataclasses.replace(config, run=dataclasses.replace(config.run, stop_at_step=2)), stream=first)
    resumed = io.StringIO()
    train(config, resume=True, stream=resumed)

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for name, value in record.items():
            if name != "step":
                expected.setdefault(name, {})[record["step"]] = value
    assert set(expected) == {"loss", "grad_norm", "learning_rate", "step_seconds", "tokens_per_second", "eval_loss"}
    scalars = _tensorboard_scalars(out)
    assert scalars.keys() == expected.keys()
    for name, values in expected.items():
        assert scalars[name].keys() == values.keys(), name
        for step, value in values.items():
            assert scalars[name][step] == pytest.approx(value, rel=1e-6), (name, step)

    traces = sorted((out / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 2 and all(trace.stat().st_size > 0 for trace in traces)
    assert "profile: tracing steps 2..3" in first.getvalue()
    assert "profile: tracing steps 3..3" in resumed.getvalue()
    assert "profile: wrote the trace of steps 2..2 (the run stopped before step 3) to " in first.getvalue()
    assert "profile: wrote the trace of steps 3..3 to " in resumed.getvalue()
    for log in (first.getvalue(), resumed.getvalue()):
        assert str(out / "profile" / "plugins" / "profile") in log
    assert "TensorBoard event files (tensorboard --logdir" in first.getvalue()


def test_auxiliary_metrics_are_logged_as_flat_scalars():
    """A step's metrics in metrics.jsonl: scalars as they are, vectors as their largest and smallest entries."""
    metrics = {"balance_loss": np.float32(4.5), "expert_load": np.array([0.1, 0.4, 0.5]), "dropped_fraction": 0.25}
    flat = flat_metrics(metrics)
    assert flat == pytest.approx(
        {"balance_loss": 4.5, "expert_load_max": 0.5, "expert_load_min": 0.1, "dropped_fraction": 0.25}
    )
    assert all(type(value) is float for value in flat.values())
    assert routing_summary(flat) == "  balance 4.500  dropped 25.0%  expert load 0.100-0.500"
    assert routing_summary({"loss": 1.0}) == ""
