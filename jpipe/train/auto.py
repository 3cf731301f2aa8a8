"""`--schedule auto`: measure the model, search a schedule within a memory limit, keep it with the run.

    python -m jpipe.train --schedule auto --memory-limit 6            # 6 microbatch x stage stashes
    python -m jpipe.train --schedule auto --memory-limit 512MiB --virtual 2

What a run with schedule "auto" does before it builds its training step:

1. Measures the model's parts on one microbatch, one device's share of it (`measure_model`): XLA's
   FLOPs (`cost_analysis()` on the default backend, each op compiled alone, as
   `jpipe.measure_costs` does) of one block's F, B, I and W under the run's remat policy, of the
   embedding's forward and backward and of the head and loss, forward and backward; and the bytes of
   one block's stashed residuals and weight residuals.
2. Turns them into a per-stage `Cost` for every `virtual` from 1 to `parallel.virtual`, in units of
   one block's forward (`jpipe.schedules.stage_costs` with `ModelCosts`): stage 0's F and I also
   embed, the last stage's F also runs the head and loss forward and backward (where the executor
   runs them), and every stage costs the largest stage's layers (`PipelinedLM` pads uneven stages
   with identity layers that still compute).
3. Searches (`jpipe.schedules.search_result`, lockstep, with the send latency of
   `overlap_sends=true`) within `parallel.memory_limit` and at most `parallel.search_time` seconds,
   prints the chosen schedule's chart, its simulated makespan and bubble and the stash and
   weight-residual buffers the executor allocates for it (`compile_program`'s slots times the
   measured bytes) next to the limit and to the best named schedule's that fits, and the run writes
   it to `<out>/schedule.csv` (torch.pipelining's format, `jpipe.schedules.to_csv`) with the numbers
   in `<out>/schedule_search.json`.
4. Prints the memory/time trade-off of the named schedules (`v_half` and `v_min` among them): their
   Pareto front of simulated makespan against buffer memory (`SearchResult.front`; each B split or
   whole as the executor's `split_backward="auto"` runs it), makespans also relative to 1F1B's, and
   keeps it in `schedule_search.json` (`"pareto_front"`). With a limit of 1.25x 1F1B's memory the
   chosen schedule is never slower (simulated) than 1F1B: 1F1B fits, and the search returns at
   worst the best named schedule that fits. Cost-balanced ticks (`balance_ticks`) are not on the
   front (their packing takes seconds per schedule); `experiments/maxtext_memory.py --tradeoff`
   measures them.

A resumed run (`--resume`) reads the schedule back from `schedule.csv` instead of searching again,
unless what the search depends on changed (stages, microbatches, virtual, memory limit, remat, data
parallelism or send latency): then it searches again and says why.

Memory: the limit bounds the stash and weight-residual buffers the executor allocates per device,
in microbatch x full device stage: `compile_program`'s `num_stash_slots` times one chunk's stash plus
its `num_weight_slots` times one chunk's weight residuals (each buffer sized for its own peak, the
most any device needs, since every device of the SPMD program allocates the same; the search's
count, `jpipe.schedules.buffer_slots`). One such stash, in bytes (`ModelMeasure.stash_bytes`),
is what the executor keeps between a microbatch's F and its backward on one device: the residuals
`jax.vjp` of the blocks saves under the run's remat policy (the parameters excluded), one block's
bytes (`measure_costs`' `stash_bytes`, on a microbatch divided by the data axis) times the layers a
device holds, counting padding slots; the weight residuals an I keeps for its W count in the same
unit (their measured bytes over the stash's: `Cost.weight_residuals`). Not counted: parameters,
gradients, optimizer state, the inbox buffers of messages in flight, XLA's temporaries; the
embedding and the head stash nothing (the executor recomputes the lookup; the head's backward runs
in its F). With tensor parallelism the residuals are counted unsplit (an upper bound). A limit in
bytes is divided by the stash bytes of the `virtual` whose padded layers per device are most (so it
holds for every `virtual` tried).
Unset, the limit is what the executor allocates for 1F1B (B split into I and W): p stash slots and
one weight-residual slot, so the chosen schedule's buffers are at most 1F1B's (with fewer
microbatches than stages, where 1F1B does not build, the least that a named schedule needs).

Multi-process runs search without the time limit (the search is then a function of its budget and
seed alone), so every process finds the same schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Callable
from typing import IO, Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpipe import schedules
from jpipe.models.gpt import GPT, params_of
from jpipe.models.layers import block_class
from jpipe.models.layout import StageLayout
from jpipe.models.parts import LMParts
from jpipe.pipeline.costs import StageCosts, measure_costs, xla_flops
from jpipe.pipeline.program import compile_program
from jpipe.pipeline.stage import layered
from jpipe.schedules import Cost, ModelCosts, Schedule, SearchResult
from jpipe.train.config import AUTO, ConfigError, MemoryLimit, format_bytes
from jpipe.train.presets import TrainConfig

SCHEDULE_CSV = "schedule.csv"
SEARCH_JSON = "schedule_search.json"
SEED = 0  # the search's seed: a run's schedule does not depend on its parameter seed


@dataclasses.dataclass(frozen=True)
class ModelMeasure:
    """The model's parts measured on one microbatch on one device (XLA FLOPs, bytes).

    Attributes:
      layer: one block (a one-layer `jpipe.layered` stage): F/B/I/W FLOPs, stash and weight residual bytes.
      embed_f: FLOPs of the embedding's forward.
      embed_b: FLOPs of its backward as the executor runs it (the lookup recomputed, then its vjp).
      head_f: FLOPs of the final norm, head and loss forward.
      head_b: FLOPs of their backward (value and gradient, minus the forward).
      num_layers: the model's blocks.
      num_devices: pipeline devices (`parallel.stage`).
    """

    layer: StageCosts
    embed_f: float
    embed_b: float
    head_f: float
    head_b: float
    num_layers: int
    num_devices: int

    def model_costs(self) -> ModelCosts:
        """The parts' costs in units of one block's forward."""
        unit = self.layer.flops["f"] or 1.0
        layer = self.layer.cost()  # F = 1, weight_residuals relative to the stash
        return ModelCosts(
            Cost(f=layer.f, b=layer.b, i=layer.i, w=layer.w),
            embed_f=self.embed_f / unit,
            embed_b=self.embed_b / unit,
            head_f=self.head_f / unit,
            head_b=self.head_b / unit,
        )

    def layer_counts(self, virtual: int) -> tuple[int, ...]:
        """Blocks per logical stage with `virtual` chunks per device (`PipelinedLM`'s default layout)."""
        return StageLayout.balanced(self.num_layers, self.num_devices * virtual).layer_counts

    def cost(self, virtual: int) -> Cost:
        """The per-stage `Cost` of the `num_devices * virtual` stages (padded to the largest)."""
        return schedules.stage_costs(
            self.layer_counts(virtual),
            self.model_costs(),
            padded=True,
            weight_residuals=self.layer.cost().weight_residuals,
        )

    def stage_costs(self, virtual: int) -> StageCosts:
        """The largest stage's `StageCosts` with `virtual` chunks (what `PipelinedLM.stage_costs` gives)."""
        layers = max(self.layer_counts(virtual))
        return dataclasses.replace(
            self.layer,
            stash_bytes=self.layer.stash_bytes * layers,
            weight_residual_bytes=self.layer.weight_residual_bytes * layers,
        )

    def stash_bytes(self, virtual: int) -> int:
        """Bytes of one microbatch x full device stage with `virtual` chunks (padding slots counted)."""
        return self.layer.stash_bytes * max(self.layer_counts(virtual)) * virtual


def measure_model(config: TrainConfig) -> ModelMeasure:
    """Measure `config`'s model on one device's part of one microbatch (compiles eight small programs)."""
    model, parallel = config.model, config.parallel
    parts = LMParts(model)
    microbatch = config.data.batch_size // parallel.microbatches
    batch, seq = max(1, microbatch // parallel.data), config.data.seq_len
    one_layer = jax.eval_shape(lambda: params_of(block_class(model)(model, rngs=nnx.Rngs(0))))
    stage_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape), a.dtype), one_layer)
    x = jax.ShapeDtypeStruct((batch, seq, model.d_model), model.residual_dtype)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    layer = measure_costs(layered(parts.layer_fn), stage_params, x, remat=parallel.remat)

    params = jax.eval_shape(lambda: params_of(GPT(model, rngs=nnx.Rngs(0))))
    loss_params, embed_params = parts.loss_params(params), params["embed"]

    def head(loss_params, x, targets):
        return parts.head_loss(loss_params, x, targets)

    def embed(embed_params, tokens):
        return parts.embed({"embed": embed_params}, tokens)

    def embed_backward(embed_params, tokens, grad):
        return jax.vjp(lambda p: embed(p, tokens), embed_params)[1](grad)

    def flops(fn: Callable, *args: Any) -> float:
        return xla_flops(jax.jit(fn).lower(*args).compile())

    head_f = flops(head, loss_params, x, tokens)
    head_fb = flops(jax.value_and_grad(head, argnums=(0, 1)), loss_params, x, tokens)
    return ModelMeasure(
        layer=layer,
        embed_f=flops(embed, embed_params, tokens),
        embed_b=flops(embed_backward, embed_params, tokens, x),
        head_f=head_f,
        head_b=max(0.0, head_fb - head_f),
        num_layers=model.num_layers,
        num_devices=parallel.stage,
    )


