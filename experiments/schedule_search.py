"""Searched schedules against the best named schedule that fits the same memory limit, LM costs.

Commands (from the repository root):

    .venv/bin/python experiments/schedule_search.py --out experiments/out/search
    .venv/bin/python experiments/schedule_search.py --costs quickstart --out experiments/out/search-quickstart

With `--costs llama7b` (the default) the costs are `jpipe.schedules.ModelCosts.transformer` FLOPs of
a Llama-2-7B-sized decoder (d_model 4096, sequence 4096, vocabulary 32000, 32 layers, MLP 4x) spread
evenly over the stages: with 4 devices and one stage each a stage has 8 layers and the last stage's
F also runs the vocabulary head forward and backward (1.21x a middle stage's F); with two chunks per
device (4 layers each) the last chunk's F is 1.42x a middle chunk's. Times are in units of one
layer's forward. Weight residuals are not counted (`Cost.weight_residuals` 0): memory is stashes.

With `--costs quickstart` they are the quick start's GPT (`--preset quickstart`: 8 blocks of
d_model 64, 4 stages, data 2) as `python -m jpipe.train --schedule auto` measures it
(`jpipe.train.auto.measure_model`: XLA FLOPs of one block's F, B, I, W, of the embedding and of the
head and loss on the default backend, and the bytes of one block's stash and weight residuals),
stages padded as `PipelinedLM` runs them; weight residuals count by their measured bytes.

For p = 4, m in {8, 16}, memory limits p, 1.5p and 2p (microbatch x full device stage) and
send_latency 0 and 1 (the executor's hidden sends), it runs `jpipe.schedules.search_result` with
virtual up to 2 and prints one markdown table: the best named schedule that fits (with send latency
1 also `build(..., send_latency=1)`'s two-stream orders) and its lockstep makespan, the searched
makespan, their ratio, the searched schedule's chunks per device, the stash and weight-residual
slots the executor allocates for each (`compile_program`'s `num_stash_slots + num_weight_slots`,
from `jpipe.schedules.buffer_slots`), the searched memory (those buffers in microbatch x full device
stage, what the limit bounds; with measured costs also in bytes), the busiest device's own work (no
schedule of that placement finishes sooner), and the search's evaluations and wall time. Below the
least memory a named schedule needs besides `naive` (the quick start's limit 4: 1F1B needs 4.23)
the baseline is `naive`. It writes the table to `<out>/schedule_search.md` and the
searched schedule of the first case as text chart (`<out>/searched-p4-m8.txt`) and CSV
(`<out>/searched-p4-m8.csv`).

Flags: --out DIR, --costs llama7b|quickstart, --budget N (evaluations per search, default 60000),
--time-limit SECONDS (per search, default 60), --seed N, --microbatches 8,16, --latencies 0,1,
--limits 4,6,8 (default p, 1.5p, 2p).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable, Sequence

from jpipe.schedules import (
    Cost,
    ModelCosts,
    Op,
    Schedule,
    SearchResult,
    buffer_slots,
    render,
    search_result,
    split_backward,
    stage_costs,
    to_csv,
)

DEVICES = 4
LAYERS = 32
MODEL = ModelCosts.transformer(d_model=4096, seq_len=4096, vocab_size=32000, mlp_ratio=4)
COLUMNS = (
    "send latency",
    "m",
    "memory limit",
    "best named (v)",
    "named makespan",
    "searched makespan",
    "ratio",
    "searched v",
    "named slots",
    "searched slots",
    "searched memory",
    "busiest device's work",
    "evaluations",
    "search s",
)


def lm_cost(virtual: int) -> Cost:
    """Per-chunk costs with the layers spread evenly over `DEVICES * virtual` stages."""
    stages = DEVICES * virtual
    return stage_costs([LAYERS // stages] * stages, MODEL)


def quickstart_cost() -> tuple[Callable[[int], Cost], Callable[[int], int]]:
    """The quick start's measured per-stage costs (`virtual -> Cost`) and bytes of one microbatch x
    full device stage stash (`virtual -> bytes`), as `--schedule auto` measures them."""
    from jpipe.train import auto, cli

    config = cli.build_config(cli.parse(["--preset", "quickstart", "--schedule", "auto"]))
    if config.parallel.stage != DEVICES:
        raise ValueError(f"the quick start has {config.parallel.stage} stages, this experiment {DEVICES}")
    measure = auto.measure_model(config)
    print(f"# the quick start's block, measured: {measure.layer}")
    return measure.cost, measure.stash_bytes


def slots(schedule: Schedule, split: bool = True) -> str:
    """The executor's stash + weight-residual slots for `schedule` (B split into I and W, or whole:
    the search counts a named schedule as the executor runs it, `SearchResult.split`)."""
    per_device = buffer_slots(split_backward(schedule) if split else schedule)
    return f"{max(s for s, _ in per_device)} + {max(w for _, w in per_device)}"


def busiest_work(result: SearchResult) -> float:
    """The most work any one device of the searched schedule's placement does in a step."""
    schedule, cost = result.schedule, result.cost
    work = [0.0] * schedule.num_devices
    for stage, device in enumerate(schedule.placement):
        work[device] += schedule.num_microbatches * sum(cost.of(op, stage) for op in (Op.F, Op.I, Op.W))
    return max(work)


