"""`jpipe.compile`: the training step compiled ahead of time for TPU topologies (libtpu) and NVIDIA GPUs
(jax's CUDA plugin), and its CLI.

The TPU tests need libtpu (`pip install 'jpipe-pp[tpu]'`, part of the test extra) and skip without it;
the GPU tests need XLA's GPU compiler (`pip install -e '.[gpu]'`, not part of the test extra: the
CUDA wheels are a few GB) and skip without it. Neither needs a TPU or a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from schedule_cases import REORDERS

from jpipe import compile as jcompile
from jpipe.compile import CompileSetupError, compile_training_step, fit_data_parallelism, topology_devices
from jpipe.parallel.hlo import COLLECTIVES, permute_overlaps
from jpipe.schedules.generators import SCHEDULES, default_virtual
from jpipe.train.loop import build_train_step, training_mesh
from jpipe.train.presets import TrainConfig, preset

ROOT = pathlib.Path(__file__).resolve().parent.parent
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu (XLA's TPU compiler) is not installed: pip install 'jpipe-pp[tpu]'",
)
needs_gpu_compiler = pytest.mark.skipif(
    jcompile._gpu_plugin_version() is None,
    reason="jax's CUDA plugin (XLA's GPU compiler) is not installed: pip install -e '.[gpu]'",
)
MAX_UNALIASED_OUTPUT = 4096  # the loss and the gradient norm: two scalars, padded to TPU tiles


@pytest.fixture(autouse=True)
def _standard_promotion():
    """optax mixes Python floats with int32 step counts, which strict promotion refuses."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _small(schedule: str = "1f1b", *, data: int = 1, stage: int = 4) -> TrainConfig:
    """The tiny preset with 8 layers on data x stage devices, 8 microbatches (dualpipev needs 2 x stage)."""
    config = preset("tiny")
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, num_layers=8),
        parallel=dataclasses.replace(
            config.parallel,
            data=data,
            stage=stage,
            schedule=schedule,
            virtual=default_virtual(schedule),
            microbatches=8,
        ),
        data=dataclasses.replace(config.data, batch_size=8 * data),
    )


@functools.cache
def _compiled(schedule: str, overlap_sends: bool = False) -> jcompile.CompiledStep:
    config = _small(schedule)
    parallel = dataclasses.replace(config.parallel, overlap_sends=overlap_sends)
    return compile_training_step(dataclasses.replace(config, parallel=parallel), "v5e:2x2")


def _state_bytes_per_device(config: TrainConfig, topology: str) -> int:
    """Logical (unpadded) bytes of one device's parameters and optimizer state."""
    step = build_train_step(config, training_mesh(config.parallel, topology_devices(topology)))
    params, opt_state, _, _ = step.abstract_arguments()
    leaves = jax.tree.leaves((params, opt_state))
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in leaves)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "jpipe.compile", *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


@needs_libtpu
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_every_schedule_compiles_for_a_v5e_slice(schedule):
    """Positive, consistent per-device memory; donation aliases the whole state; pipeline permutes in the loop."""
    compiled = _compiled(schedule)
    assert (compiled.platform, compiled.device_kind, compiled.num_devices) == ("tpu", "TPU v5 lite", 4)
    assert compiled.mesh_shape == {"data": 1, "stage": 4, "tensor": 1}
    assert compiled.schedule.startswith(f"{schedule} m=8")
    assert min(compiled.argument_bytes, compiled.output_bytes, compiled.temp_bytes, compiled.alias_bytes) > 0
    assert compiled.total_bytes == (
        compiled.argument_bytes + compiled.output_bytes + compiled.temp_bytes - compiled.alias_bytes
    )
    # Every parameter and optimizer-state output reuses its donated input: only two scalars are new.
    assert 0 <= compiled.output_bytes - compiled.alias_bytes <= MAX_UNALIASED_OUTPUT
    assert compiled.alias_bytes <= compiled.argument_bytes
    assert set(compiled.collectives) == set(COLLECTIVES) == set(compiled.collectives_in_loop)
    permutes = compiled.collectives["collective-permute"]
    assert permutes >= 1 and compiled.collectives_in_loop["collective-permute"] == permutes
    assert compiled.collectives_in_loop["all-gather"] == 0
    assert compiled.memory_capacity_bytes == 16 * 2**30 and compiled.fits is True
    assert "collective-permute-start" in compiled.hlo_text  # asynchronous on TPU: start ... done
    assert compiled.compile_seconds > 0 and "libtpu" in compiled.versions


