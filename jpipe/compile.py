"""Compile the real training step ahead of time for a TPU slice or NVIDIA GPUs, on a machine without them.

    python -m jpipe.compile --preset quickstart --topology v5e:2x2
    python -m jpipe.compile --preset quickstart --topology h100:8
    python -m jpipe.compile --layers 24 --d-model 1024 --heads 16 --topology v5p:2x2x2 --hlo step.hlo

    from jpipe.compile import compile_training_step
    compiled = compile_training_step(config, "v6e:2x2")   # a TrainConfig whose mesh has 4 devices
    print(compiled)                                         # per-device memory, collectives, compile time

The step compiled is the one `python -m jpipe.train` runs (`jpipe.train.loop.build_train_step`: the
pipelined loss and gradients, the optimizer update, the same shardings and donation), lowered with
abstract arguments (`jax.ShapeDtypeStruct`s with shardings on a mesh of the topology's devices) and
compiled by XLA's TPU compiler from libtpu (`pip install 'jpipe-pp[tpu]'`) or its GPU compiler from
jax's CUDA plugin (`pip install 'jpipe-pp[gpu]'`). Nothing is allocated and no TPU or GPU is needed:
`jax.experimental.topologies` describes the devices. The result holds XLA's per-device memory
analysis and the scheduled HLO text.

Topologies are the names libtpu knows, `<generation>:<chips per axis>`: `v4:2x2x1`, `v5e:2x2`,
`v5p:2x2x2`, `v6e:4x4`, ... (v2, v3 and v4 show two devices per chip, one per TensorCore);
NVIDIA GPUs, `<gpu>:<GPUs per host>` or `<gpu>:<hosts>x<GPUs per host>`: `h100:8`, `a100:8`, `b200:8`,
`h100:2x8` (GPU specs shipped in `jpipe/targets/`, see `GPU_TARGETS`); or `cpu:N` for N devices of
the local CPU backend. The stage costs that decide `split_backward="auto"`
are measured on the local default backend (XLA FLOPs, as `jpipe.train` does before it trains).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from jpipe.parallel import hlo
from jpipe.train import step as step_module
from jpipe.train.cli import add_config_arguments, build_config
from jpipe.train.config import ConfigError
from jpipe.train.flags import HelpFormatter
from jpipe.train.presets import TrainConfig

if TYPE_CHECKING:
    from jpipe.schedules.ir import Schedule

DEFAULT_TOPOLOGY = "v5e:2x2"
EXAMPLE_TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5e:4x4", "v5p:2x2x1", "v5p:2x2x2", "v6e:2x2", "v6e:4x4", "cpu:8")
GIB = 2**30
MIB = 2**20

TPU_ASYNC_ALL_REDUCE_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=true",
    "--xla_enable_async_all_reduce=true",
    "--xla_jf_crs_combiner_threshold_count=1",
)
"""libtpu flags (`LIBTPU_INIT_ARGS`, set before JAX starts) under which XLA's TPU compiler runs an
all-reduce asynchronously, fused with independent compute (its async collective fusion), instead of
synchronously. The last one stops it from combining independent all-reduces into one: two
tensor-parallel all-reduces of a braided tick's two ops, combined, would wait for both ops. Without
all four, every all-reduce in the tick loop stays synchronous (libtpu 0.0.42.1 with jax 0.10.2;
with them, libtpu 0.0.50.1 with jax 0.12 hides as many: `experiments/tp_overlap.py`)."""

TPU_ASYNC_ALL_TO_ALL_FLAGS = ("--xla_tpu_enable_async_all_to_all=true",)
"""The libtpu flag (`LIBTPU_INIT_ARGS`, set before JAX starts) under which XLA's TPU compiler runs an
all-to-all asynchronously (`all-to-all-start` ... `all-to-all-done`), with independent compute
scheduled in between. Without it every all-to-all is synchronous, `TPU_ASYNC_ALL_REDUCE_FLAGS` or
not; `--xla_tpu_force_async_all_to_all=true` on top changes nothing (libtpu 0.0.50.1 with jax 0.12:
`experiments/moe_overlap.py`)."""

GPU_COMPILER_OPTIONS = step_module.GPU_COMPILER_OPTIONS
"""XLA options every GPU compilation gets, as the training step on GPUs does (`jpipe.train.step`);
`compile_training_step` adds the caller's on top."""

