"""The lockstep tax where people train (remat on, long sequences), with and without cost-balanced ticks.

Command (from the repository root; a few minutes on 2 CPU cores, all compile-only):

    .venv/bin/python experiments/lockstep_tax.py --out experiments/out/lockstep_tax

Per stage (2 GPT blocks, `jpipe.layered`, 2 sequences per microbatch; d_model 1024 / 16 heads and
256 / 4 heads; sequences 128, 1024, 4096; remat none and full) the executor's own ops are measured
with `jpipe.measure_costs` (XLA `cost_analysis()` FLOPs on CPU, F = 1). Then for each schedule at
p = 4, m = 16, the lockstep simulator's makespan (what the SPMD executor runs) is divided by:

- `tax`: the async (MPMD) makespan of the same schedule with the same measured ops: the lockstep
  tax proper;
- `vs ideal`: the async makespan of an idealised MPMD run with the same F and B and I = W = B/2 (the
  issue's first table).

`one op` is the executor with one op per device per tick (the faster of B split and whole);
`balanced` is `jpipe.schedules.fused_ticks.balance_ticks` (two ops of different microbatches share a
tick where they fit; `--balance-ticks auto`); `balanced + R` (remat full only) balances the schedule
with each recomputation as an R op of its own (`jpipe.schedules.recompute`, the executor's
`recompute=True`), its ops measured with `measure_costs(..., recompute=True)`, and its tax taken
against the same async run as the other columns (the schedule without R, whose I carries the
recomputation: the same total work). `memory` is the simulated peak stash plus weight
residuals of each in MiB (device max; the simulator's count in microbatch x device-stage stashes times
the measured stash bytes, weight residuals weighted by their measured bytes): under remat full one
microbatch's weight residuals are 24x its stash, so any split backward (balanced ticks always split)
holds them from I to W. Writes `<out>/lockstep_tax.md` and prints it. `--quick`: tiny stages, seconds.
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
from jpipe.schedules.fused_ticks import balance_ticks
from jpipe.schedules.recompute import with_recompute

P, M = 4, 16
SCHEDULES = ("1f1b", "interleaved_1f1b", "zb_h1", "zbv")


def gpt_stage(d_model: int, heads: int, seq: int, layers: int = 2, batch: int = 2):
    """A stage of `layers` GPT blocks as (stage_fn, abstract params [layers, ...], abstract x)."""
    config = GPTConfig(d_model=d_model, num_heads=heads, seq_len=seq, num_layers=layers)
    one = jax.eval_shape(lambda: params_of(Block(config, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct((layers, *a.shape), a.dtype), one)
    x = jax.ShapeDtypeStruct((batch, seq, d_model), jnp.float32)
    return jpipe.layered(LMParts(config).layer_fn), params, x


def rows_of(label: str, measured: schedules.Cost, stash_mib: float, with_r=None) -> list[str]:
    """One table row per schedule for one measured stage (memory: simulated peak x one stash's MiB).

    `with_r`: `(cost, stash MiB)` measured with `recompute=True` (remat full only), for the R columns.
    """
    ideal = schedules.Cost(f=measured.f, b=measured.b, i=measured.b / 2, w=measured.b / 2)
    rows = []
    for name in SCHEDULES:
        schedule = schedules.build(name, P, M)
        asynchronous = schedules.simulate(schedule, measured, "async").makespan
        reference = schedules.simulate(schedule, ideal, "async").makespan
        result = balance_ticks(schedule, measured)
        one_memory = _memory(schedule, measured, split=schedules.best_split(schedule, measured))
        balanced_memory = _memory(result.schedule, measured, split=True)
        r_cells = "- | - |"
        if with_r is not None:
            r_cost, r_stash_mib = with_r
            recomputing = balance_ticks(with_recompute(schedule), r_cost)
            r_memory = _memory(recomputing.schedule, r_cost, split=True) * r_stash_mib
            r_cells = f"{recomputing.makespan / asynchronous:.2f} | {r_memory:.1f} |"
        rows.append(
            f"| {label} | {name} | {result.baseline / asynchronous:.2f} | {result.makespan / asynchronous:.2f} | "
            f"{result.baseline / reference:.2f} | {result.makespan / reference:.2f} | "
            f"{one_memory * stash_mib:.1f} | {balanced_memory * stash_mib:.1f} | {r_cells}"
        )
    return rows


def _memory(schedule: schedules.Schedule, cost: schedules.Cost, *, split: bool) -> float:
    return max(schedules.simulate(schedule, cost, "lockstep", split_backward=split).peak_memory)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/lockstep_tax"))
    parser.add_argument("--quick", action="store_true", help="tiny stages (d_model 64, seq 32 and 64): seconds")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = [(64, 4, 32), (64, 4, 64)] if args.quick else [(1024, 16, s) for s in (128, 1024, 4096)]
    shapes += [] if args.quick else [(256, 4, s) for s in (128, 1024, 4096)]
    op_lines = ["| stage | remat | F : B : I : W | stash MiB | weight residuals MiB |", "|---|---|---|---|---|"]
    lines = [
        "| stage, remat | schedule | tax, one op | tax, balanced | vs ideal, one op | vs ideal, balanced "
        "| memory, one op | memory, balanced | tax, balanced + R | memory, balanced + R |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d_model, heads, seq in shapes:
        for remat in ("none", "full"):
            costs = jpipe.measure_costs(*gpt_stage(d_model, heads, seq), remat=remat)
            measured = costs.cost()
            label = f"d{d_model} seq {seq}"
            op_lines.append(
                f"| {label} | {remat} | 1 : {measured.b:.2f} : {measured.i:.2f} : {measured.w:.2f} | "
                f"{costs.stash_bytes / 2**20:.2f} | {costs.weight_residual_bytes / 2**20:.2f} |"
            )
            with_r = None
            if remat == "full":
                r_costs = jpipe.measure_costs(*gpt_stage(d_model, heads, seq), remat=remat, recompute=True)
                with_r = (r_costs.cost(), r_costs.stash_bytes / 2**20)
            lines += rows_of(f"{label}, {remat}", measured, costs.stash_bytes / 2**20, with_r)
            print(f"{label}, remat {remat}: {costs}", flush=True)
    text = (
        f"Measured ops (XLA cost_analysis FLOPs, CPU; jax {jax.__version__}), 2 GPT blocks, 2 sequences\n\n"
        + "\n".join(op_lines)
        + f"\n\nLockstep makespan over async (p = {P}, m = {M}); simulated peak memory in MiB per device\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(text)
    (args.out / "lockstep_tax.md").write_text(text)


if __name__ == "__main__":
    main()