@dataclasses.dataclass(frozen=True)
class AutoSchedule:
    """A searched schedule and what it was searched for.

    Attributes:
      result: what `jpipe.schedules.search_result` returned.
      limit: the memory limit searched with, in microbatch x stage stashes.
      stash_bytes: bytes of one stash with the chosen schedule's `virtual` (`ModelMeasure.stash_bytes`).
      key: what the search depends on (`search_key`): a resumed run reuses the schedule while it holds.
      report: the text printed (chart, comparison and the named schedules' memory/time trade-off).
      front: the named schedules' Pareto front (makespan against memory) as records (`front_records`).
    """

    result: SearchResult
    limit: float
    stash_bytes: int
    key: dict[str, Any]
    report: str
    front: tuple[dict[str, Any], ...] = ()


def send_latency(config: TrainConfig) -> int:
    """The lockstep send latency the search assumes: 1 when `overlap_sends` is true, else 0.

    With "auto" the executor turns the overlap on for the chosen schedule wherever the simulator
    finds it no slower, which the search does not foresee: with measured FLOPs (sends cost nothing)
    the one-tick latency can still pack faster, e.g. interleaved_1f1b on the MaxText job of
    `experiments/maxtext_memory.py` runs with hidden sends at 0.70 of 1F1B's step, 0.96 exposed
    (docs/memory.md).
    """
    return 1 if config.parallel.overlap_sends is True else 0


