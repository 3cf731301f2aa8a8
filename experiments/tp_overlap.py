"""Tensor-parallel all-reduces in the pipeline's tick loop: which have compute in flight on a TPU.

Command (a few minutes on 2 CPU cores; needs libtpu, `pip install -e '.[tpu]'`):

    .venv/bin/python experiments/tp_overlap.py --out experiments/out/tp_overlap

The GPT training gradient step (`PipelinedLM.value_and_grad`, remat "full", bfloat16 compute;
8 layers, d_model 256, 4 heads, MLP 1024, vocabulary 1024, sequence 256, m = 8 microbatches of one
sequence) compiled by libtpu's compiler for a deviceless TPU v5e 2x4 as stage 2 x tensor 4: the
blocks' parameters are split over `tensor` by heads and MLP width (Megatron), so every attention
and MLP output, forward and backward, ends in an all-reduce over the tensor axis.

For each schedule it counts the all-reduces inside the tick loop (`jpipe.parallel.hlo.
collective_overlaps`): "async" ones have a start and a done, "hidden" ones a matmul scheduled
between the two. Braided ticks (`Composite`: STP's and DualPipe's overlapped F&B pairs) run both
ops in one computation (`jpipe.value_and_grad(..., braid=True)`, the default), layer by layer in
lockstep (`jpipe.pipeline.lockstep`); their all-reduces
are those traced under `jpipe.pipeline.executor.BRAIDED_SCOPE`. Each composite schedule is also
compiled flattened (`Schedule.flattened()`: the same order, one op per tick, as `braid=False`
runs it), the unbraided baseline.

The compiler runs all-reduces asynchronously only under `jpipe.compile.TPU_ASYNC_ALL_REDUCE_FLAGS`
(set here in `LIBTPU_INIT_ARGS` unless `--no-async-flags`); without them every all-reduce in the
loop is synchronous whatever the schedule. "temp MiB": the compiled step's temporary memory per
device (`memory_analysis()`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

SCHEDULES = {
    "1f1b": {},
    "zbv": {},
    "dualpipev": {},
    "dualpipev pairs flattened": {"name": "dualpipev", "overlap": True, "flatten": True},
    "dualpipev pairs braided": {"name": "dualpipev", "overlap": True},
    "stp flattened": {"name": "stp", "flatten": True},
    "stp braided": {"name": "stp"},
}


def compile_step(schedule, mesh, remat: str = "full", layers: int = 8):
    """The compiled (TPU) gradient step of the job in the module docstring for `schedule`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jpipe.models.config import GPTConfig
    from jpipe.models.pipelined import PipelinedLM
    from jpipe.pipeline import PipelineOptions

    config = GPTConfig(
        vocab_size=1024,
        seq_len=256,
        d_model=256,
        num_heads=4,
        num_layers=layers,
        mlp_ratio=4,
        compute_dtype="bfloat16",
    )
    pipe = PipelinedLM(config, schedule=schedule, mesh=mesh, options=PipelineOptions(remat=remat))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pipe.abstract_params(), pipe.shardings()
    )
    tokens = jax.ShapeDtypeStruct((schedule.num_microbatches, 1, config.seq_len), jnp.int32)
    tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=NamedSharding(mesh, P()))
    return jax.jit(pipe.value_and_grad()).lower(params, tokens, tokens).compile()


def table(
    topology: str,
    stage: int,
    tensor: int,
    microbatches: int,
    labels: list[str],
    async_flags: bool,
    remat: str = "full",
    layers: int = 8,
) -> str:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jpipe.compile import TPU_ASYNC_ALL_REDUCE_FLAGS

    if async_flags:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join(
            [os.environ.get("LIBTPU_INIT_ARGS", ""), *TPU_ASYNC_ALL_REDUCE_FLAGS]
        ).strip()
    from jpipe import schedules
    from jpipe.compile import topology_devices
    from jpipe.parallel.hlo import collective_overlaps
    from jpipe.parallel.mesh import make_mesh
    from jpipe.pipeline.executor import BRAIDED_SCOPE
    from jpipe.schedules import Composite

    mesh = make_mesh(data=1, stage=stage, tensor=tensor, devices=topology_devices(topology))
    flags = "with" if async_flags else "without"
    lines = [
        f"TPU compiler ({topology}, deviceless), stage {stage} x tensor {tensor}, m = {microbatches}, "
        f"{layers} layers, remat {remat!r}, {flags} `TPU_ASYNC_ALL_REDUCE_FLAGS`: all-reduces inside the tick loop.",
        "",
        "| schedule | v | composites | all-reduces in the loop | async | hidden (a matmul in flight) "
        "| in braided ticks | of those hidden | temp MiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        options = dict(SCHEDULES[label])
        name = options.pop("name", label)
        flatten = options.pop("flatten", False)
        schedule = schedules.build(name, stage, microbatches, **options)
        composites = sum(isinstance(step, Composite) for row in schedule.actions for step in row)
        if flatten:
            schedule = schedule.flattened()
        began = time.perf_counter()
        compiled = compile_step(schedule, mesh, remat, layers)
        seconds = time.perf_counter() - began
        found = [o for o in collective_overlaps(compiled.as_text(), "all-reduce") if o.in_loop]
        asynchronous = sum(o.asynchronous for o in found)
        hidden = sum(o.hidden for o in found)
        braided = [o for o in found if BRAIDED_SCOPE in o.op_name]
        braided_hidden = sum(o.hidden for o in braided)
        share = f"{braided_hidden} ({braided_hidden / len(braided):.0%})" if braided else "-"
        cells = (
            label,
            schedule.virtual,
            composites if not flatten else f"{composites}, run flattened",
            len(found),
            asynchronous,
            hidden,
            len(braided),
            share,
            f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f}",
            f"{seconds:.1f}",
        )
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
        print(
            f"  {label}: {hidden} of {len(found)} hidden; braided {share} of {len(braided)}",
            file=sys.stderr,
            flush=True,
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/tp_overlap"))
    parser.add_argument("--topology", default="v5e:2x4")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--tensor", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated, of: {'; '.join(SCHEDULES)}")
    parser.add_argument("--remat", default="full", help="the blocks' remat policy (default: full)")
    parser.add_argument("--layers", type=int, default=8, help="GPT blocks (default: 8)")
    parser.add_argument(
        "--no-async-flags", action="store_true", help="compile without jpipe.compile.TPU_ASYNC_ALL_REDUCE_FLAGS"
    )
    args = parser.parse_args()
    labels = [label.strip() for label in args.schedules.split(",") if label.strip()]
    unknown = [label for label in labels if label not in SCHEDULES]
    if unknown:
        parser.error(f"--schedules: unknown {unknown}; known: {list(SCHEDULES)}")
    text = table(
        args.topology,
        args.stages,
        args.tensor,
        args.microbatches,
        labels,
        not args.no_async_flags,
        args.remat,
        args.layers,
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tp_overlap.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
