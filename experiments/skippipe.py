"""SkipPipe at small scale: how much a pipeline step shortens when microbatches skip stages, and what
skipping costs the full model.

Command (from the repository root; about 4 minutes on 2 CPU cores, 80 s with --quick):

    .venv/bin/python experiments/skippipe.py --out experiments/out/skippipe

The model is the quick start's GPT (`--preset quickstart`: 8 layers on 4 stages, data 2, m = 8, 8
fake CPU devices). Skip ratios 0, 0.25 and 0.5 of `jpipe.schedules.skippipe` (the first and last
stage are never skipped) against the full pipeline, 1f1b with the same m.

Part 1, simulated iteration time: the lockstep (the SPMD executor's ticks) and async (an MPMD
runtime's) makespan of each schedule, at unit costs (F = 1, B = 2 per stage) and at the quick start
model's measured per-stage costs (XLA FLOPs of a block, the embedding and the head/loss,
`jpipe.train.auto.measure_model`), and each over the 1f1b makespan.

Part 2, training: the same seed, data and number of steps for the full pipeline (1f1b) and skippipe
with skip ratio 0.25 and 0.5 (each microbatch's forward and backward run only the stages on its
route). Then the FULL model of each run (every layer, nothing skipped; the final checkpoint, model
layout) is evaluated with the unpipelined reference model (`jpipe.models.reference_value_and_grad`)
on the same held-out batches the training loop's eval uses. Per run: final train loss (mean of the
last 10 steps), full-model eval loss, wall time per step and its ratio to the 1f1b run. The fake CPU
devices share the machine's cores, so wall time measures the total work of a step, not the
makespan of a real pipeline.

Writes `<out>/skippipe.md` (both tables) and prints it; each run's folder is `<out>/runs/<name>/`.
Flags: --steps (150, the quick start's), --eval-batches (8), --seed, --out; `--quick`: a tiny model
and 3 steps (seconds, for the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib

# Fake CPU devices must be requested before JAX starts (ignored by GPU and TPU backends).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from parity import train_fresh  # noqa: E402  (experiments/parity.py, a sibling script)

from jpipe import schedules  # noqa: E402
from jpipe.models import GPT, params_of, reference_value_and_grad  # noqa: E402
from jpipe.train import auto  # noqa: E402
from jpipe.train.checkpoint import Checkpointer  # noqa: E402
from jpipe.train.data import ByteDataset, build_corpus  # noqa: E402
from jpipe.train.loop import cache_dir  # noqa: E402
from jpipe.train.metrics import read_metrics  # noqa: E402
from jpipe.train.optimizer import make_optimizer  # noqa: E402
from jpipe.train.presets import TrainConfig, preset  # noqa: E402

RATIOS = (0.0, 0.25, 0.5)
LAST = 10  # the final train loss is the mean of the last this many steps


def run_name(ratio: float | None) -> str:
    return "1f1b" if ratio is None else f"skippipe-{ratio:g}"


def make_config(args: argparse.Namespace, ratio: float | None, out: pathlib.Path) -> TrainConfig:
    """The quick start's configuration with schedule 1f1b (ratio None) or skippipe at `ratio`."""
    config = preset("quickstart")
    model, data = config.model, config.data
    if args.quick:
        model = dataclasses.replace(model, seq_len=16, d_model=16, num_heads=2, mlp_ratio=2)
        data = dataclasses.replace(data, seq_len=16, batch_size=16, max_corpus_bytes=2_000_000)
    parallel = dataclasses.replace(
        config.parallel,
        schedule="1f1b" if ratio is None else "skippipe",
        skip_ratio=ratio,
    )
    run = dataclasses.replace(
        config.run,
        out=str(out),
        steps=args.steps,
        checkpoint_every=args.steps,
        keep_checkpoints=1,
        eval_every=args.steps,
        eval_batches=args.eval_batches,
        log_every=max(1, args.steps // 10),
        seed=args.seed,
    )
    return dataclasses.replace(config, model=model, parallel=parallel, data=data, run=run)


def simulation_rows(config: TrainConfig) -> list[str]:
    """Part 1's table rows: makespans of 1f1b and skippipe at each ratio, unit and measured costs."""
    p, m = config.parallel.stage, config.parallel.microbatches
    costs = {"unit": schedules.Cost(), "measured": auto.measure_model(config).cost(1)}
    built = {"1f1b": schedules.build("1f1b", p, m, 1)}
    for ratio in RATIOS:
        built[f"skippipe {ratio:g}"] = schedules.build("skippipe", p, m, 1, skip_ratio=ratio)
    rows = []
    for label, cost in costs.items():
        base = {mode: schedules.simulate(built["1f1b"], cost, mode=mode).makespan for mode in ("lockstep", "async")}
        for name, schedule in built.items():
            spans = {mode: schedules.simulate(schedule, cost, mode=mode).makespan for mode in ("lockstep", "async")}
            rows.append(
                f"| {name} | {label} | {spans['lockstep']:.4g} | {spans['lockstep'] / base['lockstep']:.3f} "
                f"| {spans['async']:.4g} | {spans['async'] / base['async']:.3f} |"
            )
    return rows


def full_model_eval(config: TrainConfig) -> float:
    """The final checkpoint's full model (every layer) on the loop's held-out batches, unpipelined."""
    out = pathlib.Path(config.run.out)
    device = jax.devices()[0]
    params = jax.eval_shape(lambda: params_of(GPT(config.model, rngs=nnx.Rngs(0))))
    optimizer = make_optimizer(config.optimizer, config.run.steps)
    template = {
        "params": params,
        "opt_state": jax.eval_shape(optimizer.init, params),
        "rng": np.zeros(2, np.uint32),
    }
    template = jax.tree.map(
        lambda a: (
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(device))
            if isinstance(a, jax.ShapeDtypeStruct)
            else a
        ),
        template,
    )
    with Checkpointer(out / "checkpoints", async_save=False) as checkpointer:
        step, state, _ = checkpointer.restore(template)
    assert step == config.run.steps, (step, config.run.steps)
    loss_and_grads = jax.jit(reference_value_and_grad(config.model))
    data = config.data
    corpus = build_corpus(data.path, cache_dir(), data.max_corpus_bytes)
    dataset = ByteDataset.open(corpus, data.seq_len, "eval", data.eval_fraction)
    values = []
    for index in range(config.run.eval_batches):
        batch = dataset.batch(data.seed + 1, index, data.batch_size)
        tokens, targets = (jnp.asarray(batch[k])[None] for k in ("inputs", "targets"))
        values.append(float(loss_and_grads(state["params"], tokens, targets)[0]))
    return float(np.mean(values))


