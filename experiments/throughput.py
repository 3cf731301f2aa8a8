"""Training throughput (tokens/s) and MFU of a pipelined GPT, on whatever devices JAX finds.

Command (CPU, 8 fake devices, about 20 s on 2 cores; on a GPU or TPU host drop --cpu-devices
and pick a real size, e.g. `--layers 24 --d-model 2048 --heads 16 --seq-len 2048 --batch-size 64
--microbatches 16 --compute-dtype bfloat16 --stages 4 --data 2`):

    .venv/bin/python experiments/throughput.py --cpu-devices 8 --out experiments/out/throughput

Times the training step the training system runs (`jpipe.train.step.train_step` over
`PipelinedLM.value_and_grad`, AdamW from `jpipe.train.optimizer.make_optimizer`, jitted by
`jit_train_step`: parameters and optimizer state donated and updated in place) for each schedule in
`--schedule` (comma-separated) on a `data x stage x tensor` mesh (`jpipe.parallel.make_mesh`).
Inputs are random byte ids, created on the devices once, so no host input pipeline is timed. The
step is compiled first (compile seconds reported), `--warmup` steps run untimed, then `--steps`
steps are timed back to back (one wait at the end, as a training loop that does not read the loss
every step would run).

Reported per schedule: tokens/s (global), step time, compile time, model TFLOP/s per device and
MFU. Model FLOPs per token (PaLM's appendix B): `6 N + 12 L d T`, with N the parameters that take
part in matmuls (blocks and head: everything except the token and position embedding tables, which
are looked up; a tied head counts the table once), L layers, d d_model, T sequence length; the
second term is attention's score and value matmuls (computed in full: no causal skipping).
Rematerialisation is not counted (MFU, not HFU). MFU = model FLOP/s / (devices x peak), the peak
per device taken from `PEAK_TFLOPS` by `jax.devices()[0].device_kind` (dense bf16 figures) or from
`--peak-tflops`. On CPU there is no meaningful peak: tokens/s only, unless `--peak-tflops` is given.

Writes `<out>/throughput.md` (the table, also printed) and `<out>/throughput.json`.

Expected: on CPU the 8 fake devices share the host's cores, so tokens/s measures the executor's
overhead, not pipeline speed-up, and MFU is not reported. Measured on 2 shared cores with the
defaults and `--schedule gpipe,1f1b,zbv` (about a minute): gpipe 5.7k, 1f1b 10.6k, zbv 6.5k
tokens/s, compile 6-9 s each (noisy: other work on the cores moves these by tens of percent). On
accelerators, pick a model large enough that stage compute dominates the per-tick overhead; then
the bubble ordering of `experiments/schedule_table.py` (zbv < 1f1b = gpipe at m >= 2p) should show.

Flags (defaults in brackets): --schedule [1f1b], --virtual [2 for zbv, interleaved_1f1b, looped_bfs,
dualpipev; else 1], --stages [4], --data [2], --tensor [1], --microbatches [8], --batch-size [32
examples], --seq-len [64], --layers [8], --d-model [64], --heads [4], --mlp-ratio [4], --vocab-size
[256], --compute-dtype [float32], --remat [none], --split-backward [auto|on|off], --fsdp, --steps [10], --warmup
[2], --peak-tflops, --cpu-devices (fake CPU devices; only read by the CPU backend), --distributed
(call `jax.distributed.initialize()` first, for multi-host runs), --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

VIRTUAL = {"interleaved_1f1b": 2, "looped_bfs": 2, "zbv": 2, "dualpipev": 2, "v_half": 2, "v_min": 2}

# Dense bf16 peak TFLOP/s per JAX device, by `device_kind` substring; the first match wins, so more
# specific names come first. TPU v2/v3 devices are single TensorCores (half a chip); from v4 on a
# JAX device is a chip.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0),  # Trillium (v6e)
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v4", 275.0),
    ("TPU v3", 61.5),
    ("TPU v2", 22.5),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L4", 121.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak of one device of this kind, or None when unknown."""
    for name, value in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return value
    return None


def model_flops_per_token(config: Any, abstract_params: Any) -> tuple[int, int]:
    """(training FLOPs per token, matmul parameters N) of `GPT(config)`: `6 N + 12 L d T`."""
    import jax

    def count(tree) -> int:
        return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))

    lookups = count(abstract_params["embed"])
    matmul_params = count(abstract_params) - lookups
    if config.tie_embeddings:
        matmul_params += config.vocab_size * config.d_model
    attention = 12 * config.num_layers * config.d_model * config.seq_len
    return 6 * matmul_params + attention, matmul_params