@needs_libtpu
def test_arguments_hold_the_sharded_state():
    """The argument bytes cover one device's share of parameters and Adam moments (TPU pads, never less)."""
    compiled = _compiled("1f1b")
    assert compiled.argument_bytes >= _state_bytes_per_device(_small("1f1b"), "v5e:2x2")


@needs_libtpu
def test_offloaded_stash_is_host_memory_on_tpu():
    """`--offload stash` puts the stash in host memory (reported apart from the device's temp)."""
    config = _small("1f1b")
    parallel = dataclasses.replace(config.parallel, offload="stash")
    compiled = compile_training_step(dataclasses.replace(config, parallel=parallel), "v5e:2x2")
    plain = _compiled("1f1b")
    assert plain.host_temp_bytes == 0
    assert compiled.host_temp_bytes > 0 and "host temp" in str(compiled)
    assert "S(5)" in compiled.hlo_text  # XLA's host memory space
    # The device's temp allocation, from the buffer assignment (at this size the staging copies
    # outweigh the stash: docs/memory.md has the sizes where offload pays).
    assert 0 < plain.device_temp_bytes < plain.temp_bytes and compiled.device_temp_bytes > 0
    assert "temp alloc" in str(compiled)


@needs_libtpu
def test_describe_prints_the_per_device_table():
    compiled = _compiled("1f1b")
    text = str(compiled)
    for label in ("arguments", "outputs", "temp", "aliased", "total", "capacity", "fits", "collective-permute"):
        assert label in text, label
    total_line = next(line for line in text.splitlines() if line.strip().startswith("total"))
    assert f"{compiled.total_bytes / 2**20:.2f}" in total_line
    assert "16384.00" in text and "yes" in text


@needs_libtpu
def test_a_two_host_topology_compiles_with_the_stage_axis_across_hosts():
    compiled = compile_training_step(_small(data=2), "v5p:2x2x2")
    assert (compiled.device_kind, compiled.num_devices) == ("TPU v5", 8)
    assert compiled.memory_capacity_bytes == 95 * 2**30
    devices = topology_devices("v5p:2x2x2")
    mesh = training_mesh(_small(data=2).parallel, devices)
    assert {d.process_index for d in mesh.devices[0, :, 0]} == {0, 1}


@needs_libtpu
def test_capacity_per_device_splits_a_chip_between_its_tensorcores():
    assert jcompile.memory_capacity(topology_devices("v4:2x2x1")) == 16 * 2**30  # 8 devices on 4 chips
    assert jcompile.memory_capacity(topology_devices("v6e:2x2")) == 32 * 2**30
    assert jcompile.memory_capacity(topology_devices("cpu:2")) is None


def test_cpu_topology_compiles_on_the_local_fake_devices():
    # XLA:CPU's full optimisation doubles the compile time of this test; the options reach XLA.
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    compiled = compile_training_step(_small(stage=2), "cpu:2", compiler_options=fast)
    assert (compiled.platform, compiled.num_devices) == ("cpu", 2)
    assert compiled.memory_capacity_bytes is None and compiled.fits is None
    assert compiled.collectives_in_loop["collective-permute"] >= 1
    assert "capacity" not in compiled.describe()


def test_unknown_compiler_option_is_named():
    with pytest.raises(CompileSetupError, match="compiler_options: .*xla_no_such_option"):
        compile_training_step(_small(stage=2), "cpu:2", compiler_options={"xla_no_such_option": 1})


