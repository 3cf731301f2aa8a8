"""Each experiment script runs at its smallest size, as a user would run it, and writes its table/PNG.

The scripts run in subprocesses without the test suite's XLA_FLAGS, so each one's own fake-device
setup is what is tested.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_experiment(script: str, *args: str, cache: pathlib.Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JPIPE_CACHE": str(cache), "MPLBACKEND": "Agg"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def assert_png(path: pathlib.Path) -> None:
    assert path.exists(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def test_schedule_table(tmp_path, cache):
    result = run_experiment("schedule_table.py", "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "schedule_table.md").read_text()
    assert table in result.stdout
    for name in ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zbv", "dualpipev"):
        assert f"| {name} | 4 | 16 |" in table
        assert_png(tmp_path / f"gantt-{name}-p4-m8.png")
    # The docstring's oracle: 1f1b at p=4, m=16 has async makespan (m+p-1)(F+B) = 57, bubble 3/19.
    assert "| 1f1b | 4 | 16 | 1 | 57 | 0.158 |" in table


def test_parity(tmp_path, cache):
    small = ["--layers", "4", "--d-model", "16", "--heads", "2", "--seq-len", "16", "--batch-size", "4"]
    args = ["--steps", "3", "--schedules", "1f1b", "--stages", "2", "--microbatches", "2", "--corpus-bytes", "200000"]
    result = run_experiment("parity.py", *args, *small, "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "parity.md").read_text()
    assert table in result.stdout
    for run in ("| unpipelined |", "| unpipelined, accumulated |", "| 1f1b | 1 |"):
        assert run in table
    assert_png(tmp_path / "parity.png")
    losses = json.loads((tmp_path / "parity.json").read_text())["losses"]
    assert set(losses) == {"unpipelined", "unpipelined, accumulated", "1f1b"}
    assert all(len(curve) == 3 for curve in losses.values())
    for name in ("unpipelined, accumulated", "1f1b"):
        assert max(abs(a - b) for a, b in zip(losses[name], losses["unpipelined"])) < 1e-4, name
    assert (tmp_path / "runs" / "1f1b" / "metrics.jsonl").exists()


def test_throughput(tmp_path, cache):
    small = ["--layers", "4", "--d-model", "16", "--heads", "2", "--seq-len", "16", "--batch-size", "8"]
    mesh = ["--cpu-devices", "4", "--stages", "2", "--data", "2", "--microbatches", "2"]
    args = ["--schedule", "1f1b", "--steps", "2", "--warmup", "1", *mesh, *small]
    result = run_experiment("throughput.py", *args, "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "throughput.md").read_text()
    assert table in result.stdout
    assert "MFU: not meaningful on CPU" in table
    assert "| 1f1b | 1 | 2 x 2 x 1 | 2 | 8 | 16 |" in table
    record = json.loads((tmp_path / "throughput.json").read_text())
    (row,) = record["results"]
    assert row["tokens_per_second"] > 0 and row["mfu"] is None
    assert record["backend"] == "cpu"


def test_hardware_bench(tmp_path, cache):
    args = ["--quick", "--steps", "1", "--repeats", "1"]  # 1f1b, DP + FSDP, AD-GPipe, one device: 4 fake CPUs
    result = run_experiment("hardware_bench.py", *args, "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "hardware_bench.md").read_text()
    assert table in result.stdout
    record = json.loads((tmp_path / "hardware_bench.json").read_text())
    assert record["backend"] == "cpu" and record["devices"] == 4 and record["peak_tflops"] is None
    versions = record["versions"]
    assert f"4 x cpu (cpu, 1 process(es)); jax {versions['jax']}, jaxlib {versions['jaxlib']}" in table
    rows = {row["name"]: row for row in record["results"]}
    assert list(rows) == ["1f1b", "dp+fsdp (no pipeline)", "ad_gpipe (baseline)", "single device"]
    for row in rows.values():
        assert row["step_seconds"] > 0 and row["predicted_seconds"] > 0 and row["tokens_per_second"] > 0
        assert row["mfu"] is None and math.isfinite(row["loss"])
    assert "| 1f1b | 1 | 2 x 2 x 1 | 2 | 8 |" in table
    assert "| dp+fsdp (no pipeline) | 1 | 4 x 1 x 1 | 1 | 8 |" in table  # same 2 sequences per device-microbatch
    assert "| ad_gpipe (baseline) | 1 | 2 x 2 x 1 | 2 | 8 | no |" in table
    assert "| single device | 1 | 1 x 1 x 1 | 2 | 4 |" in table
    # Same model, initialisation and batch: the three multi-device steps train the same loss.
    losses = [rows[name]["loss"] for name in ("1f1b", "dp+fsdp (no pipeline)", "ad_gpipe (baseline)")]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0])
    # One-device calibration: every stage timed (2 layers per pipeline stage, 4 unpipelined), F, B, I, W > 0.
    calibration = {(c["stage_layers"], c["sequences"]): c["seconds"] for c in record["calibration"]}
    assert set(calibration) == {(2, 2), (4, 2)}
    assert all(seconds[op] > 0 for seconds in calibration.values() for op in "fbiw")
    assert rows["1f1b"]["stage_layers"] == 2 and rows["single device"]["stage_layers"] == 4


def test_throughput_flops_and_peaks():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import throughput
    finally:
        sys.path.remove(str(EXPERIMENTS))
    import jax
    from flax import nnx

    from jpipe.models import GPT, GPTConfig, params_of

    config = GPTConfig(vocab_size=256, seq_len=32, d_model=16, num_heads=2, num_layers=3, mlp_ratio=4)
    shapes = jax.eval_shape(lambda: params_of(GPT(config, rngs=nnx.Rngs(0))))
    flops, matmul_params = throughput.model_flops_per_token(config, shapes)
    d, layers = config.d_model, config.num_layers
    per_block = 4 * d * d + 2 * d * config.d_ff + 2 * d  # q, k, v, o; up, down; two norm scales
    assert matmul_params == layers * per_block + d * 256 + d  # blocks, head projection and final norm
    assert flops == 6 * matmul_params + 12 * layers * d * config.seq_len
    assert throughput.peak_tflops("TPU v5 lite") == 197.0
    assert throughput.peak_tflops("TPU v5") == 459.0
    assert throughput.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert throughput.peak_tflops("cpu") is None


def test_split_costs(tmp_path, cache):
    result = run_experiment("split_costs.py", "--quick", "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "split_costs.md").read_text()
    assert table in result.stdout
    op_rows = [line for line in table.splitlines() if line.startswith("| gpt (seq 32), remat") or "| mlp" in line]
    op_rows = [row for row in op_rows if row.count("|") == 10]  # the op table (9 columns)
    assert len(op_rows) == 3
    for row in op_rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        exact, two_vjps = float(cells[5]), float(cells[6])
        assert exact <= 1.02, row  # the exact split: I + W = B
        assert two_vjps > 1.1, row  # what two vjps would cost
    assert "| gpt (seq 32), remat none | zbv |" in table


@pytest.mark.slow  # about a minute on 2 cores: its --quick subset still compiles 2 m x 10 programs
def test_pipeline_memory(tmp_path, cache):
    result = run_experiment("pipeline_memory.py", "--quick", "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "pipeline_memory.md").read_text()
    assert table in result.stdout
    assert "| ad_gpipe (baseline) | 1 | none | 16 |" in table
    assert "| 1f1b | 1 | none | 16 |" in table
    assert "LM step" in table
    assert "| 1f1b | 1 | 16 |" in table  # an LM-step row
    assert "| gpipe | 1 | 16 |" in table


def test_send_overlap_simulation(tmp_path, cache):
    result = run_experiment(
        "send_overlap.py", "--simulate-only", "--search-seconds", "1", "--out", str(tmp_path), cache=cache
    )
    table = (tmp_path / "send_overlap.md").read_text()
    assert table.strip() in result.stdout
    # zb_h1 at p=4, m=16: 51 ticks without latency; its two streams reach the bound, 54.
    assert "| zb_h1 | 1 | 51 | 71 | 1.392 | 54 | 1.059 | 4 -> 8 | 1.059 |" in table


def test_tp_overlap_counts_the_tick_loops_all_reduces(tmp_path, cache):
    pytest.importorskip("libtpu")
    result = run_experiment("tp_overlap.py", "--schedules", "1f1b,stp braided", "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "tp_overlap.md").read_text()
    assert table.strip() in result.stdout
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    for label in ("1f1b", "stp braided"):
        cells = rows[label]
        in_loop, asynchronous, hidden = int(cells[3]), int(cells[4]), int(cells[5])
        assert in_loop > 0 and 0 <= hidden <= asynchronous <= in_loop  # tensor parallelism's all-reduces
    assert rows["1f1b"][2] == "0" and rows["1f1b"][6] == "0"  # no composites, no braided ticks
    braided = int(rows["stp braided"][6])
    assert int(rows["stp braided"][2]) > 0 and 0 < braided <= int(rows["stp braided"][3])
    assert int(rows["stp braided"][7].split()[0]) > 0  # under the async flags some are hidden


def test_moe_overlap_counts_the_tick_loops_all_to_alls(tmp_path, cache):
    pytest.importorskip("libtpu")
    labels = "dualpipev pairs flattened,dualpipev pairs braided"
    result = run_experiment("moe_overlap.py", "--quick", "--schedules", labels, "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "moe_overlap.md").read_text()
    assert table.strip() in result.stdout and "libtpu" in table
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    flat, braided = rows["dualpipev pairs flattened"], rows["dualpipev pairs braided"]
    for cells in (flat, braided):
        in_loop, asynchronous = int(cells[3]), int(cells[4])
        assert in_loop > 0 and 0 <= int(cells[5].split()[0]) <= asynchronous <= in_loop  # expert parallelism's
    assert flat[6] == "0" and int(braided[6]) > 0  # only braided ticks are braided
    assert int(braided[7].split()[0]) > 0  # under the async all-to-all flag some are hidden


def test_skippipe(tmp_path, cache):
    result = run_experiment("skippipe.py", "--quick", "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "skippipe.md").read_text()
    assert table in result.stdout
    assert "| schedule | costs | lockstep | / 1f1b | async | / 1f1b |" in table
    assert "| run | skip ratio | final train loss | pipeline eval loss | full-model eval loss |" in table
    spans = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1] in ("unit", "measured"):
            spans[cells[0], cells[1]] = (float(cells[2]), float(cells[4]))
    assert len(spans) == 8
    for costs in ("unit", "measured"):
        for mode in (0, 1):  # lockstep, async: skipping half the middle visits shortens the step
            assert spans["skippipe 0.5", costs][mode] < spans["skippipe 0", costs][mode]
    runs = [line for line in table.splitlines() if line.startswith(("| 1f1b | 0 |", "| skippipe-"))]
    assert [line.split("|")[1].strip() for line in runs] == ["1f1b", "skippipe-0.25", "skippipe-0.5"]
    for line in runs:
        losses = [float(cell) for cell in line.split("|")[3:6]]
        assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    # The full pipeline's own eval and the unpipelined full model on the same batches agree.
    full = [float(cell) for cell in runs[0].split("|")[4:6]]
    assert abs(full[0] - full[1]) < 1e-3


def test_lockstep_tax(tmp_path, cache):
    result = run_experiment("lockstep_tax.py", "--quick", "--out", str(tmp_path), cache=cache)
    table = (tmp_path / "lockstep_tax.md").read_text()
    assert table in result.stdout
    rows = [line for line in table.splitlines() if line.startswith("| d64 seq")]
    taxed = [row for row in rows if row.count("|") == 11]
    assert len(taxed) == 2 * 2 * 4  # 2 shapes x 2 remat modes x 4 schedules
    for row in taxed:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        one_op, balanced = float(cells[2]), float(cells[3])
        assert balanced <= one_op, row  # balance_ticks never keeps a slower packing
        if ", full" in cells[0]:
            assert balanced < one_op, row  # remat's heavy I leaves room beside F and W


def test_v_schedules(cache):
    """v_min's stash is half of 1f1b's and v_half's 3/4 at p = 4 (the authors' 2 and 3 of p = 4), and
    the compiled temp memory follows: v_min < v_half < 1f1b."""
    result = run_experiment(
        "v_schedules.py", "--remat", "none", "--microbatches", "8", "--schedules", "v_half", "v_min", cache=cache
    )
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 9 and cells[1] == "none":
            rows[cells[0]] = cells
    stash = {name: float(cells[4]) for name, cells in rows.items()}
    temp = {name: float(cells[7]) for name, cells in rows.items()}
    assert stash["v_min"] == pytest.approx(stash["1f1b"] / 2, rel=0.02)
    assert stash["v_half"] == pytest.approx(stash["1f1b"] * 3 / 4, rel=0.02)
    assert [rows[name][5] for name in ("v_half", "v_min")] == ["3", "2"] == [rows[n][6] for n in ("v_half", "v_min")]
    assert temp["v_min"] < temp["v_half"] < temp["1f1b"]
