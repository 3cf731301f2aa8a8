"""Hardware benchmark: tokens/s, step time and MFU per schedule on real GPUs or TPU chips, against baselines.

On a host with several GPUs (or a TPU slice), for a Llama of about 1B parameters (the defaults:
16 layers, d_model 2048, 32 heads, 8 key/value heads, SwiGLU 8192, vocab 32000, sequences of 2048
tokens, bfloat16, remat "full"; about 1.1B parameters), it times the training step the training
system runs (`experiments/throughput.py`'s `time_training_step`: AdamW, parameters and optimizer
state donated, random token ids on the devices) for:

- every schedule in `--schedule` on a `data x stage x tensor` mesh (`--stages`, `--tensor`; `--data`
  defaults to the devices left over);
- "dp+fsdp (no pipeline)": the same model on all the devices as data parallelism only (stage 1),
  parameters and optimizer state split over data (FSDP), with the same sequences per microbatch
  on a device as the pipeline (so the same global batch in fewer, wider microbatches);
- "ad_gpipe (baseline)": the AD-GPipe baseline (`jpipe.pipeline.gpipe_autodiff`: `jax.grad`
  through a `lax.scan` of ticks, the MaxText/Praxis way) on the same mesh, microbatches and
  parameters as the pipeline rows, embedding and head outside the scan;
- "single device": the whole model on one device (stage 1, data 1) with the pipeline's microbatch
  count and sequences per microbatch on a device (`--no-single` skips it where it does not fit; on
  one device it always runs).

Beside each measured step time it prints the simulator's prediction, calibrated on one device:
`jpipe.measure_costs(..., time=True)` times F, B, I and W of the real stage (the row's largest
logical stage, one microbatch of the sequences one device sees) on `jax.devices()[0]`, and the
prediction is the lockstep makespan of the row's schedule (`jpipe.schedules.simulate(...,
"lockstep")`, with the split the executor chose) in units of that F, times the measured seconds of
one F. The same measured costs are the executor's `cost` (its "auto" choices). The prediction covers
the stage ops only: the embedding, head and loss, the optimizer update, sends and the per-tick
overhead are not modelled, so "measured / predicted" above 1 is their share. The one-device
calibration table lists the per-op milliseconds of every stage measured.

GPU host (one process drives all local GPUs; e.g. 8 x H100: 4 stages x 2 data):

    python experiments/hardware_bench.py --model llama --layers 16 --d-model 2048 --heads 32 \\
        --kv-heads 8 --seq-len 2048 --batch-size 64 --microbatches 16 --stages 4 \\
        --schedule 1f1b,interleaved_1f1b,zb_h1,zbv --out experiments/out/hardware_bench

  (the defaults are that model; add `--remat none` or `dots` where memory allows). Several hosts:
  run the same command on every host with `--distributed` (`jax.distributed.initialize()`; the
  single-device row is skipped with more than one process). On one GPU (`CUDA_VISIBLE_DEVICES=0`)
  it runs the calibration and the single-device step only: the per-op seconds and the step time
  that calibrate the simulator.

TPU VM (e.g. v5e-8 or v4-8; on a multi-host slice run it on every worker with `--distributed`,
e.g. `gcloud compute tpus tpu-vm ssh NAME --worker=all --command "..."`):

    python experiments/hardware_bench.py --stages 4 --schedule 1f1b,interleaved_1f1b,zbv \\
        --out experiments/out/hardware_bench

CPU check (the suite's test; fake devices share the host's cores, so times say nothing about
speed-ups): `--quick` is a tiny Llama (4 layers, d_model 32, 16 tokens, batch 8 in 2 microbatches)
on 4 fake CPU devices (2 stages x 2 data), one schedule (1f1b) unless `--schedule` says otherwise:

    .venv/bin/python experiments/hardware_bench.py --quick --out experiments/out/hardware_bench

Model FLOPs per token and MFU as in `experiments/throughput.py` (`6 N + 12 L d T`, the peak per
device from its `PEAK_TFLOPS` table by device kind, or `--peak-tflops`; none on CPU). The header
gives the device kind, the backend, the process count and the jax and jaxlib versions.

Writes `<out>/hardware_bench.md` (the tables, also printed) and `<out>/hardware_bench.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import throughput  # experiments/throughput.py (the script's own directory is on sys.path)

QUICK = {
    "layers": 4,
    "d_model": 32,
    "heads": 4,
    "kv_heads": 2,
    "mlp_ratio": 4,
    "vocab_size": 256,
    "seq_len": 16,
    "batch_size": 8,
    "microbatches": 2,
    "stages": 2,
    "data": 2,
    "schedule": "1f1b",
    "compute_dtype": "float32",
    "remat": "none",
    "steps": 2,
    "warmup": 1,
    "repeats": 2,
    "cpu_devices": 4,
}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "pipeline", "dp+fsdp", "ad_gpipe" or "single"
    virtual: int
    mesh: str
    microbatches: int
    batch_size: int
    split: bool
    stage_layers: int
    tokens_per_second: float
    step_seconds: float
    predicted_seconds: float
    compile_seconds: float
    tflops_per_device: float
    mfu: float | None
    loss: float

    def cells(self) -> tuple[str, ...]:
        mfu = "n/a" if self.mfu is None else f"{self.mfu:.1%}"
        return (
            self.name,
            str(self.virtual),
            self.mesh,
            str(self.microbatches),
            str(self.batch_size),
            "yes" if self.split else "no",
            f"{self.tokens_per_second:,.0f}",
            f"{self.step_seconds * 1e3:.1f}",
            f"{self.predicted_seconds * 1e3:.1f}",
            f"{self.step_seconds / self.predicted_seconds:.2f}",
            f"{self.compile_seconds:.1f}",
            f"{self.tflops_per_device:.4g}",
            mfu,
        )


COLUMNS = (
    "row",
    "v",
    "mesh (data x stage x tensor)",
    "m",
    "batch",
    "split B",
    "tokens/s",
    "step ms",
    "predicted ms",
    "measured / predicted",
    "compile s",
    "model TFLOP/s per device",
    "MFU",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny Llama on 4 fake CPU devices (the suite's test)")
    parser.add_argument("--model", choices=("llama", "gpt"), default="llama", help="block family")
    parser.add_argument("--schedule", default="1f1b,interleaved_1f1b,zbv", help="comma-separated schedule names")
    parser.add_argument("--virtual", type=int, default=None, help="chunks per device (default by schedule)")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--data", type=int, default=None, help="default: the devices left by stages x tensor")
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="global sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8, help="llama key/value heads")
    parser.add_argument("--mlp-ratio", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="full")
    parser.add_argument("--fsdp", action="store_true", help="also split the pipeline rows' parameters over data")
    parser.add_argument("--no-single", action="store_true", help="skip the single-device step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each op in the calibration")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device (overrides the table)")
    parser.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices (CPU backend only)")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/hardware_bench"))
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1 and --warmup >= 0")
    return args


def model_config(args: argparse.Namespace):
    from jpipe.models import GPTConfig

    llama = args.model == "llama"
    return GPTConfig(
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        mlp_ratio=args.mlp_ratio,
        compute_dtype=args.compute_dtype,
        family=args.model,
        num_kv_heads=args.kv_heads if llama else None,
        positions="rope" if llama else "learned",
    )


def ad_gpipe_value_and_grad(pipe: Any) -> Callable:
    """`(params, tokens, targets) -> (loss, grads)` of `pipe`'s model through the AD-GPipe baseline.

    `pipe` must use a one-chunk-per-device schedule (its block rows are then in logical stage
    order, as `gpipe_autodiff` takes them). The embedding runs before the scan for all
    microbatches, its gradient by `jax.vjp` of the scan's input gradients; head and loss run in
    the scan at the last device, as the executor's loss does.
    """
    import jax

    from jpipe.pipeline.gpipe_autodiff import gpipe_autodiff

    adapter = pipe.adapter
    # The adapter's stage, embedding and loss functions (and its leaf bookkeeping), as its own step uses.
    stage_fn, prologue, loss_fn, picked = adapter._pipeline_functions()
    step_of = gpipe_autodiff(
        stage_fn, loss_fn, mesh=pipe.mesh, num_microbatches=pipe.schedule.num_microbatches, remat=pipe.options.remat
    )
    shardings = pipe.shardings()

    def step(params, tokens, targets):
        stage_params, last, tokens, targets, first, leaves, treedef = adapter._arguments(
            params, tokens, targets, picked
        )
        x, embed_vjp = jax.vjp(lambda first: jax.vmap(lambda t: prologue(first, t))(tokens), first)
        loss, (stage_grads, loss_grads, x_grads) = step_of(stage_params, last, x, targets)
        (first_grads,) = embed_vjp(x_grads)
        grads = adapter._gradients(picked, leaves, treedef, stage_grads, loss_grads, first_grads)
        return loss, jax.lax.with_sharding_constraint(grads, shardings)

    return step


class Bench:
    """Builds, calibrates, times and predicts the rows of one run."""

    def __init__(self, args: argparse.Namespace, peak: float | None):
        self.args, self.peak = args, peak
        self.config = model_config(args)
        self.calibration: dict[tuple[int, int], Any] = {}  # (layers per stage, sequences) -> StageCosts
        self.matmul_params = 0
        self.model_params = None  # model layout, from the first row's init: every row starts from them

    def params(self, pipe):
        """The model's parameters (one initialisation for all rows) in `pipe`'s layout and placement."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        if self.model_params is None:
            params = pipe.init(seed=self.args.seed)
            self.model_params = jax.jit(pipe.to_model)(params)
            return params
        # Through a replicated copy: the rows' meshes may order (or hold) the devices differently.
        return pipe.place(jax.device_put(self.model_params, NamedSharding(pipe.mesh, P())))

    def pipe(self, schedule_name: str, data: int, stages: int, tensor: int, microbatches: int, fsdp: bool, devices):
        from jpipe import schedules
        from jpipe.models import PipelinedLM
        from jpipe.parallel import ShardingRules, make_mesh
        from jpipe.pipeline import PipelineOptions

        virtual = self.args.virtual if self.args.virtual is not None else throughput.VIRTUAL.get(schedule_name, 1)
        virtual = virtual if stages > 1 else 1
        schedule = schedules.build(schedule_name, stages, microbatches, virtual)
        mesh = make_mesh(data=data, stage=stages, tensor=tensor, devices=devices)
        return PipelinedLM(
            self.config,
            schedule=schedule,
            mesh=mesh,
            rules=ShardingRules(fsdp=fsdp),
            options=PipelineOptions(remat=self.args.remat),
        )

    def stage_costs(self, pipe, sequences: int):
        """`measure_costs(time=True)` of `pipe`'s largest stage on one microbatch of `sequences`, on one device."""
        import jax

        import jpipe
        from jpipe.models.pipelined import activation_shape

        blocks = pipe.abstract_params()["blocks"]  # [S, layers per stage, ...]
        layers = jax.tree.leaves(blocks)[0].shape[1]
        key = (layers, sequences)
        if key not in self.calibration:
            one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), blocks)
            x = activation_shape(self.config, sequences, self.config.seq_len)
            self.calibration[key] = jpipe.measure_costs(
                jpipe.layered(pipe.adapter.layer_fn),
                one,
                x,
                remat=pipe.options.remat,
                time=True,
                repeats=self.args.repeats,
                recompute=pipe.options.recompute,
            )
        return self.calibration[key], layers

    def run(self, name: str, kind: str, pipe, batch_size: int, sequences: int) -> Row:
        """Time `pipe`'s training step (AD-GPipe's for kind "ad_gpipe") and predict it from the calibration."""
        from jpipe import schedules

        args = self.args
        costs, layers = self.stage_costs(pipe, sequences)
        cost = costs.cost(measure="seconds", per="chunk")
        pipe = dataclasses.replace(pipe, options=dataclasses.replace(pipe.options, cost=cost))
        if kind == "ad_gpipe":
            value_and_grad, split, overlap = ad_gpipe_value_and_grad(pipe), False, False
        else:
            value_and_grad = pipe.value_and_grad()
            split, overlap = value_and_grad.plan.split, value_and_grad.plan.overlap
        step_seconds, compile_seconds, loss = throughput.time_training_step(
            pipe, value_and_grad, batch_size=batch_size, steps=args.steps, warmup=args.warmup, params=self.params(pipe)
        )
        simulation = schedules.simulate(
            pipe.schedule, cost, "lockstep", split_backward=split, send_latency=1 if overlap else 0
        )
        flops_per_token, self.matmul_params = throughput.model_flops_per_token(self.config, pipe.abstract_params())
        shape = pipe.mesh.shape
        devices = shape["data"] * shape["stage"] * shape["tensor"]
        tokens_per_second, flops_per_device, mfu = throughput.rates(
            batch_size * self.config.seq_len, step_seconds, flops_per_token, devices, self.peak
        )
        row = Row(
            name=name,
            kind=kind,
            virtual=pipe.schedule.virtual,
            mesh=f"{shape['data']} x {shape['stage']} x {shape['tensor']}",
            microbatches=pipe.schedule.num_microbatches,
            batch_size=batch_size,
            split=split,
            stage_layers=layers,
            tokens_per_second=tokens_per_second,
            step_seconds=step_seconds,
            predicted_seconds=simulation.makespan * costs.seconds["f"],
            compile_seconds=compile_seconds,
            tflops_per_device=flops_per_device / 1e12,
            mfu=mfu,
            loss=loss,
        )
        print(
            f"{name}: {tokens_per_second:,.0f} tokens/s, {step_seconds * 1e3:.1f} ms/step "
            f"(predicted {row.predicted_seconds * 1e3:.1f}), compile {compile_seconds:.1f} s",
            file=sys.stderr,
        )
        return row


