"""The training loop: pipelined GPT on a (data, stage, tensor) mesh, with checkpoints and resume.

Everything a run writes goes under `config.run.out`:

- `config.json`: the full configuration;
- `schedule.txt`, `schedule.png`: the schedule's text chart and simulated (lockstep) Gantt chart;
- with `--schedule auto`: `schedule.csv`, the searched schedule (torch.pipelining's CSV format),
  and `schedule_search.json`, the search's numbers; a resumed run trains with that schedule again
  (`jpipe.train.auto`);
- `metrics.jsonl`: one JSON object per step (`step`, `loss`, `grad_norm`, `learning_rate`,
  `step_seconds`, `tokens_per_second`, and `eval_loss` on evaluation steps; for the moe family the
  training batch's routing metrics too: `balance_loss`, `dropped_fraction`, `expert_load_max` and
  `expert_load_min`, see `jpipe.models.moe.routing_metrics`);
- `events.out.tfevents.*`: the same numbers as TensorBoard scalars of the same names
  (`tensorboard --logdir <out>`);
- with `--profile-steps N..M`: `profile/plugins/profile/<time>/`, a `jax.profiler` trace of steps N
  to M (`<host>.xplane.pb`, read by xprof and TensorBoard's profile plugin, and `<host>.trace.json.gz`);
- `checkpoints/<step>/`: orbax checkpoints of parameters *by layer* (the model layout, independent
  of stages, virtual chunks and schedule), optimizer state in the same layout, and metadata (step,
  data position, seed, configuration);
- `loss.png`: the loss curve.

Batches are a function of (data seed, step), so a resumed run sees exactly the batches the killed
run would have seen. A non-finite loss stops the run before anything is saved: the last good
checkpoint stays the newest. A watched signal (`jpipe.train.preemption`) stops it after the step in
flight, with that step saved.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import pathlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpipe import schedules
from jpipe.models.pipelined import PipelinedLM
from jpipe.parallel import links
from jpipe.parallel.mesh import DATA, STAGE, TENSOR, make_mesh
from jpipe.parallel.rules import DEFAULT_RULES, ShardingRules
from jpipe.pipeline.costs import StageCosts
from jpipe.pipeline.options import PipelinePlan
from jpipe.train import auto
from jpipe.train.checkpoint import Checkpointer
from jpipe.train.config import AUTO, ConfigError, as_dict
from jpipe.train.data import TokenDataset, cache_dir, open_datasets
from jpipe.train.init_from import InitSource
from jpipe.train.metrics import MetricsWriter, Progress, flat_metrics, plot_loss_curve, read_metrics, routing_summary
from jpipe.train.optimizer import learning_rate_schedule, make_optimizer
from jpipe.train.preemption import SignalWatch, StepDecider, exit_status, fire_test_signal
from jpipe.train.presets import TrainConfig
from jpipe.train.schedule_arg import csv_schedule
from jpipe.train.step import compiler_options_for, jit_eval_step, jit_train_step, map_params_like, optimizer_shardings

PyTree = Any


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after the last finite step."""


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a finished run reports; `stopped_by` is the signal that stopped it early (None: it was not)."""

    out: pathlib.Path
    first_step: int
    last_step: int
    losses: tuple[float, ...]
    final_eval_loss: float | None
    stopped_by: signal.Signals | None = None


# How checkpoints store an untied head: `[vocab, d_model]`, as the embedding table (and torch's
# `lm_head.weight`). Checkpoints without this marker in their metadata store it `[d_model, vocab]`.
HEAD_LAYOUT = "vocab_embed"


def _transpose_head(params: PyTree) -> PyTree:
    """`params` (model layout) with the untied head's `out` transposed (arrays, or shapes with shardings)."""
    out = params["head"]["out"]
    if isinstance(out, jax.ShapeDtypeStruct):
        transposed = jax.ShapeDtypeStruct(out.shape[::-1], out.dtype, sharding=_transpose_sharding(out.sharding))
    elif isinstance(out, jax.sharding.NamedSharding):
        transposed = _transpose_sharding(out)
    else:
        transposed = out.T
    return {**params, "head": {**params["head"], "out": transposed}}