# HBM per chip by `device.device_kind`, as the Cloud TPU documentation gives it. Deviceless
# topology devices expose no memory size (`memory_stats()` needs an attached device), hence a table.
HBM_PER_CHIP = {
    "TPU v2": 16 * GIB,
    "TPU v3": 32 * GIB,
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,  # v6e (Trillium)
    "TPU7x": 192 * GIB,  # Ironwood
}

_CPU_TOPOLOGY = re.compile(r"^cpu:(\d+)$")
_TPU_NAME = re.compile(r"^v\d")
_GPU_SHAPE = re.compile(r"^(?:(\d+)x)?(\d+)$")

GPU_TARGETS = {"h100": "h100.txtpb", "a100": "a100.txtpb", "b200": "b200.txtpb"}
"""GPU names `--topology` knows, and their `GpuTargetConfigProto` text files in `jpipe/targets/`
(reduced from XLA's `xla/backends/gpu/target_config/specs/`: H100 SXM 80 GB, A100 SXM 80 GB, B200)."""

GPU_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")
"""The distributions that hold XLA's GPU compiler (jax's CUDA plugins); `jpipe-pp[gpu]` installs the first."""


class CompileSetupError(ValueError):
    """What was asked cannot be compiled as asked: libtpu or the CUDA plugin missing, an unknown topology, too few CPU
    devices, a topology whose device count is not data x stage x tensor, or an unknown compiler option.

    The message says what to change; the CLI prints it as one line and exits with status 2.
    """