def search_key(config: TrainConfig) -> dict[str, Any]:
    """The configuration a searched schedule depends on (a resumed run searches again when it changes)."""
    parallel = config.parallel
    return {
        "stage": parallel.stage,
        "microbatches": parallel.microbatches,
        "virtual": parallel.virtual,
        "memory_limit": parallel.memory_limit,
        "remat": parallel.remat,
        "data": parallel.data,
        "send_latency": send_latency(config),
    }


def search_schedule(config: TrainConfig, measure: ModelMeasure, stream: IO[str]) -> AutoSchedule:
    """Search a schedule for `config` under `measure`'s costs; print the chart and the comparison.

    Raises ConfigError (naming `--memory-limit`) when no named schedule fits the limit.
    """
    parallel = config.parallel
    p, m, virtual, latency = parallel.stage, parallel.microbatches, parallel.virtual, send_latency(config)
    limit, limit_text = _limit(parallel.memory, measure, p, m, virtual)
    multi = jax.process_count() > 1
    time_limit = math.inf if multi else float(parallel.search_time)
    chunks = "virtual 1" if virtual == 1 else f"virtual 1..{virtual}"
    seconds = "no time limit: several processes" if multi else f"at most {time_limit:g} s"
    stream.write(f"searching schedules (p={p}, m={m}, {chunks}, limit {limit_text}, {seconds}) ...\n")
    stream.flush()
    try:
        result = schedules.search_result(
            p, m, measure.cost, memory_limit=limit, virtual=virtual, send_latency=latency, time_limit=time_limit,
            seed=SEED,
        )  # fmt: skip
    except ValueError as error:
        raise ConfigError(_no_fit(str(error), parallel.memory, limit, measure, virtual)) from error
    chosen_bytes = measure.stash_bytes(result.schedule.virtual)
    report = describe_search(result, latency, measure, limit)
    stream.write(report + "\n")
    stream.flush()
    front = tuple(front_records(result, measure, limit))
    return AutoSchedule(result, limit, chosen_bytes, search_key(config), report, front)