def _transpose_sharding(sharding: jax.sharding.Sharding | None) -> jax.sharding.Sharding | None:
    """The `NamedSharding` of a 2-D array's transpose (other shardings unchanged)."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[::-1]))


def model_shardings(pipe: PipelinedLM) -> PyTree:
    """A `NamedSharding` per model-layout parameter (blocks `[L, ...]`): how a checkpoint is read back.

    The rules' shardings of the pipeline layout (tensor, FSDP), with the blocks' layer axis split
    over `stage` when the stage axis divides the number of layers (so each device reads its share of
    the layers, not all of them), else whole on every stage.
    """
    axes = pipe.logical_axes()  # blocks: ("stage", "layer", ...) in the pipeline layout
    over_stage = pipe.config.num_layers % pipe.mesh.shape[STAGE] == 0
    axes["blocks"] = jax.tree.map(
        lambda names: ("stage" if over_stage else "layer", *names[2:]),
        axes["blocks"],
        is_leaf=lambda names: isinstance(names, tuple),
    )
    abstract = jax.eval_shape(pipe.to_model, pipe.abstract_params())
    return pipe.rules.param_shardings(axes, abstract, pipe.mesh)


def local_rows(sharding: jax.sharding.Sharding, shape: tuple[int, int, int]) -> list[int]:
    """The rows of the global batch (`m x b` of them, in microbatch-major order) that this process's
    devices hold of an `[m, b, T]` array with `sharding`."""
    m, b = shape[0], shape[1]
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        microbatches, examples = (range(*s.indices(n)) for s, n in zip(tuple(index)[:2], (m, b)))
        rows.update(mb * b + row for mb in microbatches for row in examples)
    return sorted(rows)


def _microbatches(
    dataset: TokenDataset, seed: int, step: int, batch_size: int, num_microbatches: int, sharding: jax.sharding.Sharding
) -> tuple[jax.Array, jax.Array]:
    """The global batch at `step` as `[m, B/m, T]` token and target arrays with `sharding` (batch over `data`).

    The batch is a function of seed and step; each process reads only the rows its own devices hold
    (`local_rows`) and hands JAX those shards, which also works when the data axis spans processes.
    """
    shape = (num_microbatches, batch_size // num_microbatches, dataset.seq_len)
    rows = local_rows(sharding, shape)
    read = dataset.rows(seed, step, batch_size, rows)

    def split(a):
        full = np.zeros((batch_size, shape[2]), a.dtype)  # rows of other processes stay zero: never read
        full[rows] = a
        full = full.reshape(shape)
        return jax.make_array_from_callback(shape, sharding, lambda index: full[index])

    return split(read["inputs"]), split(read["targets"])


def _with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """`jax.ShapeDtypeStruct`s with `abstract`'s shapes and dtypes and `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def training_mesh(parallel, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The (data, stage, tensor) mesh over the first `parallel.num_devices` of `devices`.

    `devices` defaults to `jax.devices()`; `jpipe.compile` passes a TPU topology's devices. When they
    belong to several processes (hosts), the stage axis spans the processes: devices come process by
    process, so ordering them stage-major puts consecutive pipeline stages on different hosts, and the
    pipeline's point-to-point traffic crosses hosts while data and tensor parallel collectives stay
    inside a host.
    """
    devices = list(jax.devices() if devices is None else devices)
    if len({device.process_index for device in devices}) == 1:
        return make_mesh(data=parallel.data, stage=parallel.stage, tensor=parallel.tensor, devices=devices)
    grid = np.array(devices[: parallel.num_devices]).reshape(parallel.stage, parallel.data, parallel.tensor)
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.sharding.Mesh(grid.transpose(1, 0, 2), (DATA, STAGE, TENSOR), axis_types=auto)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """A run's training step and what it is built from: what `train` runs and `jpipe.compile` compiles.

    Attributes:
      pipe: the pipelined GPT on the run's mesh, its `options.cost` set from `costs` (with schedule
        "auto": the per-stage cost the search used, the embedding and head included).
      costs: the largest stage's measured F/B/I/W costs (XLA FLOPs on the default backend); they
        decide `split_backward="auto"`.
      optimizer: AdamW with warmup and cosine decay over `config.run.steps`, or `optimizer.decay_steps`
        when set (`jpipe.train.optimizer`).
      learning_rate: its schedule, step -> learning rate.
      step: `jpipe.train.step.train_step`, jitted: `(params, opt_state, tokens, targets) -> (params,
        opt_state, loss, grad_norm)`, then the batch's metrics with `has_aux`. The state arguments
        are donated (updated in place) and come back with the same shardings, so the second call
        does not recompile.
      eval_loss: `jpipe.train.step.eval_step`, jitted: `(params, tokens, targets) -> loss`.
      param_shardings: a `NamedSharding` per parameter (pipeline layout).
      opt_shardings: a `NamedSharding` per optimizer-state leaf: Adam's moments like the parameters,
        everything else (step counts) replicated.
      batch_sharding: of `tokens` and `targets`, int32 `[m, B / m, T]`: batch split over `data`.
      batch_shape: `(m, B / m, T)`: microbatches, global examples per microbatch, sequence length.
      search: with schedule "auto", the search that chose `pipe.schedule` (None when the schedule
        was given, e.g. read back on resume).
      plan: what the step runs: `pipe.options` with its "auto" choices resolved, once
        (`jpipe.pipeline.PipelinePlan`).
      has_aux: the step returns auxiliary metrics (the moe family's routing metrics).
    """

    pipe: PipelinedLM
    costs: StageCosts
    optimizer: optax.GradientTransformation
    learning_rate: optax.Schedule
    step: Callable
    eval_loss: Callable
    param_shardings: PyTree
    opt_shardings: PyTree
    batch_sharding: jax.sharding.NamedSharding
    batch_shape: tuple[int, int, int]
    search: auto.AutoSchedule | None = None
    plan: PipelinePlan | None = None
    has_aux: bool = False

    @functools.cached_property
    def lockstep(self) -> schedules.Simulation:
        """The lockstep simulation of what the step runs (its plan's split and sends, the pipe's cost)."""
        plan = self.plan
        return schedules.simulate(
            plan.schedule or self.pipe.schedule,
            self.pipe.options.cost,
            mode="lockstep",
            split_backward=plan.split,
            send_latency=int(plan.overlap),
        )

    def init_state(self, seed: int) -> tuple[PyTree, PyTree]:
        """Fresh parameters (`pipe.init(seed)`) and optimizer state, created with their shardings."""
        params = self.pipe.init(seed=seed)
        return params, jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)

    def abstract_arguments(self) -> tuple[PyTree, PyTree, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        """`step`'s arguments as `jax.ShapeDtypeStruct`s with their shardings, to `step.lower(*...)`."""
        params = _with_shardings(self.pipe.abstract_params(), self.param_shardings)
        opt_state = _with_shardings(jax.eval_shape(self.optimizer.init, params), self.opt_shardings)
        tokens = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=self.batch_sharding)
        return params, opt_state, tokens, tokens


