"""Compiled memory of the controllable-memory V schedules (v_half, v_min) against 1f1b and zbv.

Command (about a minute on 2 CPU cores):

    .venv/bin/python experiments/v_schedules.py [--devices 4] [--microbatches 16] [--remat none full] [--schedules ...]

Model: 2p residual MLP layers (width D = 64, hidden 4D) on [B, T, D] = [4, 64, 64] activations, split
over p devices (default 4) x v chunks (1f1b: 2 layers per stage; zbv, v_half, v_min: 1 layer per
chunk), so every schedule runs the same model and activations dominate memory. For each schedule and
remat mode it compiles `jpipe.value_and_grad` on p fake CPU devices and prints, per device:

- "stash slots" / "weight slots": the executor's buffers (`Program.num_stash_slots`: one F's
  residuals of one chunk and microbatch each; `num_weight_slots`: what an I keeps for its W);
- "stash MiB": stash slots x the residual bytes of one chunk-microbatch (`stage_ops(...).forward`);
- "sim peak": the simulator's peak activations, microbatches x full device stage (stash from F to
  W; weight residuals not counted), and "authors": the paper's formula for V-Half / V-Min
  ((p + 2) // 2, (p + 4) // 3; 1f1b and zbv: p);
- "temp MiB": XLA's `compile().memory_analysis().temp_size_in_bytes` (stash, weight stash, inbox,
  gradient accumulators, temporaries) and its ratio to 1f1b's in the same remat mode.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jpipe  # noqa: E402
from jpipe import schedules  # noqa: E402
from jpipe.pipeline.stage import layered, stage_ops  # noqa: E402
from jpipe.schedules.controllable import authors_peak  # noqa: E402

BATCH, SEQ, WIDTH = 4, 64, 64
NAMES = ("1f1b", "zbv", "v_half", "v_min")
MIB = 2**20


def layer_fn(params, h):
    """One residual MLP layer: params w1 [D, 4D], w2 [4D, D]; h [B, T, D]."""
    return h + jnp.tanh(h @ params["w1"]) @ params["w2"]


stage_fn = layered(layer_fn)


def loss_fn(loss_params, y, target):
    return jnp.mean((y @ loss_params["head"] - target) ** 2)


def abstract_problem(num_devices: int, num_stages: int, m: int):
    """Shapes only: the step is lowered and compiled, never run. 2p layers in all."""
    layers = 2 * num_devices // num_stages
    f32 = jnp.float32
    stage_params = {
        "w1": jax.ShapeDtypeStruct((num_stages, layers, WIDTH, 4 * WIDTH), f32),
        "w2": jax.ShapeDtypeStruct((num_stages, layers, 4 * WIDTH, WIDTH), f32),
    }
    loss_params = {"head": jax.ShapeDtypeStruct((WIDTH, 8), f32)}
    inputs = jax.ShapeDtypeStruct((m, BATCH, SEQ, WIDTH), f32)
    targets = jax.ShapeDtypeStruct((m, BATCH, SEQ, 8), f32)
    return stage_params, loss_params, inputs, targets


def stash_bytes(stage_params, remat: str) -> int:
    """Residual bytes one F of one chunk keeps for one microbatch."""
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), stage_params)
    x = jax.ShapeDtypeStruct((BATCH, SEQ, WIDTH), jnp.float32)
    residuals = jax.eval_shape(lambda p, h: stage_ops(stage_fn, remat).forward(p, h)[1], one, x)
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(residuals))


def measure(name: str, p: int, m: int, remat: str, mesh) -> dict:
    schedule = schedules.build(name, p, m)
    problem = abstract_problem(p, schedule.num_stages, m)
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, remat=remat)
    temp = jax.jit(step).lower(*problem).compile().memory_analysis().temp_size_in_bytes
    program = step.program
    peak = max(schedules.simulate(schedule).peak_activations)
    return {
        "stash": program.num_stash_slots,
        "weight": program.num_weight_slots,
        "stash_mib": program.num_stash_slots * stash_bytes(problem[0], remat) / MIB,
        "peak": peak,
        "authors": authors_peak(name, p) if name.startswith("v_") else p,
        "temp_mib": temp / MIB,
    }


def table(p: int, m: int, remats: list[str], names: list[str]) -> str:
    mesh = jax.make_mesh((p,), ("stage",), devices=jax.devices()[:p])
    lines = [
        f"p = {p}, m = {m}, jax {jax.__version__} ({jax.default_backend()})",
        "",
        "| schedule | remat | stash slots | weight slots | stash MiB | sim peak | authors | temp MiB | temp / 1f1b |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for remat in remats:
        rows = {name: measure(name, p, m, remat, mesh) for name in ["1f1b", *(n for n in names if n != "1f1b")]}
        base = rows["1f1b"]["temp_mib"]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {remat} | {r['stash']} | {r['weight']} | {r['stash_mib']:.2f} | {r['peak']:g} | "
                f"{r['authors']} | {r['temp_mib']:.2f} | {r['temp_mib'] / base:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, choices=range(1, 9), metavar="P (1-8)")
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--remat", nargs="+", default=["none", "full"])
    parser.add_argument("--schedules", nargs="+", default=list(NAMES), help="1f1b is always measured")
    args = parser.parse_args()
    print(table(args.devices, args.microbatches, args.remat, args.schedules))


if __name__ == "__main__":
    main()
