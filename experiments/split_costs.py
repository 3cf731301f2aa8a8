"""The exact I/W split, measured: op FLOPs of real stages, and what they mean for every schedule.

Command (from the repository root, about a minute on 2 CPU cores):

    .venv/bin/python experiments/split_costs.py --out experiments/out/split

Part 1, per stage: XLA's `cost_analysis()` FLOPs of the executor's own ops (F, B, I, W from
`jpipe.measure_costs`, each compiled alone for CPU), (I + W) / B, the bytes an F stashes and an I
keeps for its W (the weight residuals), and for comparison the split that two separate vjps give
(I = vjp w.r.t. the input only, W = vjp w.r.t. the parameters only: W re-runs the backward chain
inside every layer). Stages:

- `gpt`: 2 GPT blocks (jpipe.models, d_model 256, 4 heads, MLP 1024, seq 128, batch 4), remat
  "none" and "full";
- `gpt-long`: the same blocks at seq 1024 (attention, all of it in I, weighs more);
- `mlp`: an opaque stage function of 4 residual MLP layers written as a Python loop.

Part 2, per stage and schedule (p = 4, m = 16): the lockstep makespan of the executor's tick packing
under the measured costs (backward split into I and W, and whole) divided by the makespan of an
ideal asynchronous (MPMD) run with the same F and B and I = W = B / 2; the split the executor picks
by itself (`split_backward="auto"`); and the async makespan under the measured costs (what an MPMD
runtime would get with this stage's real I and W) over the same ideal.

Writes `<out>/split_costs.md` (both tables) and prints it. `--quick`: tiny stages, seconds.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

import jpipe
from jpipe import schedules
from jpipe.models.config import GPTConfig
from jpipe.models.gpt import Block, params_of
from jpipe.models.parts import LMParts
from jpipe.pipeline.costs import xla_flops
from jpipe.pipeline.stage import with_remat

P, M = 4, 16
SCHEDULE_VIRTUAL = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zb_h1": 1, "zb_h2": 1, "zbv": 2, "dualpipev": 2}


def gpt_stage(seq: int, layers: int = 2, batch: int = 4):
    config = GPTConfig(d_model=256, num_heads=4, seq_len=seq, num_layers=layers)
    one = jax.eval_shape(lambda: params_of(Block(config, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct((layers, *a.shape), a.dtype), one)
    x = jax.ShapeDtypeStruct((batch, seq, config.d_model), jnp.float32)
    return jpipe.layered(LMParts(config).layer_fn), params, x


def mlp_layers(params, x):
    """4 residual MLP layers, unrolled in Python (an opaque stage)."""
    for layer in params:
        x = x + jnp.tanh(x @ layer["w1"]) @ layer["w2"]
    return x


def mlp_stage(width: int = 256, batch: int = 4, seq: int = 128, layers: int = 4):
    layer = {
        "w1": jax.ShapeDtypeStruct((width, 4 * width), jnp.float32),
        "w2": jax.ShapeDtypeStruct((4 * width, width), jnp.float32),
    }
    return mlp_layers, [layer] * layers, jax.ShapeDtypeStruct((batch, seq, width), jnp.float32)


def two_vjp_flops(stage_fn, params, x, remat) -> tuple[float, float]:
    """FLOPs of the split two separate vjps give: (input-gradient only, parameter-gradient only)."""
    fn = with_remat(stage_fn, remat)  # as the executor applies it (per layer for a layered stage)

    def only(index):
        def run(p, a, g):
            return jax.vjp(fn, p, a)[1](g)[index]

        return jax.jit(run).lower(params, x, x).compile()

    def forward(p, a):
        return fn(p, a)

    forward_flops = xla_flops(jax.jit(forward).lower(params, x).compile())
    # Each includes its own forward; subtract it to get the backward part.
    return xla_flops(only(1)) - forward_flops, xla_flops(only(0)) - forward_flops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/split"))
    parser.add_argument("--quick", action="store_true", help="tiny stages (seq 32, width 64): seconds")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        stages = {
            "gpt (seq 32), remat none": (*gpt_stage(32, batch=1), "none"),
            "gpt (seq 32), remat full": (*gpt_stage(32, batch=1), "full"),
            "mlp (opaque, 4 layers), remat none": (*mlp_stage(width=64, batch=1, seq=32), "none"),
        }
    else:
        stages = {
            "gpt (seq 128), remat none": (*gpt_stage(128), "none"),
            "gpt (seq 128), remat full": (*gpt_stage(128), "full"),
            "gpt-long (seq 1024), remat none": (*gpt_stage(1024), "none"),
            "mlp (opaque, 4 layers), remat none": (*mlp_stage(), "none"),
        }
    op_lines = [
        "| stage | F | B | I | W | (I + W) / B | two-vjp (I + W) / B | stash MiB | weight residuals MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    schedule_lines = [
        "| stage | schedule | lockstep split / ideal | lockstep whole / ideal | auto picks | async measured / ideal |",
        "|---|---|---|---|---|---|",
    ]
    for label, (stage_fn, params, x, remat) in stages.items():
        costs = jpipe.measure_costs(stage_fn, params, x, remat=remat)
        f, b, i, w = (costs.flops[k] for k in ("f", "b", "i", "w"))
        old_i, old_w = two_vjp_flops(stage_fn, params, x, remat)
        op_lines.append(
            f"| {label} | {f:.3g} | {b:.3g} | {i:.3g} | {w:.3g} | {(i + w) / b:.3f} | {(old_i + old_w) / b:.2f} | "
            f"{costs.stash_bytes / 2**20:.2f} | {costs.weight_residual_bytes / 2**20:.2f} |"
        )
        measured = costs.cost()
        ideal = schedules.Cost(f=1.0, b=measured.b, i=measured.b / 2, w=measured.b / 2)
        for name, virtual in SCHEDULE_VIRTUAL.items():
            schedule = schedules.build(name, P, M, virtual)
            reference = schedules.simulate(schedule, ideal, "async").makespan
            split = schedules.simulate(schedule, measured, "lockstep", split_backward=True).makespan
            whole = schedules.simulate(schedule, measured, "lockstep", split_backward=False).makespan
            picks = "split" if schedules.best_split(schedule, measured) else "whole"
            if not any(a.op is schedules.Op.B for row in schedule.actions for a in row):
                picks = "(I/W)"
            asynchronous = schedules.simulate(schedule, measured, "async").makespan
            schedule_lines.append(
                f"| {label} | {name} | {split / reference:.3f} | {whole / reference:.3f} | {picks} | "
                f"{asynchronous / reference:.3f} |"
            )
        print(f"{label}: {costs}", flush=True)
    text = (
        f"Op FLOPs (XLA cost_analysis, CPU; jax {jax.__version__})\n\n"
        + "\n".join(op_lines)
        + f"\n\nMakespan over an ideal async run (same F and B, I = W = B/2), p = {P}, m = {M}\n\n"
        + "\n".join(schedule_lines)
        + "\n"
    )
    print(text)
    (args.out / "split_costs.md").write_text(text)


if __name__ == "__main__":
    main()