def build_train_step(
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    *,
    schedule: schedules.Schedule | None = None,
    stream: IO[str] | None = None,
) -> TrainStep:
    """The training step of `config` on `mesh` (see `training_mesh`), and its shardings.

    Measures the stage's costs (compiles each op alone for the default backend: seconds), wraps the
    pipelined loss-and-gradient step and the optimizer update in one jitted step; allocates nothing.
    With schedule "auto" it measures the whole model and searches a schedule (`jpipe.train.auto`,
    printing on `stream`, default the current `sys.stdout`) unless `schedule` is given.
    """
    stream = sys.stdout if stream is None else stream
    parallel = config.parallel
    search = None
    if parallel.schedule == AUTO:
        measure = auto.measure_model(config)
        if schedule is None:
            search = auto.search_schedule(config, measure, stream)
            schedule = search.result.schedule
        costs, cost = measure.stage_costs(schedule.virtual), measure.cost(schedule.virtual)
    elif schedule is None:
        schedule = csv_schedule(parallel)  # None unless --schedule names a CSV file
    if schedule is None:
        # Sends hidden on request: the two-stream order makes up the extra tick they take, where its
        # memory stays within parallel.two_stream_memory of the named order's.
        schedule = schedules.build(
            parallel.schedule,
            parallel.stage,
            parallel.microbatches,
            parallel.virtual,
            send_latency=auto.send_latency(config),
            streams_memory_limit=parallel.two_stream_memory,
            **parallel.schedule_options,
        )
    pipe = PipelinedLM(
        config.model,
        schedule=schedule,
        mesh=mesh,
        rules=ShardingRules(
            {**DEFAULT_RULES, "expert": DATA} if parallel.expert_parallel else DEFAULT_RULES, fsdp=parallel.fsdp
        ),
        options=parallel.pipeline_options(),
    )
    microbatch = config.data.batch_size // parallel.microbatches
    if parallel.schedule != AUTO:
        costs = pipe.stage_costs(batch=max(1, microbatch // parallel.data))
        cost = costs.cost(comm=_send_comm(config, costs, mesh), per="chunk")  # the largest logical stage: one chunk
    pipe = dataclasses.replace(pipe, options=dataclasses.replace(pipe.options, cost=cost))
    optimizer = make_optimizer(config.optimizer, config.run.steps)
    has_aux = config.model.moe  # the routing metrics come out of the pipeline beside the loss
    loss_and_grads = pipe.value_and_grad(has_aux=has_aux)
    param_shardings = pipe.shardings()
    opt_shardings = optimizer_shardings(optimizer, pipe.abstract_params(), param_shardings, mesh)
    return TrainStep(
        pipe=pipe,
        costs=costs,
        optimizer=optimizer,
        learning_rate=learning_rate_schedule(config.optimizer, config.run.steps),
        # Outputs keep the inputs' shardings (so the second step does not recompile); the old state is
        # donated, so parameters and optimizer state are updated in place.
        step=jit_train_step(
            loss_and_grads,
            optimizer,
            param_shardings,
            opt_shardings,
            compiler_options_for(mesh.devices.flat),
            has_aux=has_aux,
        ),
        eval_loss=jit_eval_step(pipe.evaluate(_evaluation_schedule(pipe.schedule))),
        param_shardings=param_shardings,
        opt_shardings=opt_shardings,
        batch_sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, DATA)),
        batch_shape=(parallel.microbatches, microbatch, config.data.seq_len),
        search=search,
        plan=loss_and_grads.plan,
        has_aux=has_aux,
    )