class DoesNotFitError(RuntimeError):
    """XLA's TPU compiler refused the step: it needs more memory than a device of the topology has.

    The compiler checks this itself and then produces no program, hence no memory analysis; `reason`
    is its message (e.g. "Ran out of memory on HBM, the total memory required for HLO temporaries
    (27.95G) exceeds available HBM (15.75G)").
    """

    def __init__(self, topology: str, device_kind: str, reason: str):
        self.topology, self.device_kind, self.reason = topology, device_kind, reason
        super().__init__(
            f"the training step does not fit on {topology} ({device_kind}): {reason}; less memory per device "
            "comes from remat ('full' or 'dots'), a smaller batch, a 1F1B-like schedule, more stages or "
            "tensor parallelism, or a larger slice"
        )


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """The training step compiled for a topology: XLA's per-device memory analysis and the program.

    Byte counts are per device, from `compiled.memory_analysis()`:

    Attributes:
      topology: the topology name compiled for (`"v5e:2x2"`, `"h100:8"`, `"cpu:8"`).
      platform: `"tpu"`, `"gpu"` or `"cpu"`.
      device_kind: e.g. `"TPU v5 lite"`, `"NVIDIA H100 80GB HBM3"`.
      num_devices: devices in the topology (= data x stage x tensor).
      mesh_shape: `{"data": ..., "stage": ..., "tensor": ...}`.
      schedule: the schedule's name, with its microbatches and virtual stages, e.g. `"1f1b m=8 v=1"`.
      argument_bytes: the step's inputs on one device: parameters, optimizer state, tokens, targets.
      output_bytes: its outputs: new parameters and optimizer state, loss, gradient norm.
      temp_bytes: XLA's scratch buffers (activations, stashes, gradients, collective buffers).
      alias_bytes: outputs that reuse a donated input's buffer (parameters and optimizer state),
        counted in both `argument_bytes` and `output_bytes`.
      generated_code_bytes: the executable's code (not part of `total_bytes`).
      host_temp_bytes: temporaries in host memory: the buffers `--offload` keeps there (not part
        of `total_bytes`, which is device memory; 0 without offload, and on CPU).
      device_temp_bytes: on a TPU, the temp allocation in device memory read from the compiler's
        buffer assignment (`device_temp_allocation`; None elsewhere): the preallocated temp buffer.
        It leaves out the generated code that `temp_bytes` counts, and any allocation outside that
        buffer (1.7 GiB of a 24-layer zbv step's 14.3 GiB: docs/compile.md). Under `--offload`
        compare it, not `temp_bytes`, between runs:
        libtpu's `memory_analysis()` then counts some of the host allocation in `temp_bytes` (all of
        it for a stash-offloaded 1f1b step, part of it for zbv).
      memory_capacity_bytes: HBM per device: `HBM_PER_CHIP[device_kind]` / devices per chip for
        TPUs, the target config's `device_memory_size` for GPUs; None for CPU topologies and unknown
        TPU generations.
      collectives: number of each collective instruction (`jpipe.parallel.hlo.COLLECTIVES`) in the
        compiled HLO, asynchronous start/done pairs counted once.
      collectives_in_loop: the same for those inside a loop body (the pipeline's tick loop): they
        run once per tick rather than once per step.
      lower_seconds: tracing and lowering to StableHLO.
      compile_seconds: XLA compilation of the lowered step.
      versions: the compiler's provenance (`"jax 0.10.2, libtpu 0.0.42.1"`).
      compiler_options: the XLA options this compilation ran with (`GPU_COMPILER_OPTIONS` on GPUs,
        then the caller's).
      plan: the executor's resolved options (`PipelinePlan.describe()`), e.g. "backward whole,
        sends overlapped (auto)".
      hlo_text: the compiled, scheduled HLO (`compiled.as_text()`).
    """

    topology: str
    platform: str
    device_kind: str
    num_devices: int
    mesh_shape: dict[str, int]
    schedule: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    memory_capacity_bytes: int | None
    collectives: dict[str, int]
    collectives_in_loop: dict[str, int]
    lower_seconds: float
    compile_seconds: float
    versions: str
    hlo_text: str = dataclasses.field(repr=False)
    compiler_options: dict = dataclasses.field(default_factory=dict)
    plan: str = ""
    host_temp_bytes: int = 0
    device_temp_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        """Peak bytes per device: argument + output + temp - alias (aliased outputs counted once)."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def fits(self) -> bool | None:
        """`total_bytes <= memory_capacity_bytes` (no headroom for the runtime); None if unknown.

        XLA's TPU compiler refuses a step that needs more than a device's HBM (`DoesNotFitError`), so
        a compiled TPU step fits; `describe()` says by how much.
        """
        if self.memory_capacity_bytes is None:
            return None
        return self.total_bytes <= self.memory_capacity_bytes

    def describe(self) -> str:
        """A readable report: the per-device memory table (MiB), collectives, compile time."""
        mesh = " x ".join(f"{name} {size}" for name, size in self.mesh_shape.items())
        rows = [
            ("arguments", self.argument_bytes, "parameters, optimizer state, tokens, targets"),
            ("outputs", self.output_bytes, "updated parameters and optimizer state, loss, gradient norm"),
            ("temp", self.temp_bytes, "activations, stashes, gradients, collective buffers"),
            ("aliased", -self.alias_bytes, "outputs written into donated arguments"),
            ("total", self.total_bytes, "arguments + outputs + temp - aliased"),
        ]
        if self.memory_capacity_bytes is not None:
            rows.append(("capacity", self.memory_capacity_bytes, f"HBM per device ({self.device_kind})"))
        lines = [
            f"{self.topology}: {self.num_devices} x {self.device_kind} ({self.platform}); mesh {mesh}; "
            f"schedule {self.schedule}{'; ' + self.plan if self.plan else ''}; {self.versions}",
            f"{'per device':<12}{'MiB':>12}",
        ]
        lines += [f"  {name:<10}{value / MIB:>12.2f}   {note}" for name, value, note in rows]
        if self.fits is not None:
            share = self.total_bytes / self.memory_capacity_bytes
            lines.append(f"  {'fits':<10}{'yes' if self.fits else 'NO':>12}   total is {share:.1%} of capacity")
        lines.append(
            f"  {'code':<10}{self.generated_code_bytes / MIB:>12.2f}   generated code (on TPU, counted in temp)"
        )
        if self.device_temp_bytes is not None:
            lines.append(
                f"  {'temp alloc':<10}{self.device_temp_bytes / MIB:>12.2f}   device temp allocation "
                "(buffer assignment: no code, no host buffers)"
            )
        if self.host_temp_bytes:
            lines.append(
                f"  {'host temp':<10}{self.host_temp_bytes / MIB:>12.2f}   offloaded buffers on the host (not in total)"
            )
        lines.append(f"{'collectives':<20}{'count':>6}{'in tick loop':>14}")
        lines += [
            f"  {kind:<18}{count:>6}{self.collectives_in_loop[kind]:>14}" for kind, count in self.collectives.items()
        ]
        lines.append(f"compile: {self.compile_seconds:.1f} s (trace and lower {self.lower_seconds:.1f} s)")
        if self.compiler_options:
            options = " ".join(f"{key}={value}" for key, value in self.compiler_options.items())
            lines.append(f"compiler options: {options}")
        return "\n".join(lines)

    __str__ = describe


def topology_devices(topology: str) -> tuple:
    """The devices of `topology`: a TPU slice's (deviceless, from libtpu), GPUs' (compile-only, from
    jax's CUDA plugin and a shipped target config) or `cpu:N`'s.

    `cpu:N` takes the first N devices of the local CPU backend, which JAX sizes once, when it
    starts: with fewer, set `XLA_FLAGS=--xla_force_host_platform_device_count=N` (or
    `jax.config.update("jax_num_cpu_devices", N)`) before JAX starts, or use `python -m jpipe.compile`.
    """
    import jax

    wanted = _cpu_device_count(topology)
    if wanted is not None:
        available = jax.devices("cpu")
        if len(available) < wanted:
            raise CompileSetupError(
                f"topology {topology}: needs {wanted} CPU devices, JAX started with {len(available)}; set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={wanted} before JAX starts, or run "
                f"python -m jpipe.compile --topology {topology}, which does"
            )
        return tuple(available[:wanted])
    if _gpu_shape(topology) is not None:
        return _gpu_topology_devices(topology)
    return _tpu_topology_devices(topology)


def _gpu_shape(topology: str) -> tuple[str, int, int] | None:
    """(GPU name, hosts, GPUs per host) for a GPU topology, None for a TPU one (`v...`) or `cpu:N`.

    A name that is neither TPU nor CPU is taken as a GPU; one without a shipped target config is refused.
    """
    name, sep, shape = topology.partition(":")
    if not sep or name == "cpu" or _TPU_NAME.match(name):
        return None
    match = _GPU_SHAPE.match(shape)
    if name not in GPU_TARGETS or match is None or int(match.group(2)) < 1 or int(match.group(1) or 1) < 1:
        examples = ", ".join(f"{gpu}:8" for gpu in GPU_TARGETS)
        raise CompileSetupError(
            f"unknown GPU topology {topology!r}: expected <gpu>:<GPUs per host> or <gpu>:<hosts>x<GPUs per host> "
            f"with <gpu> one of {', '.join(GPU_TARGETS)}, e.g. {examples}, {next(iter(GPU_TARGETS))}:2x8; or a TPU "
            f"topology such as {', '.join(EXAMPLE_TOPOLOGIES[1:3])}"
        )
    return name, int(match.group(1) or 1), int(match.group(2))


def gpu_target_config(name: str) -> str:
    """The `GpuTargetConfigProto` text shipped for GPU `name` (a key of `GPU_TARGETS`)."""
    import importlib.resources

    return importlib.resources.files("jpipe.targets").joinpath(GPU_TARGETS[name]).read_text()


def _gpu_plugin_version() -> str | None:
    for plugin in GPU_PLUGINS:
        try:
            return f"{plugin} {importlib.metadata.version(plugin)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


@functools.cache
def _gpu_topology_devices(topology: str) -> tuple:
    name, hosts, per_host = _gpu_shape(topology)
    if _gpu_plugin_version() is None:
        raise CompileSetupError(
            f"compiling for the GPU topology {topology} needs jax's CUDA plugin (XLA's GPU compiler): install the "
            f"gpu extra: pip install -e '.[gpu]' (or pip install 'jpipe-pp[gpu]', or pip install "
            f"'jax[cuda12]=={_jax_version()}')"
        )
    import jax
    from jax.experimental import topologies

    # Without a GPU the plugin's start-up check of the CUDA libraries (cuInit) fails; compiling needs none.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        description = topologies.get_topology_desc(
            f"{name}x{hosts * per_host}",
            "cuda",
            target_config=gpu_target_config(name),
            topology=f"1x{hosts}x{per_host}",  # slices x hosts per slice x devices per host
        )
    except (jax.errors.JaxRuntimeError, NotImplementedError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CompileSetupError(f"XLA's GPU compiler could not describe {topology}: {reason}") from error
    return tuple(description.devices)


def _cpu_device_count(topology: str) -> int | None:
    """N for `cpu:N`, None for a TPU topology name."""
    match = _CPU_TOPOLOGY.match(topology)
    if match is None:
        return None
    if int(match.group(1)) < 1:
        raise CompileSetupError(f"topology {topology}: cpu:N needs N >= 1")
    return int(match.group(1))


@functools.cache
def _tpu_topology_devices(topology: str) -> tuple:
    if not _libtpu_installed():
        raise CompileSetupError(
            f"compiling for the TPU topology {topology} needs libtpu (XLA's TPU compiler): "
            f"pip install 'jpipe-pp[tpu]' (or pip install 'jax[tpu]=={_jax_version()}')"
        )
    import jax
    from jax.experimental import topologies

    # libtpu's lockfile keeps two processes off the same TPU chips; compiling uses no chip.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with _libtpu_startup_messages():
        try:
            return tuple(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
        except jax.errors.JaxRuntimeError as error:
            reason = str(error).splitlines()[0].removeprefix("INVALID_ARGUMENT: ")
            if "lockfile" in reason:
                raise CompileSetupError(
                    f"libtpu could not start ({reason}); set ALLOW_MULTIPLE_LIBTPU_LOAD=1 before JAX starts"
                ) from error
            raise CompileSetupError(
                f"unknown or invalid TPU topology {topology!r} ({reason}); examples: {', '.join(EXAMPLE_TOPOLOGIES)}"
            ) from error


def compile_training_step(
    config: TrainConfig, topology: str, *, compiler_options: dict | None = None, schedule: Schedule | None = None
) -> CompiledStep:
    """Compile the training step `python -m jpipe.train` runs for `config`, for `topology`'s devices.

    Args:
      config: the run; its mesh (`data x stage x tensor`) must have as many devices as `topology`.
      topology: a TPU topology name libtpu knows (`"v5e:2x2"`, `"v5p:2x2x1"`, `"v6e:2x2"`,
        `"v4:2x2x1"`, ...), a GPU one (`"h100:8"`, `"a100:8"`, `"b200:8"`, `"h100:2x8"`) or `"cpu:N"`.
      compiler_options: XLA options for this compilation, typed (bool, int, float or str), e.g.
        `{"xla_tpu_enable_latency_hiding_scheduler": False}`; on GPUs they are added to (and
        override) `GPU_COMPILER_OPTIONS`.
      schedule: the order to run instead of the one `config` names (`build_train_step`'s `schedule`):
        e.g. the named order with `overlap_sends=True`, where the training step would run its
        send_latency=1 build (possibly two half-batch streams).

    Returns the per-device memory analysis, collective counts and scheduled HLO. Raises
    `CompileSetupError` for a missing libtpu or CUDA plugin, an unknown topology, a device count mismatch or an
    unknown compiler option, and `DoesNotFitError` when the TPU compiler finds the step needs more
    memory than a device has.
    """

    from jpipe.train.loop import build_train_step, training_mesh

    devices = topology_devices(topology)
    parallel = config.parallel
    if len(devices) != parallel.num_devices:
        raise CompileSetupError(
            f"topology {topology} has {len(devices)} devices but the mesh data {parallel.data} x stages "
            f"{parallel.stage} x tensor {parallel.tensor} has {parallel.num_devices}; choose --data, --stages "
            f"and --tensor whose product is {len(devices)}, or another topology"
        )
    train_step = build_train_step(config, training_mesh(parallel, devices), schedule=schedule)
    began = time.perf_counter()
    lowered = train_step.step.lower(*train_step.abstract_arguments())
    lowered_at = time.perf_counter()
    if devices[0].platform == "gpu":
        compiler_options = {**GPU_COMPILER_OPTIONS, **(compiler_options or {})}
    with contextlib.ExitStack() as stack:
        options = dict(compiler_options or {})
        reads_buffers = devices[0].platform == "tpu"  # see CompiledStep.device_temp_bytes
        if reads_buffers and "xla_dump_to" not in options:
            options["xla_dump_to"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="jpipe-buffers-"))
        compiled = _compiled_for(lowered, options, topology, devices[0])
        compiled_at = time.perf_counter()
        device_temp = device_temp_allocation(pathlib.Path(options["xla_dump_to"])) if reads_buffers else None
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    found = hlo.collectives(text)
    schedule = train_step.pipe.schedule
    device = devices[0]
    return CompiledStep(
        topology=topology,
        platform=device.platform,
        device_kind=device.device_kind,
        num_devices=len(devices),
        mesh_shape=dict(train_step.pipe.mesh.shape),
        schedule=f"{schedule.name} m={schedule.num_microbatches} v={schedule.virtual}",
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        host_temp_bytes=getattr(memory, "host_temp_size_in_bytes", 0),
        device_temp_bytes=device_temp,
        alias_bytes=memory.alias_size_in_bytes,
        generated_code_bytes=memory.generated_code_size_in_bytes,
        memory_capacity_bytes=memory_capacity(devices),
        collectives={kind: sum(c.kind == kind for c in found) for kind in hlo.COLLECTIVES},
        collectives_in_loop={kind: sum(c.kind == kind and c.in_loop for c in found) for kind in hlo.COLLECTIVES},
        lower_seconds=lowered_at - began,
        compile_seconds=compiled_at - lowered_at,
        versions=_versions(device.platform),
        hlo_text=text,
        compiler_options=dict(compiler_options or {}),
        plan=train_step.plan.describe() if train_step.plan is not None else "",
    )


def _compiled_for(lowered, options: dict, topology: str, device):
    """`lowered.compile(options)`, its errors as `CompileSetupError` (an option) or `DoesNotFitError`."""
    import jax

    try:
        return lowered.compile(compiler_options=options or None)
    except jax.errors.JaxRuntimeError as error:
        reason = str(error).splitlines()[0].removeprefix("INVALID_ARGUMENT: ")
        if "No such compile option" in reason or "While setting option" in reason:
            raise CompileSetupError(f"compiler_options: {reason}") from error
        if reason.startswith("RESOURCE_EXHAUSTED: "):
            # Newer libtpu names the error before the message: "E1000: CompileTimeHbmOom: Ran out of ...".
            reason = re.sub(r"^E\d+: \w+: ", "", reason.removeprefix("RESOURCE_EXHAUSTED: "))
            raise DoesNotFitError(topology, device.device_kind, reason.rstrip(".")) from error
        raise


def device_temp_allocation(dump: pathlib.Path) -> int:
    """The device-memory temp allocation of the largest module in an `xla_dump_to` folder, in bytes.

    The buffer assignment's `preallocated-temp` allocations in the default memory space (those
    without a `color`; host memory is color 5), summed.
    """
    assignments = sorted(dump.glob("*after_optimizations-buffer-assignment.txt"), key=lambda p: p.stat().st_size)
    if not assignments:
        raise FileNotFoundError(f"no buffer assignment in {dump}")
    sizes = re.findall(
        r"^allocation \d+: size (\d+),(?: page \d+,)? preallocated-temp", assignments[-1].read_text(), re.M
    )
    return sum(int(size) for size in sizes)


def memory_capacity(devices: Sequence) -> int | None:
    """HBM bytes per device: `HBM_PER_CHIP` over the devices sharing a chip, a GPU's from its target
    config; None if unknown."""
    device = devices[0]
    if device.platform == "gpu":
        for name in GPU_TARGETS:
            config = gpu_target_config(name)
            if f'device_description_str: "{device.device_kind}"' in config:
                return int(re.search(r"device_memory_size:\s*(\d+)", config).group(1))
        return None
    per_chip = HBM_PER_CHIP.get(device.device_kind) if device.platform == "tpu" else None
    if per_chip is None:
        return None
    chips: dict[tuple, int] = {}
    for d in devices:
        chips[tuple(d.coords)] = chips.get(tuple(d.coords), 0) + 1
    return per_chip // max(chips.values())


def fit_data_parallelism(config: TrainConfig, num_devices: int) -> TrainConfig:
    """`config` with `data` set so that data x stage x tensor = `num_devices`.

    The batch size scales with `data`, so every data replica keeps its examples per step and each
    device's memory is that of the original run. Raises `CompileSetupError` when stage x tensor does
    not divide `num_devices`.
    """
    parallel = config.parallel
    per_replica = parallel.stage * parallel.tensor
    if num_devices % per_replica:
        raise CompileSetupError(
            f"{num_devices} devices do not divide into stages {parallel.stage} x tensor {parallel.tensor} "
            f"= {per_replica} per data replica; choose --stages and --tensor whose product divides {num_devices}"
        )
    data = num_devices // per_replica
    batch_size = config.data.batch_size // parallel.data * data
    return dataclasses.replace(
        config,
        parallel=dataclasses.replace(parallel, data=data),
        data=dataclasses.replace(config.data, batch_size=batch_size),
    )


def _libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))


def _jax_version() -> str:
    return importlib.metadata.version("jax")


def _versions(platform: str) -> str:
    if platform == "tpu":
        try:
            return f"jax {_jax_version()}, libtpu {importlib.metadata.version('libtpu')}"
        except importlib.metadata.PackageNotFoundError:
            return f"jax {_jax_version()}, libtpu from TPU_LIBRARY_PATH"
    if platform == "gpu":
        return f"jax {_jax_version()}, jaxlib {importlib.metadata.version('jaxlib')}, {_gpu_plugin_version()}"
    return f"jax {_jax_version()}, jaxlib {importlib.metadata.version('jaxlib')}"


@contextlib.contextmanager
def _libtpu_startup_messages() -> Iterator[None]:
    """Hold back what libtpu writes to file descriptor 2 while it starts.

    Off a TPU VM, libtpu logs that it cannot find TPU worker hostnames and the accelerator type
    (metadata only a TPU VM has; compiling needs neither). The text is dropped, unless the block
    raises something other than a `CompileSetupError` (which explains itself).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        unexpected = False
        try:
            yield
        except CompileSetupError:
            raise
        except BaseException:
            unexpected = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if unexpected:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))
                sys.stderr.flush()