@dataclasses.dataclass(frozen=True)
class Buffers:
    """The stash and weight-residual buffers the executor allocates per device for one schedule.

    Attributes:
      stash_slots, weight_slots: `compile_program(schedule, split=True)`'s `num_stash_slots` and
        `num_weight_slots` (each the most any device needs; every device allocates them).
      stash_slot_bytes, weight_slot_bytes: the measured bytes of one slot (one chunk's stash, one
        chunk's weight residuals, the largest chunk's layers counted).
      stashes: the same buffers in microbatch x full device stage stashes (the limit's unit).
    """

    stash_slots: int
    weight_slots: int
    stash_slot_bytes: int
    weight_slot_bytes: int
    stashes: float

    @property
    def bytes(self) -> int:
        return self.stash_slots * self.stash_slot_bytes + self.weight_slots * self.weight_slot_bytes


def executor_buffers(schedule: Schedule, measure: ModelMeasure, latency: int, *, split: bool = True) -> Buffers:
    """What `compile_program` allocates for `schedule`'s stashes and weight residuals, with measured
    bytes (`split`: each B run as I then W, else whole)."""
    program = compile_program(schedule, split=split, send_latency=latency)
    v = schedule.virtual
    chunk = measure.stage_costs(v)
    wr = measure.layer.cost().weight_residuals
    return Buffers(
        stash_slots=program.num_stash_slots,
        weight_slots=program.num_weight_slots,
        stash_slot_bytes=chunk.stash_bytes,
        weight_slot_bytes=chunk.weight_residual_bytes,
        stashes=(program.num_stash_slots + wr * program.num_weight_slots) / v,
    )


def describe_search(result: SearchResult, latency: int, measure: ModelMeasure, limit: float) -> str:
    """The search's time, the chosen schedule's chart, and its numbers and buffers next to the limit
    and the best named schedule's."""
    split = _runs_split(result)
    searched = schedules.simulate(
        result.schedule, result.cost, "lockstep", split_backward=split[result.schedule], send_latency=latency
    )
    baseline = result.baseline
    named = schedules.simulate(
        baseline, measure.cost(baseline.virtual), "lockstep", split_backward=split[baseline], send_latency=latency
    )
    stopped = ", stopped by the time limit" if result.timed_out else ""
    if result.schedule is baseline:
        verdict = "nothing beat the best named schedule: training with it"
    else:
        verdict = f"the searched schedule is {1 - result.ratio:.1%} faster (simulated)"
    limit_bytes = limit * measure.stash_bytes(result.schedule.virtual)
    lines = [
        f"searched {result.evaluations} orders in {result.seconds:.1f} s{stopped}; {verdict}",
        schedules.render(result.schedule, width=160),
        "simulated lockstep, times in block forwards (XLA FLOPs); buffers: the stash and weight-residual slots",
        "the executor allocates on every device (compile_program, each buffer for its own peak) x measured bytes,",
        f"in microbatch x stage stashes; limit {limit:.3g} stashes = {format_bytes(limit_bytes)}",
        f"  {'':<12}{'schedule':<20}{'makespan':>10}{'bubble':>9}  buffers: stash + weight-residual slots",
    ]
    for label, schedule, sim in (("best named", baseline, named), ("chosen", result.schedule, searched)):
        buffers = executor_buffers(schedule, measure, latency, split=split[schedule])
        slots = (
            f"{buffers.stash_slots} x {format_bytes(buffers.stash_slot_bytes)} + {buffers.weight_slots} x "
            f"{format_bytes(buffers.weight_slot_bytes)} = {buffers.stashes:.3g} = {format_bytes(buffers.bytes)}"
        )
        name = f"{schedule.name} (v={schedule.virtual})"
        lines.append(f"  {label:<12}{name:<20}{sim.makespan:>10.1f}{sim.bubble_fraction:>9.1%}  {slots}")
    lines.append(f"  ratio chosen / best named makespan: {result.ratio:.3f}")
    lines += describe_front(result, measure, limit)
    return "\n".join(lines)