def versions() -> dict[str, str]:
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?")}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    if args.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # before the first backend use
    if args.distributed:
        jax.distributed.initialize()
    backend = jax.default_backend()
    devices = jax.devices()
    kind = devices[0].device_kind
    count = len(devices)
    multi = count > 1
    if multi:
        if args.data is None:
            args.data = max(1, count // (args.stages * args.tensor))
        needed = args.data * args.stages * args.tensor
        if needed > count or args.stages < 2:
            print(
                f"error: data {args.data} x stages {args.stages} x tensor {args.tensor} needs {needed} devices "
                f"and stages >= 2; {count} available",
                file=sys.stderr,
            )
            return 2
    else:
        args.data, args.stages, args.tensor = 1, 1, 1
    sequences, remainder = divmod(args.batch_size, args.microbatches * args.data)
    if remainder or sequences < 1:
        print(f"error: --batch-size {args.batch_size} must divide into microbatches x data", file=sys.stderr)
        return 2

    peak = (
        args.peak_tflops
        if args.peak_tflops is not None
        else (None if backend == "cpu" else throughput.peak_tflops(kind))
    )
    bench = Bench(args, peak)
    rows: list[Row] = []
    if multi:
        used = devices[:needed]
        for name in [n.strip() for n in args.schedule.split(",") if n.strip()]:
            pipe = bench.pipe(name, args.data, args.stages, args.tensor, args.microbatches, args.fsdp, used)
            rows.append(bench.run(name, "pipeline", pipe, args.batch_size, sequences))
        # Data parallelism + FSDP over all the pipeline's devices, same sequences per microbatch per device.
        width = args.data * args.stages
        dp_microbatches = max(1, args.batch_size // (width * sequences))
        if args.batch_size % (width * dp_microbatches):
            print(f"error: --batch-size {args.batch_size} must divide over {width} data devices", file=sys.stderr)
            return 2
        pipe = bench.pipe("1f1b", width, 1, args.tensor, dp_microbatches, True, used)
        rows.append(bench.run("dp+fsdp (no pipeline)", "dp+fsdp", pipe, args.batch_size, sequences))
        pipe = bench.pipe("gpipe", args.data, args.stages, args.tensor, args.microbatches, args.fsdp, used)
        rows.append(bench.run("ad_gpipe (baseline)", "ad_gpipe", pipe, args.batch_size, sequences))
    if (not multi or not args.no_single) and jax.process_count() == 1:  # one device: always
        pipe = bench.pipe("1f1b", 1, 1, 1, args.microbatches, False, devices[:1])
        rows.append(bench.run("single device", "single", pipe, args.microbatches * sequences, sequences))

    if jax.process_index() != 0:
        return 0
    text = report(args, backend, kind, count, peak, bench, rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hardware_bench.md").write_text(text)
    record = {
        "device_kind": kind,
        "backend": backend,
        "devices": count,
        "processes": jax.process_count(),
        "versions": versions(),
        "peak_tflops": peak,
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "calibration": [
            {"stage_layers": layers, "sequences": seqs, "seconds": costs.seconds, "flops": costs.flops}
            for (layers, seqs), costs in bench.calibration.items()
        ],
        "results": [dataclasses.asdict(r) for r in rows],
    }
    (args.out / "hardware_bench.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out / 'hardware_bench.md'} and {args.out / 'hardware_bench.json'}", file=sys.stderr)
    return 0


def report(args, backend: str, kind: str, count: int, peak: float | None, bench: Bench, rows: list[Row]) -> str:
    import jax

    version = versions()
    config = bench.config
    setup = (
        f"{count} x {kind} ({backend}, {jax.process_count()} process(es)); jax {version['jax']}, "
        f"jaxlib {version['jaxlib']}\n\n"
        f"{args.model} {config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads"
        + (f" ({args.kv_heads} key/value)" if args.model == "llama" else "")
        + f", d_ff {config.d_ff}, vocab {config.vocab_size}, seq {config.seq_len}, {config.compute_dtype}, "
        f"remat {args.remat}; {bench.matmul_params / 1e6:,.1f}M matmul parameters; "
        f"{args.warmup} warmup + {args.steps} timed steps"
    )
    if backend == "cpu" and args.peak_tflops is None:
        peak_note = "MFU: not meaningful on CPU (no peak FLOP/s; fake devices share the host's cores)"
    elif peak is None:
        peak_note = f"MFU: unknown peak for device kind {kind!r}; pass --peak-tflops"
    else:
        peak_note = f"MFU against a peak of {peak:g} TFLOP/s per device"
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    calibration = [
        "| layers per stage | sequences per microbatch | F ms | B ms | I ms | W ms | (I + W) / B |",
        "|---|---|---|---|---|---|---|",
    ]
    for (layers, seqs), costs in bench.calibration.items():
        s = costs.seconds
        calibration.append(
            f"| {layers} | {seqs} | {s['f'] * 1e3:.3f} | {s['b'] * 1e3:.3f} | {s['i'] * 1e3:.3f} | "
            f"{s['w'] * 1e3:.3f} | {(s['i'] + s['w']) / s['b']:.2f} |"
        )
    return (
        f"# Hardware benchmark\n\n{setup}\n\n{peak_note}. Predicted: the lockstep simulator's makespan of the "
        "row's schedule in units of the calibrated F, times F's measured seconds (stage ops only).\n\n"
        + "\n".join(lines)
        + f"\n\n## One-device calibration ({kind}; `jpipe.measure_costs(time=True)`, median of "
        f"{args.repeats})\n\n" + "\n".join(calibration) + "\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