def _send_comm(config: TrainConfig, costs: StageCosts, mesh: jax.sharding.Mesh) -> float:
    """A pipeline message's send time in units of one F, for `overlap_sends="auto"` (`jpipe.parallel.links`).

    The message is one microbatch's activation on one device (batch x sequence x d_model in the
    compute dtype); 0.0 on devices whose peak or links are unknown (CPU), where sends stay exposed.
    """
    batch = max(1, config.data.batch_size // config.parallel.microbatches // config.parallel.data)
    itemsize = jnp.dtype(config.model.compute_dtype).itemsize
    message = batch * config.data.seq_len * config.model.d_model * itemsize
    devices = mesh.devices
    crosses = links.stage_axis_crosses_hosts(devices, mesh.axis_names.index(STAGE))
    return links.send_comm(message, costs.flops["f"], devices.flat[0].device_kind, crosses_hosts=crosses)


def _evaluation_schedule(schedule: schedules.Schedule) -> schedules.Schedule:
    """The schedule evaluation runs: the training one, except that SkipPipe's evaluates every layer.

    A skipping route trains on part of the model; held-out loss is the full model's, so it runs on
    the same placement with no skips (`skip_ratio=0`).
    """
    if schedule.name.startswith("skippipe"):
        return schedules.build(
            "skippipe", schedule.num_devices, schedule.num_microbatches, schedule.virtual, skip_ratio=0.0
        )
    return schedule


def describe(config: TrainConfig, built: TrainStep, stream: IO[str], *, show_chart: bool = True) -> str:
    """Print the mesh, the schedule chart, the stage's measured costs and the simulated bubble and memory.

    The simulation uses the pipe's cost (per stage for a searched schedule) and the step's plan.
    `show_chart=False` leaves the chart out (the search printed it already). Returns the chart.
    """
    pipe, costs, plan = built.pipe, built.costs, built.plan
    schedule, cost = pipe.schedule, pipe.options.cost
    mesh_text = " x ".join(f"{name}={size}" for name, size in pipe.mesh.shape.items())
    asynchronous = schedules.simulate(schedule, cost, mode="async")
    lockstep = built.lockstep
    split, hidden = plan.split, plan.overlap
    chart = schedules.render(plan.schedule if plan.balanced else schedule, width=160)  # what the executor runs
    lines = [
        f"mesh: {mesh_text} ({len(pipe.mesh.devices.flat)} {jax.default_backend()} devices)",
        f"model: {config.model.num_layers} layers, d_model {config.model.d_model}, "
        f"{config.model.num_heads} heads, seq {config.data.seq_len}",
        f"layers per stage: {list(pipe.layout.layer_counts)}",
        chart if show_chart else "",
        f"stage costs per microbatch (XLA FLOPs): {costs}",
        f"simulated with {'per-stage costs' if cost.num_stages else 'these costs'} (F={_times(cost.f)}, "
        f"B={_times(cost.b)}, I={_times(cost.i)}, W={_times(cost.w)}): bubble "
        f"{asynchronous.bubble_fraction:.1%} async, {lockstep.bubble_fraction:.1%} lockstep (this executor, "
        f"backward {'split into I and W' if split or schedule.split_backward else 'whole'}, sends "
        f"{'hidden behind the next tick' if hidden else 'after each tick'}"
        f"{', cost-balanced ticks' if plan.balanced else ''}); peak memory "
        f"{max(lockstep.peak_memory):.3g} microbatch x stage stashes (device max)",
    ]
    text = "\n".join(line for line in lines if line)
    stream.write(text + "\n")
    stream.flush()
    return chart


def _times(value: float | tuple[float, ...]) -> str:
    """A `Cost` time: one number, or per stage `(f0, f1, ...)`."""
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{x:.2f}" for x in value) + ")"
    return f"{value:.2f}"


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    stream: IO[str] | None = None,
    signals: SignalWatch | None = None,
    init_from: InitSource | None = None,
) -> RunSummary:
    """Run (or resume) training as configured, printing on `stream` (default the current `sys.stdout`).

    Returns the losses of the steps it ran. A new run (not resumed) starts from the weights of
    `init_from` when given (`jpipe.train.init_from`), with a new optimizer state. With `signals`
    (installed by the caller), a signal it records stops the run after the step in flight: that step
    is saved, pending saves commit, the writers close, and the summary's `stopped_by` names the
    signal. All processes stop after the same step (`jpipe.train.preemption.StepDecider`), which also
    saves every `run.checkpoint_every_minutes`.
    """
    run = _open_run(config, resume, sys.stdout if stream is None else stream)
    data = open_datasets(config.data, config.model.vocab_size, cache_dir())
    checkpointer = Checkpointer(run.out / "checkpoints", keep=config.run.keep_checkpoints, async_save=True)
    start, params, opt_state = _initial_state(run, checkpointer, resume, init_from)
    loop = _StepLoop(run, checkpointer, start, resume, signals)
    try:
        stopped_by = loop.steps(data, params, opt_state)
    finally:
        loop.close()
    losses = tuple(loop.losses)
    if stopped_by is not None:
        loop.progress.message(
            f"preempted at step {start + len(losses)}; saved; resume with --resume "
            f"({stopped_by.name}: exit status {exit_status(stopped_by)})"
        )
        return RunSummary(run.out, start + 1, start + len(losses), losses, loop.final_eval, stopped_by)
    if run.lead:
        title = f"{run.built.pipe.schedule.name}, {run.out.name}"
        plot_loss_curve(read_metrics(run.out / "metrics.jsonl"), run.out / "loss.png", title=title)
    final = losses[-1] if losses else float("nan")
    loop.progress.message(f"done: {len(losses)} steps, final loss {final:.4f}; wrote {run.out}")
    return RunSummary(run.out, start + 1, start + len(losses), losses, loop.final_eval)


