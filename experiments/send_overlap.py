"""Hidden pipeline sends: what the extra tick of latency costs, and whether the TPU compiler overlaps.

Command (about 3 minutes on 2 CPU cores; needs libtpu, `pip install -e '.[tpu]'`):

    .venv/bin/python experiments/send_overlap.py --out experiments/out/send_overlap

Two tables.

1. Simulation (no jax): every named schedule at p = 4, m = 16, in the lockstep simulator with the
   executor's split backward and unit costs per chunk (F = I = W = 1, B = 2). "makespan" is without send
   latency (each tick's messages usable in the next tick), "hidden" with `send_latency=1` (the
   message of tick t travels while tick t + 1 computes and is usable from tick t + 2), and "ratio"
   their quotient: the price of hiding sends when they cost nothing. The lower bound is the last
   device's work after the first microbatch's forward reaches it (p - 1 hops of 1 + latency ticks).
   "send_latency=1 build" is `build(name, ..., send_latency=1)`: the named order or, when faster,
   its two-stream version (two half batches interleaved tick by tick, `jpipe.schedules.streams`);
   "peak memory" is the device maximum of live stash plus weight residuals (microbatch x device
   stage), named order -> that build. "bound ratio" is the busiest device's work after the first
   forward can reach it, with latency over without: a lower bound on the ratio for schedules that
   meet the no-latency bound (zb_h1, zb_h2, zbv, dualpipev do). "searched" is the best order
   `jpipe.schedules.search` finds for latency 1 within the named schedule's peak memory (any
   virtual up to the named one's, costs scaled so a device stage costs the same), over the named
   schedule's makespan without latency. The last three columns add a send time `comm` of half a
   unit op: exposed sends (named order) lengthen every sending tick by comm, hidden ones (the
   send_latency=1 build) make the next tick last max(compute, comm); "auto" is what
   `jpipe.value_and_grad(overlap_sends="auto", cost=Cost(comm=0.5))` picks for the named order.
2. TPU compiler: the training step of the quickstart model (`--preset quickstart`, data 1 x stage 4)
   compiled for TPU v5e:2x2 with libtpu (deviceless, `jpipe.compile.compile_training_step`), for
   every named schedule with `overlap_sends` off and on (on, the step runs the send_latency=1
   build of the schedule, as `jpipe.train --overlap-sends true` does); "hidden" counts the pipeline's
   collective-permutes that have a matmul (directly, or inside a fusion or a conditional branch)
   scheduled between their start and done (`jpipe.parallel.hlo.permute_overlaps`); temp MiB is the
   compiler's per-device temp memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

from jpipe import schedules
from jpipe.pipeline.executor import resolve_overlap


def lower_bound(schedule: schedules.Schedule, cost: schedules.Cost, latency: int) -> float:
    """Makespan bound in unit ticks: the busiest device's ops after the first forward reaches it."""
    split = schedules.split_backward(schedule)
    placement = schedule.placement
    bound = 0.0
    for device, row in enumerate(split.actions):
        first_stage = min(s for s in range(schedule.num_stages) if placement[s] == device)
        hops = sum(1 for s in range(first_stage) if placement[s] != placement[s + 1])
        arrival = first_stage + hops * latency  # ticks before its first forward can start
        bound = max(bound, arrival + sum(cost.of(a.op) for a in row))
    return bound


def _searched(schedule: schedules.Schedule, p: int, m: int, virtual: int, seconds: float) -> float:
    """Makespan (in `schedule`'s chunk units) of the best order found for send latency 1 in its memory."""

    def cost(v: int) -> schedules.Cost:  # a device stage costs `virtual` chunk units at every v
        scale = virtual / v
        return schedules.Cost(f=scale, b=2 * scale, i=scale, w=scale, per="chunk")

    limit = max(schedules.peak_memory(schedules.split_backward(schedule)))
    found = schedules.search(p, m, cost, memory_limit=limit, virtual=virtual, send_latency=1, time_limit=seconds)
    return schedules.simulate(found, cost(found.virtual), "lockstep", send_latency=1).makespan