@dataclasses.dataclass(frozen=True)
class Result:
    schedule: str
    virtual: int
    mesh: str
    microbatches: int
    batch_size: int
    seq_len: int
    matmul_params: int
    tokens_per_second: float
    step_seconds: float
    compile_seconds: float
    tflops_per_device: float
    mfu: float | None
    loss: float

    def cells(self) -> tuple[str, ...]:
        mfu = "n/a" if self.mfu is None else f"{self.mfu:.1%}"
        return (
            self.schedule,
            str(self.virtual),
            self.mesh,
            str(self.microbatches),
            str(self.batch_size),
            str(self.seq_len),
            f"{self.matmul_params / 1e6:.2f}",
            f"{self.tokens_per_second:,.0f}",
            f"{self.step_seconds * 1e3:.1f}",
            f"{self.compile_seconds:.1f}",
            f"{self.tflops_per_device:.4g}",
            mfu,
        )


COLUMNS = (
    "schedule",
    "v",
    "mesh (data x stage x tensor)",
    "m",
    "batch",
    "seq",
    "matmul params (M)",
    "tokens/s",
    "step ms",
    "compile s",
    "model TFLOP/s per device",
    "MFU",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="1f1b", help="schedule name, or several comma-separated")
    parser.add_argument("--virtual", type=int, default=None, help="chunks per device (default by schedule)")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--data", type=int, default=2)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="global examples per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp-ratio", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    parser.add_argument(
        "--split-backward",
        choices=("auto", "on", "off"),
        default="auto",
        help="run each B as I then W (auto: the faster in the lockstep simulator with the stage's measured costs)",
    )
    parser.add_argument("--fsdp", action="store_true", help="also split parameters over the data axis")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device (overrides the table)")
    parser.add_argument("--cpu-devices", type=int, default=None, help="fake CPU devices (CPU backend only)")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/throughput"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def rates(
    tokens_per_step: int, step_seconds: float, flops_per_token: float, num_devices: int, peak: float | None
) -> tuple[float, float, float | None]:
    """(tokens/s, model FLOP/s per device, MFU or None without a peak) of a step of `tokens_per_step` tokens."""
    tokens_per_second = tokens_per_step / step_seconds
    flops_per_device = tokens_per_second * flops_per_token / num_devices
    return tokens_per_second, flops_per_device, None if peak is None else flops_per_device / (peak * 1e12)