def _runs_split(result: SearchResult) -> dict[Schedule, bool]:
    """Whether the search counted the chosen schedule and the baseline with each B split (else whole)."""
    baseline = next((n.split for n in result.named if n.schedule is result.baseline), True)
    return {result.baseline: baseline, result.schedule: result.split}


def describe_front(result: SearchResult, measure: ModelMeasure, limit: float) -> list[str]:
    """The named schedules' memory/time trade-off: their Pareto front (`SearchResult.front`), one line
    each, makespan also relative to 1F1B's (as the executor runs it) when 1F1B was built."""
    reference = _one_f_one_b(result)
    relative = f"{'/ 1f1b':>8}" if reference else ""
    lines = [
        "memory/time trade-off of the named schedules (Pareto front: none is both faster and smaller):",
        f"  {'schedule':<34}{'makespan':>10}{relative}  buffers",
    ]
    for point in front_records(result, measure, limit):
        ratio = f"{point['makespan'] / reference.makespan:>8.3f}" if reference else ""
        fits = "" if point["fits"] else "  (over the limit)"
        lines.append(
            f"  {point['label']:<34}{point['makespan']:>10.1f}{ratio}  {point['memory']:.3g} stashes = "
            f"{format_bytes(point['bytes'])}{fits}"
        )
    return lines


def front_records(result: SearchResult, measure: ModelMeasure, limit: float) -> list[dict[str, Any]]:
    """`result.front` as records (kept in schedule_search.json): label, schedule, virtual, split,
    makespan, memory (stashes), bytes (memory x one stash's bytes for its `virtual`), fits."""
    return [
        {
            "label": point.label,
            "schedule": point.schedule.name,
            "virtual": point.virtual,
            "split": point.split,
            "makespan": point.makespan,
            "memory": point.memory,
            "bytes": int(point.memory * measure.stash_bytes(point.virtual)),
            "fits": point.memory <= limit * (1 + 1e-9),
        }
        for point in result.front
    ]


def _one_f_one_b(result: SearchResult) -> schedules.Named | None:
    """1F1B (virtual 1) as the search simulated it (B split or whole as the executor runs it), if built."""
    return next((n for n in result.named if n.schedule.name == "1f1b" and n.virtual == 1), None)


def _limit(limit: MemoryLimit | None, measure: ModelMeasure, p: int, m: int, virtual: int) -> tuple[float, str]:
    """The limit in stashes, and how to print it."""
    if limit is None:
        name, v, stashes = _least_memory(measure, p, m, virtual)
        return stashes, f"{stashes:.3g} stashes = {name}'s, {format_bytes(stashes * measure.stash_bytes(v))}"
    if limit.stashes is not None:
        size = format_bytes(limit.stashes * _unit_bytes(measure, virtual))
        return limit.stashes, f"{limit.stashes:g} stashes = {size}"
    unit = _unit_bytes(measure, virtual)
    stashes = limit.bytes / unit
    return stashes, f"{format_bytes(limit.bytes)} = {stashes:.3g} stashes of {format_bytes(unit)}"


def _least_memory(measure: ModelMeasure, p: int, m: int, virtual: int) -> tuple[str, int, float]:
    """The default limit: 1F1B's buffers as the search counts them; returns (name, virtual, stashes).

    1F1B does not build with fewer microbatches than stages; then the named schedule (virtual 1 to
    `virtual`) that needs least memory sets it.
    """
    names = (
        [("1f1b", 1)]
        if _builds("1f1b", p, m, 1)
        else [(n, v) for n in schedules.SCHEDULES for v in range(1, virtual + 1)]
    )
    found = []
    for name, v in names:
        if _builds(name, p, m, v):
            slots = schedules.buffer_slots(schedules.split_backward(schedules.build(name, p, m, v)))
            found.append((name, v, schedules.buffer_memory(slots, measure.cost(v).weight_residuals, v)))
    return min(found, key=lambda entry: entry[2])