# The command line.


def _option_value(text: str) -> bool | int | float | str:
    """A compiler option's value as XLA wants it typed: true/false, an integer, a float, or text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parser() -> argparse.ArgumentParser:
    """`python -m jpipe.train`'s configuration flags plus `--topology`, `--hlo` and `--compiler-option`."""
    result = argparse.ArgumentParser(
        prog="python -m jpipe.compile",
        description="Compile the training step of `python -m jpipe.train` for a TPU topology or NVIDIA GPUs "
        "(no TPU or GPU needed) "
        "and print its per-device memory, collectives and compile time.",
        formatter_class=HelpFormatter,
        epilog="Exit status: 0 compiled; 2 a bad request (unknown topology, device count mismatch, bad value); "
        "3 the step needs more memory than a device has (the TPU compiler refuses it).",
    )
    result.add_argument(
        "--topology",
        default=DEFAULT_TOPOLOGY,
        help=f"a TPU topology libtpu knows, e.g. {', '.join(EXAMPLE_TOPOLOGIES[:-1])}; NVIDIA GPUs "
        f"<gpu>:<GPUs per host> or <gpu>:<hosts>x<GPUs per host>, <gpu> one of {', '.join(GPU_TARGETS)} "
        "(e.g. h100:8, h100:2x8; needs the gpu extra); or cpu:N. The default "
        "is a one-host v5e slice: 4 chips of 16 GiB. Without --data, data parallelism is fitted to "
        "its devices, scaling the batch size so each data replica keeps its examples",
    )
    result.add_argument("--hlo", default=None, metavar="PATH", help="write the compiled, scheduled HLO text here")
    result.add_argument(
        "--compiler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an XLA option for this compilation (repeatable), e.g. xla_tpu_enable_latency_hiding_scheduler=false",
    )
    add_config_arguments(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status: 0 compiled, 2 a bad request, 3 does not fit (one line)."""
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, CompileSetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DoesNotFitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3


def _run(args: argparse.Namespace) -> int:
    options = {}
    for option in args.compiler_option:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise CompileSetupError(f"--compiler-option: expected KEY=VALUE, got {option!r}")
        options[key] = _option_value(value)
    config = build_config(args)

    import jax

    if jax.config.jax_platforms is None:
        # Measuring the stage costs needs only the CPU; leave any local accelerator to others.
        jax.config.update("jax_platforms", "cpu")
    cpu_devices = _cpu_device_count(args.topology)
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)  # before the CPU backend starts
    devices = topology_devices(args.topology)
    if args.data is None and config.parallel.num_devices != len(devices):
        fitted = fit_data_parallelism(config, len(devices))
        print(
            f"{args.topology} has {len(devices)} devices: fitted --data {fitted.parallel.data} (was "
            f"{config.parallel.data}) and --batch-size {fitted.data.batch_size} (was {config.data.batch_size}; "
            f"{fitted.data.batch_size // fitted.parallel.data} examples per data replica as before)"
        )
        config = fitted
    model = config.model
    print(
        f"compiling the training step: {model.num_layers} layers, d_model {model.d_model}, {model.num_heads} "
        f"heads, seq {config.data.seq_len}, batch {config.data.batch_size}, {model.compute_dtype} compute"
    )
    compiled = compile_training_step(config, args.topology, compiler_options=options or None)
    print(compiled.describe())
    if args.hlo:
        with open(args.hlo, "w") as file:
            file.write(compiled.hlo_text)
        print(f"wrote the compiled HLO to {args.hlo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
