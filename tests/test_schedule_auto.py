"""`--schedule auto`: the memory limit's forms and errors, the measured per-stage costs, the search on
the command line (schedule.csv written, never worse than the best named schedule, training runs),
its reuse on resume, and `jpipe.compile` with it. One tiny run and its resume as subprocesses."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from jpipe import schedules
from jpipe.compile import compile_training_step
from jpipe.pipeline.costs import StageCosts
from jpipe.train import auto, cli
from jpipe.train.config import ConfigError, MemoryLimit, format_bytes, parse_memory_limit
from jpipe.train.metrics import read_metrics
from jpipe.train.presets import preset

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(*argv: str):
    return cli.build_config(cli.parse(["--preset", "tiny", "--schedule", "auto", *argv]))


@pytest.fixture(autouse=True)
def _standard_promotion():
    """optax mixes Python floats with int32 step counts, which strict promotion refuses."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def measure():
    return auto.measure_model(_config())


class TestMemoryLimit:
    @pytest.mark.parametrize(
        ("text", "limit"),
        [
            ("4", MemoryLimit(stashes=4.0)),
            ("6.5", MemoryLimit(stashes=6.5)),
            (3, MemoryLimit(stashes=3.0)),
            ("512MiB", MemoryLimit(bytes=512 * 2**20)),
            ("2GB", MemoryLimit(bytes=2 * 10**9)),
            ("1.5 GiB", MemoryLimit(bytes=3 * 2**29)),
            ("100kib", MemoryLimit(bytes=102400)),
            ("4096B", MemoryLimit(bytes=4096)),
        ],
    )
    def test_forms(self, text, limit):
        assert parse_memory_limit(text) == limit

    def test_a_number_is_stored_as_a_number_and_bytes_as_written(self):
        assert _config("--memory-limit", "4").parallel.memory_limit == 4.0
        assert _config("--memory-limit", "512MiB").parallel.memory_limit == "512MiB"
        assert _config().parallel.memory_limit is None and _config().parallel.search_time == 30.0

    @pytest.mark.parametrize("text", ["0", "-1", "4 apples", "2PB", "nan", "inf", "GiB", "0B"])
    def test_bad_values_are_one_line_naming_the_flag_before_jax_starts(self, capsys, text):
        assert cli.main(["--preset", "tiny", "--schedule", "auto", f"--memory-limit={text}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --memory-limit: parallel.memory_limit: expected a "), err
        assert "(e.g. 4 or 6.5) or bytes per device with a unit (e.g. 512MiB" in err and f"got '{text}'" in err

    def test_the_search_time_is_checked(self, capsys):
        assert cli.main(["--preset", "tiny", "--schedule", "auto", "--search-time", "0"]) == 2
        assert "--search-time: parallel.search_time: must be seconds > 0, got 0.0" in capsys.readouterr().err

    def test_auto_is_named_among_the_schedules(self):
        with pytest.raises(ConfigError, match="known: 1f1b, dualpipev.*or 'auto' \\(searched\\)"):
            _config("--schedule", "1f2b")


class TestSearch:
    def test_costs_put_the_embedding_first_and_the_head_last(self, measure):
        cost = measure.cost(1)
        assert cost.num_stages == 2 and cost.f[0] > 2.0 and cost.f[1] > cost.f[0] + 1.0  # 2 blocks, + head
        assert cost.i[0] > cost.i[1] and cost.w[0] == cost.w[1]  # the embedding's backward runs in stage 0's I
        assert measure.cost(2).num_stages == 4 and measure.stash_bytes(2) == measure.stash_bytes(1) > 0
        assert measure.stage_costs(1).stash_bytes == 2 * measure.layer.stash_bytes

    def test_a_limit_in_bytes_is_converted_with_the_measured_stash(self, measure):
        limit = 3 * measure.stash_bytes(1)
        out = io.StringIO()
        searched = auto.search_schedule(_config("--memory-limit", f"{limit}B"), measure, out)
        assert math.isclose(searched.limit, 3.0) and searched.result.memory <= 3.0 + 1e-9
        assert "= 3 stashes of" in out.getvalue() and "ratio chosen / best named makespan" in out.getvalue()

    def test_no_fit_names_the_flag_and_the_smallest_limit(self, measure):
        with pytest.raises(ConfigError, match=r"^--memory-limit: 1 microbatch x stage stashes .* smallest limit that"):
            auto.search_schedule(_config("--memory-limit", "1"), measure, io.StringIO())

    def test_compile_searches_too(self, capsys):
        config = _config("--data", "1", "--batch-size", "4", "--microbatches", "4", "--virtual", "2")
        compiled = compile_training_step(config, "cpu:2")
        assert "searching schedules (p=2, m=4, virtual 1..2" in capsys.readouterr().out
        assert compiled.schedule.endswith("m=4 v=2") or compiled.schedule.endswith("m=4 v=1")


# The quick start's model (`--preset quickstart`: 8 blocks of d_model 64 on 4 stages, 8
# microbatches) as `measure_model` measured it on CPU: one block's XLA FLOPs and bytes.
QUICKSTART = auto.ModelMeasure(
    layer=StageCosts(
        flops={"f": 15574784.0, "b": 30573184.0, "i": 17957632.0, "w": 12615552.0},
        stash_bytes=1546764,
        weight_residual_bytes=360448,
    ),
    embed_f=17152.0,
    embed_b=12672.0,
    head_f=4424192.0,
    head_b=8742976.0,
    num_layers=8,
    num_devices=4,
)
LIMITS = [("1", None), ("1", "4.5"), ("1", "5"), ("1", "6"), ("2", "4"), ("2", "6"), ("2", "40MiB")]


@pytest.mark.parametrize(("virtual", "limit"), LIMITS, ids=[f"v{v}-{x}" for v, x in LIMITS])
def test_the_limit_holds_for_the_buffers_the_executor_allocates(virtual, limit):
    """Quick-start costs: `compile_program`'s stash and weight-residual slots of the chosen schedule
    times the measured slot bytes are within the limit (unset: within 1F1B's), and the report prints them."""
    argv = ["--preset", "quickstart", "--schedule", "auto", "--virtual", virtual]
    config = cli.build_config(cli.parse(argv + (["--memory-limit", limit] if limit else [])))
    out = io.StringIO()
    searched = auto.search_schedule(config, QUICKSTART, out)
    chosen = searched.result.schedule
    buffers = auto.executor_buffers(chosen, QUICKSTART, auto.send_latency(config), split=searched.result.split)
    assert (buffers.stash_slots, buffers.weight_slots) == tuple(map(max, zip(*searched.result.slots)))
    assert buffers.stashes == pytest.approx(searched.result.memory, rel=1e-12)
    assert buffers.stashes <= searched.limit + 1e-9
    if limit is None:
        one_f_one_b = auto.executor_buffers(schedules.build("1f1b", 4, 8), QUICKSTART, 0)
        assert buffers.bytes <= one_f_one_b.bytes
    elif limit.endswith("MiB"):
        assert buffers.bytes <= 40 * 2**20
    else:
        assert buffers.bytes <= float(limit) * QUICKSTART.stash_bytes(chosen.virtual) * (1 + 1e-12)
    report = out.getvalue()
    assert f"{buffers.stash_slots} x {format_bytes(buffers.stash_slot_bytes)} + {buffers.weight_slots} x " in report
    assert f"= {format_bytes(buffers.bytes)}" in report and f"limit {searched.limit:.3g} stashes = " in report
    assert "memory/time trade-off of the named schedules (Pareto front" in report


@pytest.mark.parametrize("virtual", ["1", "2"])
def test_within_1_25x_1f1b_memory_auto_is_never_slower_than_1f1b(virtual):
    """Quick-start costs, limit 1.25x the default (1F1B's buffers): the chosen schedule is no slower
    (simulated lockstep) than 1F1B as the search counts it (B split or whole, as the executor runs it)."""
    argv = ["--preset", "quickstart", "--schedule", "auto", "--virtual", virtual, "--search-time", "2"]
    default = auto.search_schedule(cli.build_config(cli.parse(argv)), QUICKSTART, io.StringIO())
    config = cli.build_config(cli.parse([*argv, "--memory-limit", f"{1.25 * default.limit:.6g}"]))
    searched = auto.search_schedule(config, QUICKSTART, io.StringIO())
    one_f_one_b = next(n for n in searched.result.named if n.schedule.name == "1f1b" and n.virtual == 1)
    assert one_f_one_b.memory <= searched.limit and searched.result.memory <= searched.limit + 1e-9
    assert searched.result.makespan <= one_f_one_b.makespan + 1e-9


def test_the_report_and_the_record_keep_the_pareto_front(tmp_path):
    """The named schedules' memory/time front is printed (makespan also relative to 1F1B's) and kept
    in schedule_search.json; v_half and v_min are among the schedules it is taken from."""
    argv = ["--preset", "quickstart", "--schedule", "auto", "--virtual", "2", "--search-time", "2"]
    config = cli.build_config(cli.parse(argv))
    out = io.StringIO()
    searched = auto.search_schedule(config, QUICKSTART, out)
    result = searched.result
    assert {"v_half", "v_min"} <= {n.schedule.name for n in result.named}
    assert [point["label"] for point in searched.front] == [n.label for n in result.front]
    one_f_one_b = next(n for n in result.named if n.schedule.name == "1f1b" and n.virtual == 1)
    report = out.getvalue()
    for point in searched.front:
        ratio = point["makespan"] / one_f_one_b.makespan
        assert f"{point['label']:<34}{point['makespan']:>10.1f}{ratio:>8.3f}  {point['memory']:.3g} stashes" in report
        assert point["bytes"] == int(point["memory"] * QUICKSTART.stash_bytes(point["virtual"]))
    auto.save(tmp_path, searched)
    record = json.loads((tmp_path / auto.SEARCH_JSON).read_text())
    assert record["pareto_front"] == list(searched.front) and record["split"] == result.split


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "jpipe.train", "--preset", "tiny", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_auto_run_writes_its_schedule_trains_and_resumes_with_it(tmp_path, measure):
    out = tmp_path / "run"
    common = ("--steps", "3", "--eval-every", "100", "--out", str(out))
    first = _cli("--schedule", "auto", "--memory-limit", "3", "--stop-at-step", "2", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "searching schedules (p=2, m=2, virtual 1, limit 3 stashes" in first.stdout
    assert "best named" in first.stdout and f"wrote the searched schedule to {out / 'schedule.csv'}" in first.stdout

    record = json.loads((out / "schedule_search.json").read_text())
    schedule = schedules.from_csv((out / "schedule.csv").read_text())
    schedules.validate(schedule)
    assert (schedule.num_devices, schedule.num_microbatches) == (2, 2)
    # Simulated anew under the same measured costs: the searched one is no slower than the best named.
    cost = measure.cost(schedule.virtual)
    searched = schedules.simulate(schedule, cost, "lockstep", split_backward=record["split"])
    named = schedules.build(record["baseline"], 2, 2, record["baseline_virtual"])
    baseline = schedules.simulate(
        named, measure.cost(named.virtual), "lockstep", split_backward=record["baseline_split"]
    )
    assert math.isclose(searched.makespan, record["makespan"]) and max(searched.peak_memory) <= 3 + 1e-9
    assert math.isclose(baseline.makespan, record["baseline_makespan"]) and searched.makespan <= baseline.makespan
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    second = _cli("--resume", "--out", str(out))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resume: training with the schedule searched before" in second.stdout
    assert "searching schedules" not in second.stdout and "step 3/3" in second.stdout
    chart = schedules.render(schedule, width=160).splitlines()
    assert "\n".join(chart[2:]) in second.stdout  # the reused schedule's chart, below its header
    assert math.isfinite(read_metrics(out / "metrics.jsonl")[-1]["loss"])


def test_resume_with_another_layout_searches_again(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    config = _config("--memory-limit", "3")
    searched = auto.AutoSchedule(
        schedules.search_result(2, 2, memory_limit=3, virtual=1), 3.0, 1, auto.search_key(config), ""
    )
    auto.save(out, searched)
    stream = io.StringIO()
    assert auto.saved_schedule(out, config, stream) is not None
    other = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, memory_limit=4.0))
    assert auto.saved_schedule(out, other, stream) is None
    assert "searched for another layout (memory_limit 3.0 -> 4.0); searching again" in stream.getvalue()
    assert auto.saved_schedule(out, preset("tiny"), stream) is None  # a named schedule: nothing to reuse
