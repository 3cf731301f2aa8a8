"""Executor benchmark: temp memory, compile time and step time of every schedule vs AD-GPipe.

Command (about 10 minutes on 2 CPU cores; `--quick` for a 1-minute subset):

    .venv/bin/python experiments/pipeline_memory.py --out experiments/out/pipeline

Model: 8 residual MLP layers of width D and hidden 4D on [B, T, D] activations, split into 4 devices
x v chunks (so every layout runs the same model); activations dominate memory. For each schedule,
remat mode and m in {4, 8, 16, 32} it prints the per-device temp bytes from XLA's
`compile().memory_analysis()`, the ratio to the AD-GPipe baseline (the MaxText/Praxis approach) at
the same m, compile time, and (at m = 16) the step time as a ratio to the baseline measured in the
same run. It also compares with the simulator's peak-activation prediction (peak live activations x
residual bytes per stage and microbatch): "stash / simulated peak" is the residual buffer the
executor allocated, "temp / simulated peak" all of XLA's temp memory (stash, inbox, gradient
accumulators, the current op's temporaries). Results: a markdown table on stdout and in
`<out>/pipeline_memory.md`.
"""

from __future__ import annotations

import argparse
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
from jpipe.pipeline.gpipe_autodiff import gpipe_autodiff  # noqa: E402
from jpipe.pipeline.stage import layered, stage_ops  # noqa: E402

P = 4
TOTAL_LAYERS = 8
BATCH, SEQ, WIDTH = 4, 32, 64
VIRTUAL = {"interleaved_1f1b": 2, "looped_bfs": 2, "zbv": 2, "dualpipev": 2}


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


def measure(step, problem, time_it: bool, repeats: int = 10) -> dict:
    start = time.perf_counter()
    compiled = jax.jit(step).lower(*problem).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    result = {"temp": memory.temp_size_in_bytes, "compile_s": compile_s, "step_s": float("nan")}
    if time_it:
        jax.block_until_ready(compiled(*problem))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*problem))
            times.append(time.perf_counter() - start)
        result["step_s"] = min(times)
    return result


def residual_bytes(num_stages: int, remat) -> int:
    """Bytes the executor stashes per (stage, microbatch) for this remat mode."""
    params, _, inputs, _ = make_problem(num_stages, 1)
    one = jax.tree.map(lambda a: a[0], params)
    shapes = jax.eval_shape(lambda p, x: stage_ops(stage_fn, remat).forward(p, x)[1], one, inputs[0])
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/pipeline"))
    parser.add_argument("--quick", action="store_true", help="m in {4, 16}, remat none only")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    microbatches = (4, 16) if args.quick else (4, 8, 16, 32)
    remats = ("none",) if args.quick else ("none", "full", "dots")
    timed_m = 16
    mesh = jax.make_mesh((P,), ("stage",), devices=jax.devices()[:P])

    rows = []
    baseline = {}
    for remat in remats:
        for m in microbatches:
            problem = make_problem(P, m)
            step = gpipe_autodiff(stage_fn, loss_fn, mesh=mesh, num_microbatches=m, remat=remat)
            baseline[(remat, m)] = measure(step, problem, time_it=m == timed_m)
            result = baseline[(remat, m)]
            rows.append(("ad_gpipe (baseline)", 1, remat, m, result, 1.0, 1.0, float("nan"), float("nan")))
            print(f"ad_gpipe remat={remat} m={m}: temp {result['temp'] / 2**20:.2f} MiB", file=sys.stderr)

    for name in schedules.SCHEDULES:
        virtual = VIRTUAL.get(name, 1)
        for remat in remats:
            per_stage = residual_bytes(P * virtual, remat)
            for m in microbatches:
                try:
                    schedule = schedules.build(name, P, m, virtual)
                except schedules.ScheduleError as error:
                    print(f"skip {name} m={m}: {error}", file=sys.stderr)
                    continue
                problem = make_problem(P * virtual, m)
                step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, remat=remat)
                result = measure(step, problem, time_it=m == timed_m)
                base = baseline[(remat, m)]
                sim = schedules.simulate(schedule, mode="lockstep")
                predicted = max(sim.peak_activations) * virtual * per_stage
                stash = step.program.num_stash_slots * per_stage
                rows.append(
                    (
                        name,
                        virtual,
                        remat,
                        m,
                        result,
                        result["temp"] / base["temp"],
                        result["step_s"] / base["step_s"] if m == timed_m else float("nan"),
                        stash / predicted,
                        result["temp"] / predicted,
                    )
                )
                print(f"{name} remat={remat} m={m}: temp {result['temp'] / 2**20:.2f} MiB", file=sys.stderr)

    header = (
        "| schedule | v | remat | m | temp MiB | temp / AD-GPipe | compile s | step time / AD-GPipe (m=16) "
        "| stash / simulated peak | temp / simulated peak |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for name, virtual, remat, m, result, memory_ratio, time_ratio, stash_ratio, temp_ratio in rows:
        lines.append(
            f"| {name} | {virtual} | {remat} | {m} | {result['temp'] / 2**20:.2f} | {memory_ratio:.2f} | "
            f"{result['compile_s']:.2f} | {time_ratio:.2f} | {stash_ratio:.2f} | {temp_ratio:.2f} |"
        )
    compile_growth = []
    for name in schedules.SCHEDULES:
        times = {r[3]: r[4]["compile_s"] for r in rows if r[0] == name and r[2] == "none"}
        if min(microbatches) in times and max(microbatches) in times:
            compile_growth.append(
                f"{name}: compile m={max(microbatches)} / m={min(microbatches)} = "
                f"{times[max(microbatches)] / times[min(microbatches)]:.2f}"
            )
    table = "\n".join(lines) + "\n\n" + "\n".join(compile_growth) + "\n"
    print(table)
    (args.out / "pipeline_memory.md").write_text(table)


if __name__ == "__main__":
    main()