def test_cpu_topology_with_more_devices_than_jax_started_with():
    with pytest.raises(CompileSetupError, match="xla_force_host_platform_device_count=64"):
        topology_devices("cpu:64")


@needs_libtpu
def test_device_count_mismatch_names_both_numbers():
    with pytest.raises(CompileSetupError) as error:
        compile_training_step(preset("quickstart"), "v5e:2x2")  # data 2 x stages 4 = 8 devices
    assert "has 4 devices" in str(error.value) and "has 8" in str(error.value) and "--data" in str(error.value)


@needs_libtpu
def test_unknown_topology_lists_examples():
    with pytest.raises(
        CompileSetupError, match="unknown or invalid TPU topology 'v9z:2x2'.*examples: v4:2x2x1, v5e:2x2"
    ):
        topology_devices("v9z:2x2")


def test_missing_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setattr(jcompile, "_libtpu_installed", lambda: False)
    with pytest.raises(CompileSetupError) as error:
        topology_devices("v5e:8x8")
    assert "pip install 'jpipe-pp[tpu]'" in str(error.value)
    assert f"pip install 'jax[tpu]=={jax.__version__}'" in str(error.value)


def test_fit_data_parallelism_keeps_the_examples_per_replica():
    config = preset("quickstart")  # data 2 x stage 4, batch 32
    fitted = fit_data_parallelism(config, 4)
    assert (fitted.parallel.data, fitted.data.batch_size) == (1, 16)
    fitted = fit_data_parallelism(config, 16)
    assert (fitted.parallel.data, fitted.data.batch_size) == (4, 64)
    with pytest.raises(CompileSetupError, match="6 devices do not divide into stages 4 x tensor 1"):
        fit_data_parallelism(config, 6)


@needs_libtpu
def test_cli_quickstart_on_v5e_prints_the_table_and_writes_the_hlo(tmp_path):
    hlo = tmp_path / "step.hlo"
    result = _cli("--preset", "quickstart", "--topology", "v5e:2x2", "--hlo", str(hlo))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "fitted --data 1 (was 2) and --batch-size 16 (was 32" in out
    for label in ("arguments", "outputs", "temp", "total", "capacity", "fits", "collective-permute", "compile:"):
        assert label in out, label
    assert "collective-permute-start" in hlo.read_text()
    assert result.stderr == ""  # libtpu's start-up messages about TPU VM metadata are held back


@needs_libtpu
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topology", "v9z:2x2"], "error: unknown or invalid TPU topology 'v9z:2x2'"),
        (["--topology", "v5e:2x2", "--data", "2"], "error: topology v5e:2x2 has 4 devices but the mesh data 2"),
        (["--topology", "v5e:2x2", "--stages", "3"], "error: 4 devices do not divide into stages 3 x tensor 1"),
        (["--topology", "cpu:4", "--compiler-option", "nonsense"], "error: --compiler-option: expected KEY=VALUE"),
        (["--stages", "0"], "error: --stages: parallel.stage: must be an integer >= 1, got 0"),
    ],
)
def test_cli_errors_are_one_line_with_status_2(args, message):
    result = _cli("--preset", "quickstart", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)
    assert "Traceback" not in result.stderr