def time_training_step(
    pipe: Any, value_and_grad: Any, *, batch_size: int, steps: int, warmup: int, seed: int = 0, params: Any = None
) -> tuple[float, float, float]:
    """(seconds per step, compile seconds, last loss) of the training step over `value_and_grad`.

    `pipe` (a `PipelinedLM`) gives the mesh, the parameters and their shardings and the microbatch
    count; `value_and_grad` is `(params, tokens, targets) -> (loss, grads)` on its parameters (its
    own `value_and_grad()`, or another step on the same parameters). AdamW, jitted by
    `jit_train_step` (parameters and optimizer state donated); random token ids created on the
    devices once; compiled, `warmup` untimed steps, then `steps` timed back to back. `params`:
    pipeline-layout parameters placed with `pipe.shardings()` (donated), default `pipe.init(seed)`.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jpipe.parallel import DATA
    from jpipe.train.config import OptimizerConfig
    from jpipe.train.optimizer import make_optimizer
    from jpipe.train.step import jit_train_step, optimizer_shardings

    mesh, microbatches, seq_len = pipe.mesh, pipe.schedule.num_microbatches, pipe.config.seq_len
    optimizer = make_optimizer(OptimizerConfig(), warmup + steps)
    param_shardings = pipe.shardings()
    opt_shardings = optimizer_shardings(optimizer, pipe.abstract_params(), param_shardings, mesh)
    step = jit_train_step(value_and_grad, optimizer, param_shardings, opt_shardings)
    params = pipe.init(seed=seed) if params is None else params
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)

    shape = (microbatches, batch_size // microbatches, seq_len)
    rng = np.random.default_rng(seed)
    host = rng.integers(0, min(256, pipe.config.vocab_size), (2, *shape), dtype=np.int32)
    batch_sharding = NamedSharding(mesh, P(None, DATA) if DATA in mesh.shape else P())
    # From a callback, so each process supplies only its own devices' shards (multi-host safe).
    tokens, targets = (jax.make_array_from_callback(shape, batch_sharding, lambda index, a=a: a[index]) for a in host)

    began = time.perf_counter()
    compiled = step.lower(params, opt_state, tokens, targets).compile()
    compile_seconds = time.perf_counter() - began
    for _ in range(warmup):
        params, opt_state, loss, _ = compiled(params, opt_state, tokens, targets)
    jax.block_until_ready((params, opt_state))
    began = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss, _ = compiled(params, opt_state, tokens, targets)
    jax.block_until_ready((params, opt_state, loss))
    return (time.perf_counter() - began) / steps, compile_seconds, float(loss)


def measure(args: argparse.Namespace, schedule_name: str, peak: float | None) -> Result:
    """Compile, warm up and time the training step of one schedule."""
    from jpipe import schedules
    from jpipe.models import GPTConfig, PipelinedLM
    from jpipe.parallel import ShardingRules, make_mesh
    from jpipe.pipeline import PipelineOptions

    virtual = args.virtual if args.virtual is not None else VIRTUAL.get(schedule_name, 1)
    config = GPTConfig(
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        mlp_ratio=args.mlp_ratio,
        compute_dtype=args.compute_dtype,
    )
    mesh = make_mesh(data=args.data, stage=args.stages, tensor=args.tensor)
    schedule = schedules.build(schedule_name, args.stages, args.microbatches, virtual)
    pipe = PipelinedLM(
        config,
        schedule=schedule,
        mesh=mesh,
        rules=ShardingRules(fsdp=args.fsdp),
        options=PipelineOptions(
            remat=args.remat, split_backward={"auto": "auto", "on": True, "off": False}[args.split_backward]
        ),
    )
    pipe = dataclasses.replace(
        pipe, options=dataclasses.replace(pipe.options, cost=pipe.stage_costs().cost(per="chunk"))
    )
    flops_per_token, matmul_params = model_flops_per_token(config, pipe.abstract_params())
    step_seconds, compile_seconds, loss = time_training_step(
        pipe, pipe.value_and_grad(), batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, seed=args.seed
    )
    num_devices = args.data * args.stages * args.tensor
    tokens_per_second, flops_per_device, mfu = rates(
        args.batch_size * args.seq_len, step_seconds, flops_per_token, num_devices, peak
    )
    return Result(
        schedule=schedule_name,
        virtual=virtual,
        mesh=f"{args.data} x {args.stages} x {args.tensor}",
        microbatches=args.microbatches,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        matmul_params=matmul_params,
        tokens_per_second=tokens_per_second,
        step_seconds=step_seconds,
        compile_seconds=compile_seconds,
        tflops_per_device=flops_per_device / 1e12,
        mfu=mfu,
        loss=loss,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    if args.cpu_devices is not None:
        # Must precede the first backend use; GPU and TPU backends ignore it.
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.distributed:
        jax.distributed.initialize()
    backend = jax.default_backend()
    if args.cpu_devices is not None and backend != "cpu":
        print(f"note: --cpu-devices ignored on the {backend} backend", file=sys.stderr)
    devices = jax.devices()
    needed = args.data * args.stages * args.tensor
    if len(devices) < needed:
        hint = " (on CPU, add --cpu-devices N)" if backend == "cpu" else ""
        print(
            f"error: data {args.data} x stages {args.stages} x tensor {args.tensor} needs {needed} devices, "
            f"{len(devices)} available{hint}",
            file=sys.stderr,
        )
        return 2
    if args.batch_size % (args.microbatches * args.data):
        print(f"error: --batch-size {args.batch_size} must divide into microbatches x data", file=sys.stderr)
        return 2

    kind = devices[0].device_kind
    peak = args.peak_tflops if args.peak_tflops is not None else (None if backend == "cpu" else peak_tflops(kind))
    if backend == "cpu" and args.peak_tflops is None:
        peak_note = "MFU: not meaningful on CPU (no peak FLOP/s; fake devices share the host's cores): tokens/s only"
    elif peak is None:
        peak_note = f"MFU: unknown peak for device kind {kind!r}; pass --peak-tflops"
    else:
        source = "--peak-tflops" if args.peak_tflops is not None else "PEAK_TFLOPS table"
        peak_note = f"MFU against a peak of {peak:g} TFLOP/s per device ({source})"

    results = []
    for name in [n.strip() for n in args.schedule.split(",") if n.strip()]:
        result = measure(args, name, peak)
        results.append(result)
        mfu = "" if result.mfu is None else f", MFU {result.mfu:.1%}"
        print(
            f"{name}: {result.tokens_per_second:,.0f} tokens/s, {result.step_seconds * 1e3:.1f} ms/step, "
            f"compile {result.compile_seconds:.1f} s{mfu}",
            file=sys.stderr,
        )

    if jax.process_index() != 0:
        return 0
    setup = (
        f"{len(devices)} x {kind} ({backend}, {jax.process_count()} process(es)); GPT {args.layers} layers, "
        f"d_model {args.d_model}, {args.heads} heads, {args.compute_dtype}, remat {args.remat}; "
        f"{args.warmup} warmup + {args.steps} timed steps"
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in results]
    text = f"# Throughput\n\n{setup}\n\n{peak_note}\n\n" + "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.md").write_text(text)
    record = {
        "setup": setup,
        "device_kind": kind,
        "backend": backend,
        "peak_tflops": peak,
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "results": [dataclasses.asdict(r) for r in results],
    }
    (args.out / "throughput.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out / 'throughput.md'} and {args.out / 'throughput.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
