"""Expert-parallel all-to-alls in the pipeline's tick loop: which have compute in flight on a TPU or GPU.

Command (a few minutes on 2 CPU cores; needs libtpu, `pip install -e '.[tpu]'`, or for `--topology
h100:8` jax's CUDA plugin, `pip install -e '.[gpu]'`):

    .venv/bin/python experiments/moe_overlap.py --out experiments/out/moe_overlap
    .venv/bin/python experiments/moe_overlap.py --topology h100:8 --out experiments/out/moe_overlap_gpu

The MoE training gradient step (`PipelinedLM.value_and_grad`, remat "full", bfloat16 compute; 4
MoE layers, d_model 256, 4 heads of which 2 key/value, 8 routed experts of width 1024, top-2, one
shared expert, vocabulary 1024, sequence 256, m = 8 microbatches of 4 sequences), compiled
deviceless for a TPU v5e 2x4 (or 8 H100s) as stage 2 x data 4 with expert parallelism: the experts
are split over `data` (`ShardingRules({..., "expert": "data"})`), so every MoE layer sends its
tokens to their experts' devices and back with `lax.all_to_all` over `data`, forward and backward.
`--quick` compiles a smaller model (2 layers, d_model 128, sequence 64, m = 4) for the test suite.

For each schedule it counts the all-to-alls inside the tick loop (`jpipe.parallel.hlo.
collective_overlaps`): "async" ones have a start and a done, "hidden" ones a matmul (a dot, a
convolution, a fusion or library call holding one) scheduled between the two. Braided ticks
(`Composite`: DualPipeV's and STP's overlapped F&B pairs) run both ops in one computation, layer
by layer in lockstep; their all-to-alls are those traced under `jpipe.pipeline.executor.
BRAIDED_SCOPE`. "by the paired op": those with a matmul in flight of the other direction
(`transpose(` in its `op_name` marks the backward's equations, its recomputation included): the
overlap braiding is for. Without braiding, what is in flight is the op's own independent work
(the shared expert, the routing einsums, the experts' other backward contractions). Each composite schedule is also
compiled flattened (`Schedule.flattened()`: the same order, one op per tick), the baseline.

On TPUs the compiler runs all-to-alls asynchronously only under
`jpipe.compile.TPU_ASYNC_ALL_TO_ALL_FLAGS` (set in `LIBTPU_INIT_ARGS` unless `--no-async-flags`;
the four all-reduce flags, `TPU_ASYNC_ALL_REDUCE_FLAGS`, do not do it). "temp MiB": the compiled
step's temporary memory per device (`memory_analysis()`). The tables and what they show:
docs/moe.md, "Overlap".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import pathlib
import sys
import time

SCHEDULES = {
    "1f1b": {},
    "dualpipev pairs flattened": {"name": "dualpipev", "overlap": True, "flatten": True},
    "dualpipev pairs braided": {"name": "dualpipev", "overlap": True},
    "stp flattened": {"name": "stp", "flatten": True},
    "stp braided": {"name": "stp"},
    "dualpipe pairs flattened": {"name": "dualpipe", "overlap": True, "flatten": True},
    "dualpipe pairs braided": {"name": "dualpipe", "overlap": True},
    "1f1b_overlap flattened": {"name": "1f1b_overlap", "flatten": True},
    "1f1b_overlap braided": {"name": "1f1b_overlap"},
}
FULL = {"layers": 4, "d_model": 256, "seq_len": 256, "microbatches": 8}
QUICK = {"layers": 2, "d_model": 128, "seq_len": 64, "microbatches": 4}
BACKWARD_MARK = "transpose("
"""What the `op_name` of every equation of a backward op holds (its recomputation's too, under remat)."""


def moe_config(size: dict):
    """The MoE model of the module docstring at `size` (FULL or QUICK)."""
    from jpipe.models import moe_config as config_of

    width = size["d_model"]
    return config_of(
        vocab_size=1024,
        seq_len=size["seq_len"],
        d_model=width,
        num_heads=4,
        num_kv_heads=2,
        num_layers=size["layers"],
        num_experts=8,
        experts_per_token=2,
        shared_experts=1,
        compute_dtype="bfloat16",
    )


def compile_step(schedule, mesh, size: dict):
    """The compiled gradient step of the MoE model with experts split over `data`, for `schedule`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jpipe.compile import GPU_COMPILER_OPTIONS
    from jpipe.models import PipelinedLM
    from jpipe.parallel import DEFAULT_RULES, ShardingRules
    from jpipe.pipeline import PipelineOptions

    config = moe_config(size)
    rules = ShardingRules({**DEFAULT_RULES, "expert": "data"})
    pipe = PipelinedLM(config, schedule=schedule, mesh=mesh, rules=rules, options=PipelineOptions(remat="full"))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pipe.abstract_params(), pipe.shardings()
    )
    shape = (schedule.num_microbatches, mesh.shape["data"], config.seq_len)  # [m, B, T]: a sequence per device
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, P(None, "data")))
    gpu = mesh.devices.flat[0].platform == "gpu"
    options = GPU_COMPILER_OPTIONS if gpu else None
    return jax.jit(pipe.value_and_grad()).lower(params, tokens, tokens).compile(compiler_options=options)


def by_paired_op(overlap, op_names: dict[str, str]) -> bool:
    """Whether a matmul of the other direction (forward vs backward) is in flight during `overlap`."""
    backward = BACKWARD_MARK in overlap.op_name
    return any((BACKWARD_MARK in op_names.get(name, "")) != backward for name in overlap.matmuls_in_flight)


def row(label: str, stage: int, mesh, size: dict, hlo_dir: pathlib.Path | None = None) -> tuple:
    """The table row of schedule `label`: counts of the loop's all-to-alls, temp memory, compile time.

    `hlo_dir`: if set, the scheduled HLO is written there as `<label with dashes>.hlo`."""
    from jpipe import schedules
    from jpipe.parallel.hlo import collective_overlaps, op_names
    from jpipe.pipeline.executor import BRAIDED_SCOPE
    from jpipe.schedules import Composite

    options = dict(SCHEDULES[label])
    name = options.pop("name", label)
    flatten = options.pop("flatten", False)
    schedule = schedules.build(name, stage, size["microbatches"], **options)
    composites = sum(isinstance(step, Composite) for row in schedule.actions for step in row)
    if flatten:
        schedule = schedule.flattened()
    began = time.perf_counter()
    compiled = compile_step(schedule, mesh, size)
    seconds = time.perf_counter() - began
    text = compiled.as_text()
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"{label.replace(' ', '-')}.hlo").write_text(text)
    found = [o for o in collective_overlaps(text, "all-to-all") if o.in_loop]
    braided = [o for o in found if BRAIDED_SCOPE in o.op_name]
    names = op_names(text)
    return (
        label,
        schedule.virtual,
        composites if not flatten else f"{composites}, run flattened",
        len(found),
        sum(o.asynchronous for o in found),
        _share(sum(o.hidden for o in found), len(found)),
        len(braided),
        _share(sum(o.hidden for o in braided), len(braided)),
        _share(sum(by_paired_op(o, names) for o in braided), len(braided)),
        f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.1f}",
        f"{seconds:.1f}",
    )


def _share(count: int, total: int) -> str:
    return f"{count} ({count / total:.0%})" if total else "-"


def versions(platform: str) -> str:
    """The jax version, and libtpu's or the CUDA plugin's."""
    jax_version = importlib.metadata.version("jax")
    if platform == "tpu":
        return f"jax {jax_version}, libtpu {importlib.metadata.version('libtpu')}"
    from jpipe.compile import _gpu_plugin_version

    return f"jax {jax_version}, {_gpu_plugin_version()}"


def set_flags(topology: str, async_flags: bool) -> str:
    """Put the async all-to-all flags in `LIBTPU_INIT_ARGS` for a TPU topology; say what was set.

    Before JAX starts: for a GPU topology, JAX must not start a CUDA backend (there is no GPU)."""
    if topology.split(":")[0] in ("h100", "a100", "b200"):
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        return "the GPU compiler's own defaults plus `jpipe.compile.GPU_COMPILER_OPTIONS`"
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jpipe.compile import TPU_ASYNC_ALL_TO_ALL_FLAGS

    if not async_flags:
        return "without `TPU_ASYNC_ALL_TO_ALL_FLAGS`"
    os.environ["LIBTPU_INIT_ARGS"] = " ".join([os.environ.get("LIBTPU_INIT_ARGS", ""), *TPU_ASYNC_ALL_TO_ALL_FLAGS])
    return f"with `TPU_ASYNC_ALL_TO_ALL_FLAGS` ({' '.join(TPU_ASYNC_ALL_TO_ALL_FLAGS)})"


def table(
    topology: str, stage: int, labels: list[str], async_flags: bool, size: dict, hlo_dir: pathlib.Path | None = None
) -> str:
    """The markdown table of the module docstring for `labels` (keys of `SCHEDULES`)."""
    flags = set_flags(topology, async_flags)
    from jpipe.compile import topology_devices
    from jpipe.parallel.mesh import make_mesh

    devices = topology_devices(topology)
    mesh = make_mesh(data=len(devices) // stage, stage=stage, devices=devices)
    lines = [
        f"{versions(devices[0].platform)}; {topology} (deviceless), stage {stage} x data {mesh.shape['data']} "
        f"with the experts split over data, m = {size['microbatches']}, {size['layers']} MoE layers, "
        f"d_model {size['d_model']}, sequence {size['seq_len']}, remat 'full', {flags}: all-to-alls inside the "
        "tick loop.",
        "",
        "| schedule | v | composites | all-to-alls in the loop | async | hidden (a matmul in flight) "
        "| in braided ticks | of those hidden | hidden by the paired op | temp MiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        cells = row(label, stage, mesh, size, hlo_dir)
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
        print(f"  {label}: hidden {cells[5]} of {cells[3]}; braided {cells[7]} of {cells[6]}", file=sys.stderr)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("experiments/out/moe_overlap"))
    parser.add_argument("--topology", default="v5e:2x4", help="a TPU topology or h100:8 (default: v5e:2x4)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated, of: {'; '.join(SCHEDULES)}")
    parser.add_argument("--hlo", type=pathlib.Path, default=None, metavar="DIR", help="write each scheduled HLO here")
    parser.add_argument("--quick", action="store_true", help="the small model, m = 4 (for the test suite)")
    parser.add_argument(
        "--no-async-flags", action="store_true", help="compile without jpipe.compile.TPU_ASYNC_ALL_TO_ALL_FLAGS"
    )
    args = parser.parse_args()
    labels = [label.strip() for label in args.schedules.split(",") if label.strip()]
    unknown = [label for label in labels if label not in SCHEDULES]
    if unknown:
        parser.error(f"--schedules: unknown {unknown}; known: {list(SCHEDULES)}")
    size = QUICK if args.quick else FULL
    text = table(args.topology, args.stages, labels, not args.no_async_flags, size, args.hlo)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_overlap.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