@needs_libtpu
def test_cli_a_step_larger_than_the_chip_is_refused_with_status_3():
    """gpipe stashes all 8 microbatches' activations and attention scores: 28 GB, on 16 GiB v5e chips."""
    sizes = ["--layers", "8", "--d-model", "512", "--heads", "8", "--seq-len", "1024", "--batch-size", "128"]
    result = _cli(
        "--preset", "tiny", *sizes, "--microbatches", "8", "--schedule", "gpipe", "--stages", "4", "--data", "1"
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.startswith("error: the training step does not fit on v5e:2x2 (TPU v5 lite): Ran out of memory")
    assert len(result.stderr.strip().splitlines()) == 1


@needs_libtpu
@pytest.mark.parametrize("schedule", sorted(set(SCHEDULES) - set(REORDERS)))
def test_hidden_sends_have_a_matmul_in_flight_on_tpu(schedule):
    """overlap_sends: the TPU compiler schedules compute between every pipeline permute's start and done.

    Without it each permute sits alone in a channel-skipping cond branch, start directly followed by
    done: nothing overlaps (the contrast shows the check can fail).
    """
    hidden = [o for o in permute_overlaps(_compiled(schedule, overlap_sends=True).hlo_text) if o.in_loop]
    exposed = [o for o in permute_overlaps(_compiled(schedule).hlo_text) if o.in_loop]
    assert hidden and all(o.hidden for o in hidden), [(o.name, o.matmuls_in_flight) for o in hidden]
    assert exposed and not any(o.hidden for o in exposed)


_SCHEDULED_MODULE = """HloModule m, is_scheduled=true

%body (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4] parameter(0)
  %ar = f32[4,4] all-reduce-start(%p), replica_groups={}, to_apply=%add
  %mm = f32[4,4] dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %done = f32[4,4] all-reduce-done(%ar)
  %sync = f32[4,4] all-reduce(%done), replica_groups={}, to_apply=%add
  ROOT %out = f32[4,4] add(%sync, %mm)
}

ENTRY %main (x: f32[4,4]) -> f32[4,4] {
  %x = f32[4,4] parameter(0)
  ROOT %w = f32[4,4] while(%x), condition=%cond, body=%body
}
"""


def test_collective_overlaps_finds_async_all_reduces_with_a_matmul_in_flight():
    from jpipe.parallel.hlo import collective_overlaps

    found = {o.name: o for o in collective_overlaps(_SCHEDULED_MODULE, "all-reduce")}
    assert set(found) == {"ar", "sync"}
    assert found["ar"].hidden and found["ar"].matmuls_in_flight == ("mm",) and found["ar"].in_loop
    assert found["ar"].asynchronous and not found["sync"].asynchronous
    assert not found["sync"].hidden  # synchronous: nothing runs beside it
    assert collective_overlaps(_SCHEDULED_MODULE, "collective-permute") == []
    with pytest.raises(ValueError, match="kind"):
        collective_overlaps(_SCHEDULED_MODULE, "all-reduce-start")


_CUBLAS_MODULE = """HloModule m, is_scheduled=true

%body (p: f32[64,64]) -> f32[64,64] {
  %p = f32[64,64] parameter(0)
  %cp = (f32[64,64], f32[64,64]) collective-permute-start(%p), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %gemm = (f32[64,64], s8[4194304]) custom-call(%p, %p), custom_call_target="__cublas$gemm"
  %out = f32[64,64] get-tuple-element(%gemm), index=0
  %done = f32[64,64] collective-permute-done(%cp)
  ROOT %sum = f32[64,64] add(%done, %out)
}

ENTRY %main (x: f32[64,64]) -> f32[64,64] {
  %x = f32[64,64] parameter(0)
  ROOT %w = f32[64,64] while(%x), condition=%cond, body=%body
}
"""


def test_a_cublas_call_counts_as_a_matmul_in_flight():
    """XLA's GPU compiler runs large matmuls as custom-calls to cuBLAS, not as dots."""
    (found,) = permute_overlaps(_CUBLAS_MODULE)
    assert found.hidden and found.matmuls_in_flight == ("gemm",) and found.in_loop


# NVIDIA GPUs: XLA's GPU compiler from jax's CUDA plugin, with the target configs in jpipe/targets/.


@needs_gpu_compiler
@pytest.mark.parametrize("gpu", sorted(jcompile.GPU_TARGETS))
def test_a_small_step_compiles_for_each_shipped_gpu_target(gpu):
    compiled = compile_training_step(_small(stage=2), f"{gpu}:2")
    config = jcompile.gpu_target_config(gpu)
    assert (compiled.platform, compiled.num_devices) == ("gpu", 2)
    assert f'device_description_str: "{compiled.device_kind}"' in config
    assert compiled.memory_capacity_bytes == int(config.split("device_memory_size: ")[1].split()[0])
    assert compiled.fits is True and min(compiled.argument_bytes, compiled.temp_bytes) > 0
    assert compiled.collectives_in_loop["collective-permute"] >= 1 and compiled.collectives_in_loop["all-gather"] == 0
    assert "jax-cuda12-plugin" in compiled.versions or "jax-cuda13-plugin" in compiled.versions
    assert compiled.compiler_options == jcompile.GPU_COMPILER_OPTIONS
    assert compiled.device_kind in compiled.describe()


@needs_gpu_compiler
def test_a_two_host_gpu_topology_puts_eight_gpus_on_each_host():
    devices = topology_devices("h100:2x8")
    assert len(devices) == 16 and {d.platform for d in devices} == {"gpu"}
    assert [sum(d.process_index == host for d in devices) for host in (0, 1)] == [8, 8]

    def ids(topology):
        return [(d.id, d.process_index, d.device_kind) for d in topology_devices(topology)]

    assert ids("h100:8") == ids("h100:1x8")


@pytest.mark.parametrize("topology", ["h200:8", "h100:0", "h100:2x2x2", "a100:"])
def test_unknown_gpu_topology_lists_the_shipped_targets(topology):
    with pytest.raises(CompileSetupError, match=f"unknown GPU topology '{topology}'.*one of h100, a100, b200"):
        topology_devices(topology)


def test_missing_gpu_compiler_says_how_to_install(monkeypatch):
    monkeypatch.setattr(jcompile, "_gpu_plugin_version", lambda: None)
    with pytest.raises(CompileSetupError) as error:
        topology_devices("h100:4x8")
    assert "install the gpu extra: pip install -e '.[gpu]'" in str(error.value)


def test_cli_unknown_gpu_is_one_line_with_status_2():
    result = _cli("--preset", "quickstart", "--topology", "h200:8")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: unknown GPU topology 'h200:8'") and len(result.stderr.splitlines()) == 1


@functools.cache
def _compiled_for_gpu(schedule: str, overlap_sends: bool) -> jcompile.CompiledStep:
    """The small step on 4 H100s as the training command builds it: with hidden sends, the named
    order, since its two-stream order would need more than `parallel.two_stream_memory` (1.25x)."""
    config = _small(schedule)
    parallel = dataclasses.replace(config.parallel, overlap_sends=overlap_sends)
    compiled = compile_training_step(dataclasses.replace(config, parallel=parallel), "h100:4")
    assert compiled.schedule.startswith(f"{schedule} m=")  # not <name>[2 streams]
    return compiled


@needs_gpu_compiler
@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "zb_h1", "zbv"])
def test_hidden_sends_have_a_matmul_in_flight_on_gpu(schedule):
    """With GPU_COMPILER_OPTIONS every pipeline permute of the tick loop overlaps a matmul, at <= 1.25x temp memory.

    XLA's GPU scheduler keeps one collective in flight by default, so one of the tick's two permutes
    (forward and backward ring) stayed exposed; its option for two in flight hides both.
    """
    hidden, exposed = _compiled_for_gpu(schedule, True), _compiled_for_gpu(schedule, False)
    overlaps = [o for o in permute_overlaps(hidden.hlo_text) if o.in_loop]
    assert overlaps and all(o.hidden for o in overlaps), [(o.name, o.matmuls_in_flight) for o in overlaps]
    assert hidden.temp_bytes <= 1.25 * exposed.temp_bytes, (hidden.temp_bytes, exposed.temp_bytes)
    assert not any(o.hidden for o in permute_overlaps(exposed.hlo_text) if o.in_loop)


def test_the_training_step_gets_the_gpu_options_only_on_gpus():
    from jpipe.train.step import GPU_COMPILER_OPTIONS, compiler_options_for

    gpu, cpu = (type("Device", (), {"platform": platform})() for platform in ("gpu", "cpu"))
    assert compiler_options_for([gpu, gpu]) == GPU_COMPILER_OPTIONS == jcompile.GPU_COMPILER_OPTIONS
    assert compiler_options_for(jax.devices()) is None and compiler_options_for([cpu]) is None