@dataclasses.dataclass(frozen=True)
class _Run:
    """A run's fixed parts: its configuration, output folder, built step, and where it reports.

    In a multi-process run every process trains; process 0 (`lead`) alone writes files and prints
    (the others' `stream` is a discarded buffer).
    """

    config: TrainConfig
    out: pathlib.Path
    lead: bool
    stream: IO[str]
    built: TrainStep


def _open_run(config: TrainConfig, resume: bool, stream: IO[str]) -> _Run:
    """Make the output folder, build the training step and write what describes the run."""
    out = pathlib.Path(config.run.out)
    out.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    if not lead:
        stream = io.StringIO()
    if lead:
        (out / "config.json").write_text(json.dumps(as_dict(config), indent=2, default=str) + "\n")
    mesh = training_mesh(config.parallel)
    # A resumed "auto" run trains with the schedule it searched before.
    searched = auto.saved_schedule(out, config, stream) if resume else None
    built = build_train_step(config, mesh, schedule=searched, stream=stream)
    chart = describe(config, built, stream, show_chart=built.search is None)
    if lead:
        if built.search is not None:
            auto.save(out, built.search)
            stream.write(f"wrote the searched schedule to {out / auto.SCHEDULE_CSV}\n")
        (out / "schedule.txt").write_text(chart + "\n")
        schedules.plot(built.lockstep, out / "schedule.png")
    return _Run(config, out, lead, stream, built)


