"""Executor benchmark: temp memory, compile time and step time of every schedule vs AD-GPipe.

Command (about 15-20 minutes on 2 CPU cores; `--quick` for a 1-2 minute subset):

    .venv/bin/python experiments/pipeline_memory.py --out experiments/out/pipeline

Model: 8 residual MLP layers of width D and hidden 4D on [B, T, D] activations, split into 4 devices
x v chunks (so every layout runs the same model); activations dominate memory. For each schedule,
remat mode and m in {4, 8, 16, 32} it prints the per-device temp bytes from XLA's
`compile().memory_analysis()`, the ratio to the AD-GPipe baseline (the MaxText/Praxis approach) at
the same m, compile time, and (at m = 16) the step time as a ratio to the baseline measured in the
same run.

Costs come from `jpipe.measure_costs` on one stage (chunk) and one microbatch: the stash bytes an F
keeps for its backward, the weight-residual bytes an I keeps for its W, and the op FLOPs. Its
`.cost()` is passed both to `jpipe.value_and_grad(cost=...)` (so `split_backward="auto"` decides
with it) and to the lockstep simulator, so both see the same split. Columns:

- "split": whether each B ran as I then W ("yes"/"no", the executor's "auto" choice,
  `resolve_split`); "I/W" for schedules written with I and W ops, which always run them split
  (dualpipev has both: "I/W, B yes|no").
- "weight residuals KiB / stage-mb": what one I keeps for its W, per stage and microbatch.
- "weight stash MiB": the weight-residual buffer the executor allocated per device
  (`num_weight_slots` x weight-residual bytes; 0 when no I runs).
- "stash / simulated peak": the stash buffer the executor allocated (`num_stash_slots` x stash
  bytes) over the simulator's peak live activations (max `peak_activations` x v x stash bytes).
- "buffers / simulated peak memory": stash plus weight-stash buffers over the simulator's
  `peak_memory` (stash plus weight residuals of the schedule the executor really runs, with the
  measured `Cost`) x v x stash bytes. Above 1 when the two buffers peak at different ticks: each is
  sized for its own peak.
- "temp / simulated peak memory": all of XLA's temp memory (stash, weight stash, inbox, gradient
  accumulators, the current op's temporaries) over the same `peak_memory` prediction.
- "total MiB": temp plus argument plus output bytes per device (`memory_analysis()`'s
  `temp_size_in_bytes + argument_size_in_bytes + output_size_in_bytes`). The `[m, B, T, D]` inputs
  are passed sharded over the pipeline (as the executor stores them: microbatch i on device
  `i // (m / 4)`), so arguments and the returned input gradients grow by m / 4 microbatches per
  device; the replicated targets ([m, B, T, 8]) grow by m.

A second table, "LM step", compiles the GPT training step of `jpipe.models.PipelinedLM`
(`GPTConfig(vocab_size=256, seq_len=64, d_model=128, num_heads=4, num_layers=8)`, 4 sequences per
microbatch, mesh data 1 x stage 4, remat "full", default `split_backward`) abstractly for every
schedule and m in {4, 8, 16, 32}, and reports per-device temp MiB, total MiB and
total(m) / total(m=4) (dualpipev, which needs m >= 8, against its m = 8). The embedding runs inside
the pipeline as the executor's prologue, so no buffer grows with m except the schedule's own
stashes: the total stays flat in m for naive, 1f1b, interleaved_1f1b, zb_h1, zb_h2, zbv and
dualpipev (their stash and weight-stash slots are bounded by the number of devices; interleaved_1f1b,
zb_h2 and zbv reach that bound only at m = 8, so they step up once from m = 4 and then stay flat) and
grows linearly for gpipe and looped_bfs (m stashes per device). With `--quick` the LM table covers
only 1f1b and gpipe at m in {4, 16}, and the executor table leaves out v_half and v_min (zbv's
executor path in other orders; `experiments/v_schedules.py` measures them).

Results: markdown tables on stdout and in `<out>/pipeline_memory.md`.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import jpipe  # noqa: E402
from jpipe import schedules  # noqa: E402
from jpipe.models import GPTConfig, PipelinedLM  # noqa: E402
from jpipe.parallel import make_mesh  # noqa: E402
from jpipe.pipeline import PipelineOptions  # noqa: E402
from jpipe.pipeline.costs import StageCosts  # noqa: E402
from jpipe.pipeline.executor import resolve_split  # noqa: E402
from jpipe.pipeline.gpipe_autodiff import gpipe_autodiff  # noqa: E402
from jpipe.pipeline.stage import layered  # noqa: E402
from jpipe.schedules.ir import Op  # noqa: E402

P = 4
TOTAL_LAYERS = 8
BATCH, SEQ, WIDTH = 4, 32, 64
VIRTUAL = {"interleaved_1f1b": 2, "looped_bfs": 2, "zbv": 2, "dualpipev": 2, "v_half": 2, "v_min": 2}
QUICK_SKIPS = ("v_half", "v_min")  # zbv's executor path in another order; measured by experiments/v_schedules.py
LM_CONFIG = GPTConfig(vocab_size=256, seq_len=64, d_model=128, num_heads=4, num_layers=8)
LM_BATCH = 4  # sequences per microbatch
LM_REMAT = "full"


def layer_fn(params, h):
    """One residual MLP layer: params w1 [D, 4D], w2 [4D, D]; h [B, T, D]."""
    return h + jnp.tanh(h @ params["w1"]) @ params["w2"]


# A stage scans its L layers; `layered` also lets the executor split I and W per layer.
stage_fn = layered(layer_fn)


def loss_fn(loss_params, y, target):
    return jnp.mean((y @ loss_params["head"] - target) ** 2)


def make_problem(num_stages: int, m: int):
    layers = TOTAL_LAYERS // num_stages
    keys = jax.random.split(jax.random.key(0), 5)
    stage_params = {
        "w1": jax.random.normal(keys[0], (num_stages, layers, WIDTH, 4 * WIDTH)) / np.sqrt(WIDTH),
        "w2": jax.random.normal(keys[1], (num_stages, layers, 4 * WIDTH, WIDTH)) / np.sqrt(4 * WIDTH) / 4,
    }
    loss_params = {"head": jax.random.normal(keys[2], (WIDTH, 8)) / np.sqrt(WIDTH)}
    inputs = jax.random.normal(keys[3], (m, BATCH, SEQ, WIDTH))
    targets = jax.random.normal(keys[4], (m, BATCH, SEQ, 8))
    return stage_params, loss_params, inputs, targets


def shard_inputs(problem, mesh):
    """Inputs `[m, ...]` stored sharded over the pipeline, as the executor keeps them (m divisible by P)."""
    stage_params, loss_params, inputs, targets = problem
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("stage"))
    return stage_params, loss_params, jax.device_put(inputs, sharding), targets


def measure(step, problem, time_it: bool, repeats: int = 10) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*problem).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    result = {
        "temp": memory.temp_size_in_bytes,
        "total": memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes,
        "compile_s": compile_s,
        "step_s": float("nan"),
    }
    if time_it:
        jax.block_until_ready(compiled(*problem))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*problem))
            times.append(time.perf_counter() - start)
        result["step_s"] = min(times)
    return result


def lm_step_memory(schedule, mesh) -> dict:
    """Per-device temp and total bytes of the `PipelinedLM` training step, compiled abstractly."""
    pipe = PipelinedLM(LM_CONFIG, schedule=schedule, mesh=mesh, options=PipelineOptions(remat=LM_REMAT))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pipe.abstract_params(), pipe.shardings()
    )
    tokens = jax.ShapeDtypeStruct((schedule.num_microbatches, LM_BATCH, LM_CONFIG.seq_len), jnp.int32)
    start = time.perf_counter()
    compiled = jax.jit(pipe.value_and_grad()).lower(params, tokens, tokens).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    return {"temp": memory.temp_size_in_bytes, "total": total, "compile_s": compile_s}


def buildable(name: str, microbatches, label: str = ""):
    """`(m, schedule)` for each m the generator accepts; the rejected ones are reported and skipped."""
    virtual = VIRTUAL.get(name, 1)
    for m in microbatches:
        try:
            yield m, schedules.build(name, P, m, virtual)
        except schedules.ScheduleError as error:
            print(f"skip {label}{name} m={m}: {error}", file=sys.stderr)


def lm_table(names, microbatches) -> str:
    """The "LM step" table: per-device temp and total MiB of the LM step, and total(m) / total(m=4)."""
    mesh = make_mesh(data=1, stage=P, tensor=1)
    rows = []
    for name in names:
        virtual = VIRTUAL.get(name, 1)
        first = None  # (m, total) of the smallest m the generator accepts
        for m, schedule in buildable(name, microbatches, "LM "):
            result = lm_step_memory(schedule, mesh)
            first = first or (m, result["total"])
            ratio = f"{result['total'] / first[1]:.2f}"
            if first[0] != microbatches[0]:  # e.g. dualpipev needs m >= 2 * devices: the ratio is to its first m
                ratio += f" (vs m={first[0]})"
            rows.append(
                f"| {name} | {virtual} | {m} | {result['temp'] / 2**20:.2f} | {result['total'] / 2**20:.2f} | "
                f"{ratio} | {result['compile_s']:.2f} |"
            )
            print(
                f"LM {name} m={m}: temp {result['temp'] / 2**20:.2f} MiB, total {result['total'] / 2**20:.2f} MiB",
                file=sys.stderr,
            )
    config = LM_CONFIG
    title = (
        f"LM step: GPT vocab {config.vocab_size}, seq {config.seq_len}, d_model {config.d_model}, "
        f"{config.num_heads} heads, {config.num_layers} layers; {LM_BATCH} sequences per microbatch; "
        f"data 1 x stage {P}; remat {LM_REMAT}; per-device bytes\n\n"
    )
    header = (
        f"| schedule | v | m | temp MiB | total MiB | total / total(m={microbatches[0]}) | compile s |\n"
        "|---|---|---|---|---|---|---|"
    )
    return title + "\n".join([header, *rows]) + "\n"


@functools.cache
def residual_bytes(num_stages: int, remat) -> StageCosts:
    """`jpipe.measure_costs` of one stage and one microbatch: stash bytes, weight-residual bytes, FLOPs."""
    params, _, inputs, _ = make_problem(num_stages, 1)
    one = jax.tree.map(lambda a: a[0], params)
    return jpipe.measure_costs(stage_fn, one, inputs[0], remat=remat)


def split_label(schedule, split: bool) -> str:
    ops = {action.op for row in schedule.actions for action in row}
    whole = "yes" if split else "no"
    if Op.I in ops:
        return f"I/W, B {whole}" if Op.B in ops else "I/W"
    return whole


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/pipeline"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="m in {4, 16}, remat none only, no v_half / v_min (see v_schedules.py); LM table: 1f1b and gpipe",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    microbatches = (4, 16) if args.quick else (4, 8, 16, 32)
    remats = ("none",) if args.quick else ("none", "full", "dots")
    timed_m = 16
    mesh = jax.make_mesh((P,), ("stage",), devices=jax.devices()[:P])
    nan = float("nan")

    rows = []
    baseline = {}
    for remat in remats:
        for m in microbatches:
            problem = make_problem(P, m)
            step = gpipe_autodiff(stage_fn, loss_fn, mesh=mesh, num_microbatches=m, remat=remat)
            baseline[(remat, m)] = measure(step, problem, time_it=m == timed_m)
            result = baseline[(remat, m)]
            rows.append(
                {
                    "name": "ad_gpipe (baseline)", "virtual": 1, "remat": remat, "m": m, "split": "-",
                    "result": result, "memory_ratio": 1.0, "time_ratio": 1.0, "weight_kib": nan,
                    "weight_stash_mib": nan, "stash_ratio": nan, "buffers_ratio": nan, "temp_ratio": nan,
                }
            )  # fmt: skip
            print(f"ad_gpipe remat={remat} m={m}: temp {result['temp'] / 2**20:.2f} MiB", file=sys.stderr)

    for name in schedules.SCHEDULES:
        if args.quick and name in QUICK_SKIPS:
            continue
        virtual = VIRTUAL.get(name, 1)
        for remat in remats:
            costs = residual_bytes(P * virtual, remat)
            cost = costs.cost()
            for m, schedule in buildable(name, microbatches):
                problem = shard_inputs(make_problem(P * virtual, m), mesh)
                step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, remat=remat, cost=cost)
                split = resolve_split(schedule, "auto", cost)
                result = measure(step, problem, time_it=m == timed_m)
                base = baseline[(remat, m)]
                sim = schedules.simulate(schedule, cost, mode="lockstep", split_backward=split)
                ran = schedules.peak_memory(step.program.tick_table.schedule, cost.weight_residuals)
                if ran != sim.peak_memory:  # the simulator packed a different schedule than the executor
                    print(f"WARNING {name} m={m}: simulated {sim.peak_memory} != executor's {ran}", file=sys.stderr)
                predicted_stash = max(sim.peak_activations) * virtual * costs.stash_bytes
                predicted = max(sim.peak_memory) * virtual * costs.stash_bytes
                stash = step.program.num_stash_slots * costs.stash_bytes
                weight_stash = step.program.num_weight_slots * costs.weight_residual_bytes
                rows.append(
                    {
                        "name": name, "virtual": virtual, "remat": remat, "m": m,
                        "split": split_label(schedule, split), "result": result,
                        "memory_ratio": result["temp"] / base["temp"],
                        "time_ratio": result["step_s"] / base["step_s"] if m == timed_m else nan,
                        "weight_kib": costs.weight_residual_bytes / 2**10,
                        "weight_stash_mib": weight_stash / 2**20,
                        "stash_ratio": stash / predicted_stash,
                        "buffers_ratio": (stash + weight_stash) / predicted,
                        "temp_ratio": result["temp"] / predicted,
                    }
                )  # fmt: skip
                print(
                    f"{name} remat={remat} m={m} split={split}: temp {result['temp'] / 2**20:.2f} MiB, "
                    f"weight stash {weight_stash / 2**20:.2f} MiB",
                    file=sys.stderr,
                )

    header = (
        "| schedule | v | remat | m | split | temp MiB | total MiB | temp / AD-GPipe | compile s "
        "| step time / AD-GPipe (m=16) "
        "| weight residuals KiB / stage-mb | weight stash MiB | stash / simulated peak "
        "| buffers / simulated peak memory | temp / simulated peak memory |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        result = row["result"]
        lines.append(
            f"| {row['name']} | {row['virtual']} | {row['remat']} | {row['m']} | {row['split']} | "
            f"{result['temp'] / 2**20:.2f} | {result['total'] / 2**20:.2f} | {row['memory_ratio']:.2f} | "
            f"{result['compile_s']:.2f} | "
            f"{row['time_ratio']:.2f} | {row['weight_kib']:.0f} | {row['weight_stash_mib']:.2f} | "
            f"{row['stash_ratio']:.2f} | {row['buffers_ratio']:.2f} | {row['temp_ratio']:.2f} |"
        )
    compile_growth = []
    for name in schedules.SCHEDULES:
        times = {r["m"]: r["result"]["compile_s"] for r in rows if r["name"] == name and r["remat"] == "none"}
        if min(microbatches) in times and max(microbatches) in times:
            compile_growth.append(
                f"{name}: compile m={max(microbatches)} / m={min(microbatches)} = "
                f"{times[max(microbatches)] / times[min(microbatches)]:.2f}"
            )
    table = "\n".join(lines) + "\n\n" + "\n".join(compile_growth) + "\n"
    lm_names = ("1f1b", "gpipe") if args.quick else tuple(schedules.SCHEDULES)
    table += "\n" + lm_table(lm_names, microbatches)
    print(table)
    (args.out / "pipeline_memory.md").write_text(table)


if __name__ == "__main__":
    main()