def _builds(name: str, p: int, m: int, v: int) -> bool:
    try:
        schedules.build(name, p, m, v)
    except schedules.ScheduleError:
        return False
    return True


def _unit_bytes(measure: ModelMeasure, virtual: int) -> int:
    """The bytes of one stash for a limit given in bytes: the most over the virtual values tried."""
    return max(measure.stash_bytes(v) for v in range(1, virtual + 1))


def _no_fit(message: str, limit: MemoryLimit | None, stashes: float, measure: ModelMeasure, virtual: int) -> str:
    """The search's "no schedule fits" message, for the command line."""
    found = re.search(r"no schedule fits; the smallest limit that fits is ([0-9.e+-]+) (\(.*?\))", message)
    if found is None:
        return f"--memory-limit: {message}"
    smallest = float(found.group(1))
    given = str(limit) if limit is not None else "unset"
    unit = _unit_bytes(measure, virtual)
    return (
        f"--memory-limit: {given} ({stashes:.3g} microbatch x stage stashes of {format_bytes(unit)}): no schedule "
        f"fits; the smallest limit that fits is {smallest:.3g} stashes {found.group(2)} = "
        f"{format_bytes(smallest * unit)}"
    )


def save(out: pathlib.Path, searched: AutoSchedule) -> None:
    """Write the schedule to `<out>/schedule.csv` and the search's numbers to `<out>/schedule_search.json`."""
    result = searched.result
    (out / SCHEDULE_CSV).write_text(schedules.to_csv(result.schedule))
    record = {
        "key": searched.key,
        "schedule": result.schedule.name,
        "virtual": result.schedule.virtual,
        "makespan": result.makespan,
        "memory": result.memory,
        "stash_slots": max(s for s, _ in result.slots),
        "weight_slots": max(w for _, w in result.slots),
        "memory_limit_stashes": searched.limit,
        "stash_bytes": searched.stash_bytes,
        "baseline": result.baseline.name,
        "baseline_virtual": result.baseline.virtual,
        "baseline_makespan": result.baseline_makespan,
        "split": result.split,
        "baseline_split": _runs_split(result)[result.baseline],
        "ratio": result.ratio,
        "evaluations": result.evaluations,
        "seconds": result.seconds,
        "timed_out": result.timed_out,
        "pareto_front": searched.front,
    }
    (out / SEARCH_JSON).write_text(json.dumps(record, indent=2) + "\n")


def saved_schedule(out: pathlib.Path, config: TrainConfig, stream: IO[str]) -> Schedule | None:
    """The schedule a run in `out` searched, if it was searched for what `config` asks; else None.

    Says on `stream` which it is: reused (and its numbers), or why the search runs again.
    """
    if config.parallel.schedule != AUTO:
        return None
    csv_path, json_path = out / SCHEDULE_CSV, out / SEARCH_JSON
    if not csv_path.exists() or not json_path.exists():
        stream.write(f"resume: no searched schedule in {out}; searching\n")
        return None
    try:
        record = json.loads(json_path.read_text())
        schedule = schedules.from_csv(csv_path.read_text(), name=record["schedule"])
        schedules.validate(schedule)
        saved_key = dict(record["key"])
        numbers = (
            f"simulated makespan {record['makespan']:.1f} vs {record['baseline']}'s {record['baseline_makespan']:.1f}"
        )
    except (OSError, ValueError, KeyError, TypeError) as error:  # ScheduleError, JSONDecodeError: ValueErrors
        stream.write(f"resume: cannot read the searched schedule in {out} ({error}); searching again\n")
        return None
    key = search_key(config)
    changed = [
        f"{name} {saved_key.get(name)!r} -> {value!r}" for name, value in key.items() if saved_key.get(name) != value
    ]
    if changed:
        stream.write(
            f"resume: the saved schedule was searched for another layout ({', '.join(changed)}); searching again\n"
        )
        return None
    stream.write(
        f"resume: training with the schedule searched before ({csv_path}: {schedule.name}, v={schedule.virtual}, "
        f"{numbers})\n"
    )
    return schedule