def _initial_state(
    run: _Run, checkpointer: Checkpointer, resume: bool, init_from: InitSource | None
) -> tuple[int, PyTree, PyTree]:
    """`(step, params, opt_state)` to start from: the newest checkpoint when resuming, else a new state.

    Raises (closing `checkpointer`) when a resume would start after the last step, or when a new run's
    folder already holds checkpoints.
    """
    latest, total = checkpointer.latest_step(), run.config.run.steps
    if resume and latest is not None:
        start, params, opt_state = _restore(checkpointer, run.built, run.stream)
        _report_skipped(checkpointer, start, run.stream)
        if start > total:
            checkpointer.close()
            raise ConfigError(
                f"run.steps: the run in {run.out} resumes from its checkpoint at step {start}, after its last step "
                f"{total}; pass --steps {start} or more"
            )
        return start, params, opt_state
    if latest is not None:
        checkpointer.close()
        raise FileExistsError(
            f"{run.out / 'checkpoints'} already holds checkpoints (latest step {latest}); "
            "pass --resume to continue that run, or choose another --out"
        )
    if resume:
        run.stream.write("resume: no checkpoint yet; starting from step 0\n")
        _report_skipped(checkpointer, 0, run.stream)
    params, opt_state = run.built.init_state(run.config.run.seed)
    if init_from is not None:
        params = _weights_from(init_from, run.built, run.stream)
    return 0, params, opt_state


class _StepLoop:
    """The steps of a run after `start`: train, log, evaluate, profile, save, and stop when asked.

    `steps` runs them and returns the signal that stopped the run early (None when it ran to its last
    step or to `--stop-at-step`); `losses` and `final_eval` hold what it measured; `close` stops the
    profiler and closes the metrics writers and the checkpointer (waiting for the last save).
    """

    def __init__(self, run: _Run, checkpointer: Checkpointer, start: int, resume: bool, signals: SignalWatch | None):
        config, out, lead, process = run.config, run.out, run.lead, jax.process_index()
        self.run, self.checkpointer, self.start, self.signals = run, checkpointer, start, signals
        metrics_path = out / "metrics.jsonl" if lead else out / f".metrics.process{process}.jsonl"
        self.metrics = MetricsWriter(
            metrics_path, resume_from_step=start + 1 if resume else None, events=out if lead else None
        )
        if lead:
            run.stream.write(
                f"metrics: {out / 'metrics.jsonl'}, and TensorBoard event files (tensorboard --logdir {out})\n"
            )
        self.progress = Progress(config.run.steps, run.stream)
        # Each process traces its own host; on one machine, processes other than 0 write beside process 0.
        trace_dir = out / ("profile" if lead else f"profile-process{process}")
        self.profiler = StepProfiler(config.run.profile_range, trace_dir, self.progress)
        if self.profiler.steps is not None and self.profiler.steps[1] <= start:
            self.progress.message(
                f"profile: steps {config.run.profile_steps} were run before step {start + 1}; no trace"
            )
        self.decider = StepDecider(
            signals, config.run.checkpoint_every_minutes, processes=jax.process_count(), lead=lead
        )
        self.losses: list[float] = []
        self.final_eval: float | None = None
        pipe = run.built.pipe
        structure = jax.tree.structure(pipe.abstract_params())
        # One compiled program for the layout change: with several processes, a string of eager ops on
        # arrays spanning them can deadlock between the processes' collectives.
        self._to_model_state = jax.jit(
            lambda params, opt_state: (pipe.to_model(params), map_params_like(pipe.to_model, opt_state, structure))
        )

    def steps(
        self, data: tuple[TokenDataset, TokenDataset], params: PyTree, opt_state: PyTree
    ) -> signal.Signals | None:
        """Run steps `start + 1 ..` (see the class); `data` is `(train, eval)`."""
        run_config = self.run.config.run
        for step in range(self.start + 1, run_config.steps + 1):
            params, opt_state, record = self._train(data[0], step, params, opt_state)
            if step % run_config.eval_every == 0 or step == run_config.steps:
                self.final_eval = _evaluate(
                    self.run.built.eval_loss, params, data[1], self.run.config, self.run.built.batch_sharding
                )
                record["eval_loss"] = self.final_eval
            self.metrics.write(record)
            if step % run_config.log_every == 0 or step == run_config.steps:
                extra = routing_summary(record) + (f"  eval {record['eval_loss']:.4f}" if "eval_loss" in record else "")
                self.progress.update(step, record["loss"], record["tokens_per_second"], record["step_seconds"], extra)
            self.profiler.after(step, (params, opt_state))
            fire_test_signal("after-step", step, self.signals, jax.process_index())
            stop, stopped_by = self._save_or_stop(step, params, opt_state)
            if stop:
                return stopped_by
        return None

    def _train(
        self, dataset: TokenDataset, step: int, params: PyTree, opt_state: PyTree
    ) -> tuple[PyTree, PyTree, dict]:
        """One training step -> `(params, opt_state, metrics record)`; a non-finite loss stops the run."""
        config, built = self.run.config, self.run.built
        tokens, targets = _microbatches(
            dataset,
            config.data.seed,
            step - 1,
            config.data.batch_size,
            config.parallel.microbatches,
            built.batch_sharding,
        )
        self.profiler.before(step)
        began = time.perf_counter()
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            params, opt_state, loss, grad_norm, *metrics = built.step(params, opt_state, tokens, targets)
            loss = float(loss)
        seconds = time.perf_counter() - began
        record = {
            "step": step,
            "loss": loss,
            "grad_norm": float(grad_norm),
            "learning_rate": float(built.learning_rate(step - 1)),
            "step_seconds": seconds,
            "tokens_per_second": config.data.batch_size * config.data.seq_len / seconds,
            **(flat_metrics(metrics[0]) if metrics else {}),
        }
        if not math.isfinite(loss):
            self.metrics.write({**record, "loss": None, "nonfinite": True})
            self.progress.message(
                f"stopping: the loss is {loss} at step {step}; no checkpoint was written after step "
                f"{self.checkpointer.latest_step()} (the last good one). Lower the learning rate or check the data."
            )
            raise TrainingDivergedError(f"non-finite loss {loss} at step {step}")
        self.losses.append(loss)
        return params, opt_state, record

    def _save_or_stop(self, step: int, params: PyTree, opt_state: PyTree) -> tuple[bool, signal.Signals | None]:
        """Save when due; `(stop, signal)`: whether the run stops after `step`, and the signal that stopped it."""
        run_config = self.run.config.run
        stopping = step == run_config.stop_at_step
        saved = step % run_config.checkpoint_every == 0 or step == run_config.steps or stopping
        if saved:
            self._save(step, params, opt_state)
        # After the last step (or --stop-at-step's) the run saves and ends anyway: nothing to decide.
        if step < run_config.steps and not stopping and self.decider.active:
            decision = self.decider.decide()  # the same on every process
            if (decision.stop_signal or decision.save_due) and not saved:
                self._save(step, params, opt_state)
            if decision.stop_signal:
                return True, decision.stop_signal
        if stopping:
            self.progress.message(f"stopping at step {step} as asked (--stop-at-step); resume with --resume")
        return stopping, None

    def _save(self, step: int, params: PyTree, opt_state: PyTree) -> None:
        """Checkpoint the state after `step` in the model layout, with the run's metadata."""
        config = self.run.config
        model_params, model_opt_state = self._to_model_state(params, opt_state)
        state = {
            "params": model_params,
            "opt_state": model_opt_state,
            "rng": np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(config.run.seed), step))),
        }
        metadata = {
            "step": step,
            "data_position": step,
            "seed": config.run.seed,
            "config": as_dict(config),
            "head_layout": HEAD_LAYOUT,
        }
        self.checkpointer.save(step, state, json.loads(json.dumps(metadata, default=str)))
        self.decider.saved()
        fire_test_signal("in-save", step, self.signals, jax.process_index())

    def close(self) -> None:
        self.profiler.close()
        self.metrics.close()
        self.checkpointer.close()  # waits for the last save to commit