def run_training(config: TrainConfig) -> dict:
    out = pathlib.Path(config.run.out)
    summary = train_fresh(config)
    records = read_metrics(out / "metrics.jsonl")
    # Step 1 compiles; the wall time per step is the median of the others.
    seconds = [r["step_seconds"] for r in records if "step_seconds" in r and r["step"] > 1]
    return {
        "train_loss": float(np.mean(summary.losses[-LAST:])),
        "pipeline_eval": summary.final_eval_loss,
        "full_eval": full_model_eval(config),
        "step_seconds": float(np.median(seconds)) if seconds else float("nan"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/skippipe"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny model, 3 steps, 1 eval batch: seconds")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_batches = 3, 1
    args.out.mkdir(parents=True, exist_ok=True)

    base = make_config(args, None, args.out / "runs" / run_name(None))
    p, m = base.parallel.stage, base.parallel.microbatches
    lines = [
        f"Simulated iteration time, p = {p}, m = {m} (makespan; ratio: over 1f1b with the same costs)",
        "",
        "| schedule | costs | lockstep | / 1f1b | async | / 1f1b |",
        "|---|---|---|---|---|---|",
        *simulation_rows(base),
        "",
    ]
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats with int32 step counts
        results = {}
        for ratio in (None, *RATIOS[1:]):
            config = make_config(args, ratio, args.out / "runs" / run_name(ratio))
            results[run_name(ratio)] = run_training(config)
    full = results[run_name(None)]["step_seconds"]
    lines += [
        f"Training, {args.steps} steps, seed {args.seed}; eval: the full model (every layer) on "
        f"{args.eval_batches} held-out batches",
        "",
        "| run | skip ratio | final train loss | pipeline eval loss | full-model eval loss | s / step | / 1f1b |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio in (None, *RATIOS[1:]):
        r = results[run_name(ratio)]
        lines.append(
            f"| {run_name(ratio)} | {ratio or 0:g} | {r['train_loss']:.4f} | {r['pipeline_eval']:.4f} "
            f"| {r['full_eval']:.4f} | {r['step_seconds']:.3f} | {r['step_seconds'] / full:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    (args.out / "skippipe.md").write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
