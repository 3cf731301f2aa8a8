"""The training loop: pipelined GPT on a (data, stage, tensor) mesh, with checkpoints and resume.

Everything a run writes goes under `config.run.out`:

- `config.json`: the full configuration;
- `schedule.txt`, `schedule.png`: the schedule's text chart and simulated (lockstep) Gantt chart;
- `metrics.jsonl`: one JSON object per step (`step`, `loss`, `grad_norm`, `learning_rate`,
  `step_seconds`, `tokens_per_second`, and `eval_loss` on evaluation steps);
- `checkpoints/<step>/`: orbax checkpoints of parameters *by layer* (the model layout, independent
  of stages, virtual chunks and schedule), optimizer state in the same layout, and metadata (step,
  data position, seed, configuration);
- `loss.png`: the loss curve.

Batches are a function of (data seed, step), so a resumed run sees exactly the batches the killed
run would have seen. A non-finite loss stops the run before anything is saved: the last good
checkpoint stays the newest.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import sys
import time
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpipe import schedules
from jpipe.models.pipelined import PipelinedLM
from jpipe.parallel.mesh import DATA, STAGE, TENSOR, make_mesh
from jpipe.parallel.rules import ShardingRules
from jpipe.pipeline.costs import StageCosts
from jpipe.pipeline.executor import resolve_split
from jpipe.train.checkpoint import Checkpointer
from jpipe.train.config import as_dict
from jpipe.train.data import ByteDataset, build_corpus
from jpipe.train.metrics import MetricsWriter, Progress, plot_loss_curve, read_metrics
from jpipe.train.optimizer import learning_rate_schedule, make_optimizer
from jpipe.train.presets import TrainConfig

PyTree = Any


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved after the last finite step."""


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a finished run reports."""

    out: pathlib.Path
    first_step: int
    last_step: int
    losses: tuple[float, ...]
    final_eval_loss: float | None


def cache_dir() -> pathlib.Path:
    """Where the byte corpus is cached (`JPIPE_CACHE`, default `~/.cache/jpipe`)."""
    return pathlib.Path(os.environ.get("JPIPE_CACHE", pathlib.Path.home() / ".cache" / "jpipe"))


def _map_params_like(fn, tree: PyTree, params_structure) -> PyTree:
    """Apply `fn` to every subtree of `tree` shaped like the parameters (e.g. Adam's mu and nu)."""
    return jax.tree.map(
        lambda sub: fn(sub) if jax.tree.structure(sub) == params_structure else sub,
        tree,
        is_leaf=lambda sub: jax.tree.structure(sub) == params_structure,
    )


def _microbatches(
    batch: dict[str, np.ndarray], num_microbatches: int, mesh: jax.sharding.Mesh
) -> tuple[jax.Array, jax.Array]:
    """`[B, T]` examples -> global `[m, B/m, T]` token and target arrays, batch split over `data`.

    Every process computes the same global batch (it is a function of seed and step) and hands JAX
    the shards its own devices hold, which also works when the data axis spans processes.
    """
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, DATA))

    def split(a):
        a = a.reshape((num_microbatches, a.shape[0] // num_microbatches) + a.shape[1:])
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return split(batch["inputs"]), split(batch["targets"])


def training_mesh(parallel) -> jax.sharding.Mesh:
    """The (data, stage, tensor) mesh; with several processes the stage axis spans them.

    Devices come process by process, so ordering them stage-major puts consecutive pipeline stages
    on different hosts: the pipeline's point-to-point traffic crosses hosts, while data and tensor
    parallel collectives stay inside a host.
    """
    if jax.process_count() == 1:
        return make_mesh(data=parallel.data, stage=parallel.stage, tensor=parallel.tensor)
    devices = np.array(jax.devices()[: parallel.num_devices])
    grid = devices.reshape(parallel.stage, parallel.data, parallel.tensor).transpose(1, 0, 2)
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.sharding.Mesh(grid, (DATA, STAGE, TENSOR), axis_types=auto)


def describe(config: TrainConfig, pipe: PipelinedLM, costs: StageCosts, stream: IO[str]) -> str:
    """Print the mesh, the schedule chart, the stage's measured costs and the simulated bubble and memory.

    Returns the chart.
    """
    schedule = pipe.schedule
    mesh_text = " x ".join(f"{name}={size}" for name, size in pipe.mesh.shape.items())
    cost = costs.cost()
    split = resolve_split(schedule, pipe.split_backward, cost)
    asynchronous = schedules.simulate(schedule, cost, mode="async")
    lockstep = schedules.simulate(schedule, cost, mode="lockstep", split_backward=split)
    chart = schedules.render(schedule, width=160)
    lines = [
        f"mesh: {mesh_text} ({len(pipe.mesh.devices.flat)} {jax.default_backend()} devices)",
        f"model: {config.model.num_layers} layers, d_model {config.model.d_model}, "
        f"{config.model.num_heads} heads, seq {config.data.seq_len}",
        f"layers per stage: {list(pipe.layout.layer_counts)}",
        chart,
        f"stage costs per microbatch (XLA FLOPs): {costs}",
        f"simulated with these costs (F=1, B={cost.b:.2f}, I={cost.i:.2f}, W={cost.w:.2f}): bubble "
        f"{asynchronous.bubble_fraction:.1%} async, {lockstep.bubble_fraction:.1%} lockstep (this executor, "
        f"backward {'split into I and W' if split else 'whole'}); peak memory "
        f"{max(lockstep.peak_memory):.3g} microbatch x stage stashes (device max)",
    ]
    text = "\n".join(line for line in lines if line)
    stream.write(text + "\n")
    stream.flush()
    return chart


def train(config: TrainConfig, *, resume: bool = False, stream: IO[str] = sys.stdout) -> RunSummary:
    """Run (or resume) training as configured; returns the losses of the steps it ran."""
    out = pathlib.Path(config.run.out)
    out.mkdir(parents=True, exist_ok=True)
    # In a multi-process run every process trains; process 0 alone writes files and prints.
    lead = jax.process_index() == 0
    if not lead:
        stream = io.StringIO()
    if lead:
        (out / "config.json").write_text(json.dumps(as_dict(config), indent=2, default=str) + "\n")
    parallel = config.parallel

    mesh = training_mesh(parallel)
    schedule = schedules.build(parallel.schedule, parallel.stage, parallel.microbatches, parallel.virtual)
    pipe = PipelinedLM(
        config.model,
        schedule=schedule,
        mesh=mesh,
        rules=ShardingRules(fsdp=parallel.fsdp),
        remat=parallel.remat,
        split_backward=parallel.split_backward,
    )
    costs = pipe.stage_costs(batch=max(1, config.data.batch_size // (parallel.microbatches * parallel.data)))
    pipe = dataclasses.replace(pipe, cost=costs.cost())
    chart = describe(config, pipe, costs, stream)
    if lead:
        (out / "schedule.txt").write_text(chart + "\n")
        split = resolve_split(schedule, pipe.split_backward, pipe.cost)
        simulation = schedules.simulate(schedule, pipe.cost, mode="lockstep", split_backward=split)
        schedules.plot(simulation, out / "schedule.png")

    corpus = build_corpus(config.data.path, cache_dir(), config.data.max_corpus_bytes)
    train_data = ByteDataset.open(corpus, config.data.seq_len, "train", config.data.eval_fraction)
    eval_data = ByteDataset.open(corpus, config.data.seq_len, "eval", config.data.eval_fraction)

    total_steps = config.run.steps
    optimizer = make_optimizer(config.optimizer, total_steps)
    learning_rate = learning_rate_schedule(config.optimizer, total_steps)
    loss_and_grads = pipe.value_and_grad()

    params = pipe.init(seed=config.run.seed)
    opt_state = _replicate_unsharded(jax.jit(optimizer.init)(params), mesh)
    params_structure = jax.tree.structure(params)

    def train_step_fn(params, opt_state, tokens, targets):
        loss, grads = loss_and_grads(params, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    # Outputs keep the inputs' shardings (so the second step does not recompile); the old state is
    # donated, so parameters and optimizer state are updated in place.
    state_shardings = (jax.tree.map(lambda a: a.sharding, params), jax.tree.map(lambda a: a.sharding, opt_state))
    train_step = jax.jit(train_step_fn, out_shardings=(*state_shardings, None, None), donate_argnums=(0, 1))

    @jax.jit
    def eval_loss(params, tokens, targets):
        return loss_and_grads(params, tokens, targets)[0]

    checkpointer = Checkpointer(out / "checkpoints", keep=config.run.keep_checkpoints, async_save=True)
    start = 0
    if resume:
        start, params, opt_state = _restore(checkpointer, pipe, optimizer, params, opt_state, params_structure, stream)
    elif checkpointer.latest_step() is not None:
        checkpointer.close()
        raise FileExistsError(
            f"{out / 'checkpoints'} already holds checkpoints (latest step {checkpointer.latest_step()}); "
            "pass --resume to continue that run, or choose another --out"
        )

    metrics_path = out / "metrics.jsonl" if lead else out / f".metrics.process{jax.process_index()}.jsonl"
    metrics = MetricsWriter(metrics_path, resume_from_step=start + 1 if resume else None)
    progress = Progress(total_steps, stream)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    losses: list[float] = []
    final_eval: float | None = None

    # One compiled program for the layout change: with several processes, a string of eager ops on
    # arrays spanning them can deadlock between the processes' collectives.
    to_model_state = jax.jit(
        lambda params, opt_state: (pipe.to_model(params), _map_params_like(pipe.to_model, opt_state, params_structure))
    )

    def save(step: int) -> None:
        model_params, model_opt_state = to_model_state(params, opt_state)
        state = {
            "params": model_params,
            "opt_state": model_opt_state,
            "rng": np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(config.run.seed), step))),
        }
        metadata = {"step": step, "data_position": step, "seed": config.run.seed, "config": as_dict(config)}
        checkpointer.save(step, state, json.loads(json.dumps(metadata, default=str)))

    try:
        for step in range(start + 1, total_steps + 1):
            batch = train_data.batch(config.data.seed, step - 1, config.data.batch_size)
            tokens, targets = _microbatches(batch, parallel.microbatches, mesh)
            began = time.perf_counter()
            params, opt_state, loss, grad_norm = train_step(params, opt_state, tokens, targets)
            loss = float(loss)
            seconds = time.perf_counter() - began
            record = {
                "step": step,
                "loss": loss,
                "grad_norm": float(grad_norm),
                "learning_rate": float(learning_rate(step - 1)),
                "step_seconds": seconds,
                "tokens_per_second": tokens_per_step / seconds,
            }
            if not math.isfinite(loss):
                metrics.write({**record, "loss": None, "nonfinite": True})
                progress.message(
                    f"stopping: the loss is {loss} at step {step}; no checkpoint was written after step "
                    f"{checkpointer.latest_step()} (the last good one). Lower the learning rate or check the data."
                )
                raise TrainingDivergedError(f"non-finite loss {loss} at step {step}")
            losses.append(loss)
            extra = ""
            if step % config.run.eval_every == 0 or step == total_steps:
                final_eval = _evaluate(eval_loss, params, eval_data, config, mesh)
                record["eval_loss"] = final_eval
                extra = f"  eval {final_eval:.4f}"
            metrics.write(record)
            if step % config.run.log_every == 0 or step == total_steps:
                progress.update(step, loss, record["tokens_per_second"], seconds, extra)
            stopping = step == config.run.stop_at_step
            if step % config.run.checkpoint_every == 0 or step == total_steps or stopping:
                save(step)
            if stopping:
                progress.message(f"stopping at step {step} as asked (--stop-at-step); resume with --resume")
                break
    finally:
        metrics.close()
        checkpointer.close()
    if lead:
        plot_loss_curve(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=f"{schedule.name}, {out.name}")
    progress.message(f"done: {len(losses)} steps, final loss {losses[-1] if losses else float('nan'):.4f}; wrote {out}")
    return RunSummary(out, start + 1, start + len(losses), tuple(losses), final_eval)


def _replicate_unsharded(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
    """Leaves not laid out on the mesh (e.g. Adam's step count) -> replicated on the mesh."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(a):
        sharding = getattr(a, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
            return a
        return jax.device_put(a, replicated)

    return jax.tree.map(place, tree)


def _evaluate(eval_loss, params, dataset: ByteDataset, config: TrainConfig, mesh: jax.sharding.Mesh) -> float:
    """Mean loss over `eval_batches` fixed held-out batches."""
    values = []
    for index in range(config.run.eval_batches):
        batch = dataset.batch(config.data.seed + 1, index, config.data.batch_size)
        tokens, targets = _microbatches(batch, config.parallel.microbatches, mesh)
        values.append(float(eval_loss(params, tokens, targets)))
    return float(np.mean(values))


def _restore(checkpointer, pipe, optimizer, params, opt_state, params_structure, stream):
    """Newest readable checkpoint (model layout) -> this run's layout and shardings."""
    if checkpointer.latest_step() is None:
        stream.write("resume: no checkpoint yet; starting from step 0\n")
        return 0, params, opt_state
    model_params = jax.eval_shape(pipe.to_model, params)
    template = {
        "params": model_params,
        "opt_state": jax.eval_shape(optimizer.init, model_params),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), template)
    step, state, metadata = checkpointer.restore(template)
    restored_params = jax.tree.map(
        lambda fresh, value: jax.device_put(value, fresh.sharding), params, jax.jit(pipe.to_pipeline)(state["params"])
    )
    restored_opt = _map_params_like(jax.jit(pipe.to_pipeline), state["opt_state"], jax.tree.structure(state["params"]))
    restored_opt = jax.tree.map(lambda fresh, value: jax.device_put(value, fresh.sharding), opt_state, restored_opt)
    stream.write(f"resumed from step {step} (data position {metadata.get('data_position', step)})\n")
    return step, restored_params, restored_opt