def _evaluate(
    eval_loss, params, dataset: TokenDataset, config: TrainConfig, sharding: jax.sharding.NamedSharding
) -> float:
    """Mean loss over `eval_batches` fixed held-out batches."""
    values = []
    for index in range(config.run.eval_batches):
        tokens, targets = _microbatches(
            dataset, config.data.seed + 1, index, config.data.batch_size, config.parallel.microbatches, sharding
        )
        values.append(float(eval_loss(params, tokens, targets)))
    return float(np.mean(values))


def _report_skipped(checkpointer: Checkpointer, step: int, stream: IO[str]) -> None:
    """Say which newer checkpoints a resume from `step` passed over, and why (one line; nothing when none)."""
    skipped = [f"step {s} (unreadable, see the warning above)" for s in checkpointer.unreadable_steps if s > step]
    skipped += [f"{name} (a save that never finished; discarded)" for name in checkpointer.discarded_unfinished]
    if skipped:
        where = f"continuing from step {step}, the newest complete checkpoint" if step else "starting from step 0"
        stream.write(f"resume: {where}; skipped {', '.join(skipped)}\n")


def _weights_from(source: InitSource, built: TrainStep, stream: IO[str]) -> PyTree:
    """The parameters of `source`'s checkpoint in this run's layout (its optimizer state is dropped)."""
    other = Checkpointer(source.checkpoints, keep=None, async_save=False)
    try:
        step, params, _ = _restore(other, built, io.StringIO(), step=source.step)
    finally:
        other.close()
    stream.write(f"initialized the weights from {source.run} step {step}; the optimizer starts afresh\n")
    return params