def row(result: SearchResult, latency: int, limit: float, stash_bytes: Callable[[int], int] | None) -> list[str]:
    baseline = result.baseline
    memory = f"{result.memory:.2f}"
    if stash_bytes is not None:
        memory += f" = {result.memory * stash_bytes(result.schedule.virtual) / 2**20:.2f} MiB"
    return [
        str(latency),
        str(result.schedule.num_microbatches),
        f"{limit:g}",
        f"{baseline.name} ({baseline.virtual})",
        f"{result.baseline_makespan:.1f}",
        f"{result.makespan:.1f}",
        f"{result.ratio:.3f}",
        str(result.schedule.virtual),
        slots(baseline, next((n.split for n in result.named if n.schedule is baseline), True)),
        slots(result.schedule, result.split),
        memory,
        f"{busiest_work(result):.1f}",
        str(result.evaluations),
        f"{result.seconds:.1f}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/search"))
    parser.add_argument("--costs", choices=("llama7b", "quickstart"), default="llama7b")
    parser.add_argument("--budget", type=int, default=60_000)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--microbatches", default="8,16")
    parser.add_argument("--latencies", default="0,1")
    parser.add_argument("--limits", default=f"{DEVICES},{1.5 * DEVICES:g},{2 * DEVICES}")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cost_of, stash_bytes = (lm_cost, None) if args.costs == "llama7b" else quickstart_cost()
    costs = cost_of(1)
    print(
        f"# {args.costs} costs per stage (p = {DEVICES}, v = 1, one layer's F = 1, weight residuals "
        f"{costs.weight_residuals:.3f} of a stash): "
        f"F {', '.join(f'{x:.2f}' for x in costs.f)}; I {', '.join(f'{x:.2f}' for x in costs.i)}; "
        f"W {', '.join(f'{x:.2f}' for x in costs.w)}"
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    first = None
    for latency in (int(x) for x in args.latencies.split(",")):
        for m in (int(x) for x in args.microbatches.split(",")):
            for limit in (float(x) for x in args.limits.split(",")):
                result = search_result(
                    DEVICES,
                    m,
                    cost_of,
                    memory_limit=limit,
                    virtual=2,
                    send_latency=latency,
                    time_limit=args.time_limit,
                    seed=args.seed,
                    budget=args.budget,
                )
                first = first or result
                lines.append("| " + " | ".join(row(result, latency, limit, stash_bytes)) + " |")
                print(lines[-1] if len(lines) > 3 else "\n".join(lines), flush=True)
    table = "\n".join(lines) + "\n"
    (args.out / "schedule_search.md").write_text(table)
    if first is not None:
        name = f"searched-p{DEVICES}-m{first.schedule.num_microbatches}"
        chart = render(first.schedule)
        (args.out / f"{name}.txt").write_text(chart + "\n")
        (args.out / f"{name}.csv").write_text(to_csv(first.schedule))
        print(f"\n{chart}")
    print(f"\nwrote {args.out / 'schedule_search.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