def simulation_table(p: int = 4, m: int = 16, search_seconds: float = 15.0) -> str:
    unit, slow_link = schedules.Cost(per="chunk"), schedules.Cost(comm=0.5, per="chunk")  # per chunk, as before
    lines = [
        f"Lockstep simulation, p = {p}, m = {m}, split backward, unit costs per chunk (F = I = W = 1).",
        "",
        "| schedule | v | makespan | hidden, named order | ratio | hidden, send_latency=1 build | ratio | "
        "peak memory | bound ratio | searched, same memory | ratio | exposed, comm 0.5 | hidden, comm 0.5 | auto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(schedules.SCHEDULES):
        virtual = schedules.default_virtual(name)
        schedule = schedules.build(name, p, m, virtual)
        plain = schedules.simulate(schedule, unit, "lockstep").makespan
        hidden = schedules.simulate(schedule, unit, "lockstep", send_latency=1).makespan
        tolerant = schedules.build(name, p, m, virtual, send_latency=1)
        streamed = schedules.simulate(tolerant, unit, "lockstep", send_latency=1).makespan
        memory = f"{max(schedules.peak_memory(schedules.split_backward(schedule))):g}"
        memory += f" -> {max(schedules.peak_memory(schedules.split_backward(tolerant))):g}"
        bound = lower_bound(schedule, unit, 1) / lower_bound(schedule, unit, 0)
        exposed_c = schedules.simulate(schedule, slow_link, "lockstep").makespan
        hidden_c = schedules.simulate(tolerant, slow_link, "lockstep", send_latency=1).makespan
        auto = "on" if resolve_overlap(schedule, "auto", slow_link, split=True) else "off"
        searched = _searched(schedule, p, m, virtual, search_seconds)
        lines.append(
            f"| {name} | {virtual} | {plain:g} | {hidden:g} | {hidden / plain:.3f} | {streamed:g} | "
            f"{streamed / plain:.3f} | {memory} | {bound:.3f} | {searched:g} | {searched / plain:.3f} | "
            f"{exposed_c:g} | {hidden_c:g} | {auto} |"
        )
        print(f"  {name}: searched {searched:g}", file=sys.stderr)
    return "\n".join(lines)


def compile_table(topology: str) -> str:
    from jpipe.compile import compile_training_step
    from jpipe.parallel.hlo import permute_overlaps
    from jpipe.train.presets import preset

    config = preset("quickstart")
    lines = [
        f"TPU compiler ({topology}, deviceless), quickstart model, data 1 x stage 4, m = "
        f"{config.parallel.microbatches}: pipeline collective-permutes with a matmul in flight.",
        "",
        "| schedule | v | hidden, overlap off | temp MiB, off | hidden, overlap on | temp MiB, on |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(schedules.SCHEDULES):
        virtual = schedules.default_virtual(name)
        cells = []
        for overlap in (False, True):
            parallel = dataclasses.replace(
                config.parallel, schedule=name, virtual=virtual, data=1, overlap_sends=overlap
            )
            compiled = compile_training_step(dataclasses.replace(config, parallel=parallel), topology)
            permutes = [o for o in permute_overlaps(compiled.hlo_text) if o.in_loop]
            hidden = sum(o.hidden for o in permutes)
            cells += [f"{hidden} of {len(permutes)}", f"{compiled.temp_bytes / 2**20:.2f}"]
            print(f"  {name} overlap={overlap}: {cells[-2]} hidden, temp {cells[-1]} MiB", file=sys.stderr)
        lines.append(f"| {name} | {virtual} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/send_overlap"))
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--simulate-only", action="store_true", help="skip the TPU compiles")
    parser.add_argument("--search-seconds", type=float, default=15.0, help="time limit of each schedule search")
    args = parser.parse_args()
    parts = [simulation_table(search_seconds=args.search_seconds)]
    print(parts[0], flush=True)
    if not args.simulate_only:
        parts.append(compile_table(args.topology))
        print("\n" + parts[1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "send_overlap.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