def _restore(
    checkpointer: Checkpointer, built: TrainStep, stream: IO[str], step: int | None = None
) -> tuple[int, PyTree, PyTree]:
    """Newest readable checkpoint (model layout) -> `(step, params, opt_state)` in this run's layout.

    Arrays are read straight into sharded device arrays (`model_shardings`: each device reads its
    share), then one compiled program converts them to the pipeline layout and `built`'s shardings;
    no host copy of the whole state is made.
    """
    pipe, optimizer = built.pipe, built.optimizer
    shardings = model_shardings(pipe)
    model_params = _with_shardings(jax.eval_shape(pipe.to_model, pipe.abstract_params()), shardings)
    legacy_head = "out" in model_params["head"] and checkpointer.read_metadata().get("head_layout") != HEAD_LAYOUT
    if legacy_head:
        stream.write("resume: the checkpoint stores the head as [d_model, vocab] (older layout); transposing it\n")
        model_params, shardings = _transpose_head(model_params), _transpose_head(shardings)
    params_structure = jax.tree.structure(model_params)
    replicated = jax.sharding.NamedSharding(pipe.mesh, jax.sharding.PartitionSpec())
    opt_state = jax.eval_shape(optimizer.init, model_params)
    template = {
        "params": model_params,
        "opt_state": _with_shardings(opt_state, optimizer_shardings(optimizer, model_params, shardings, pipe.mesh)),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    }
    step, state, metadata = checkpointer.restore(template, step)

    def to_pipeline(params, opt_state):
        if legacy_head:
            params, opt_state = _transpose_head(params), map_params_like(_transpose_head, opt_state, params_structure)
        return pipe.to_pipeline(params), map_params_like(pipe.to_pipeline, opt_state, params_structure)

    # One compiled program (see `to_model_state` in `train`), its outputs on the training step's shardings.
    # Not donating its inputs: the layouts differ in shape wherever the stages hold padding layers.
    convert = jax.jit(to_pipeline, out_shardings=(built.param_shardings, built.opt_shardings))
    params, opt_state = convert(state["params"], state["opt_state"])
    del state
    stream.write(f"resumed from step {step} (data position {metadata.get('data_position', step)})\n")
    return step, params, opt_state


class StepProfiler:
    """A `jax.profiler` trace of training steps `steps = (first, last)` into `directory`.

    `before(step)` starts the trace at the first step (or at the first step run, on a resume that
    starts inside the range), `after(step, outputs)` waits for the step's outputs and stops it after
    the last, printing where the trace went; `close()` stops a trace the run left early.
    """

    def __init__(self, steps: tuple[int, int] | None, directory: pathlib.Path, progress: Progress):
        self.steps = steps
        self.directory = directory
        self.progress = progress
        self.first_traced: int | None = None
        self.last_traced: int | None = None
        self._existing: set[pathlib.Path] = set()

    def before(self, step: int) -> None:
        if self.steps is None or self.first_traced is not None or not self.steps[0] <= step <= self.steps[1]:
            return
        self.progress.message(f"profile: tracing steps {step}..{self.steps[1]} (jax.profiler)")
        self._existing = set(self._files())
        jax.profiler.start_trace(str(self.directory))
        self.first_traced = step

    def after(self, step: int, outputs: PyTree) -> None:
        if self.first_traced is None:
            return
        self.last_traced = step
        if step == self.steps[1]:
            jax.block_until_ready(outputs)
            self._stop()

    def close(self) -> None:
        if self.first_traced is not None:
            self._stop()

    def _files(self) -> list[pathlib.Path]:
        return sorted(self.directory.glob("plugins/profile/*/*"))

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        if self.last_traced is None:
            traced = f"{self.first_traced} (unfinished)"
        else:
            traced = f"{self.first_traced}..{self.last_traced}"
            if self.last_traced < self.steps[1]:
                traced += f" (the run stopped before step {self.steps[1]})"
        self.first_traced = self.last_traced = None
        written = [path for path in self._files() if path not in self._existing]
        where = written[0].parent if written else self.directory
        self.progress.message(
            f"profile: wrote the trace of steps {traced} to {where} ({', '.join(p.name for p in sorted(written))}); "
            f"open it with xprof --logdir {self.directory}, or TensorBoard's profile plugin"
        )
