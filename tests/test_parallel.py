"""Meshes, sharding rules, where parameters live, and where the compiled LM step communicates."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from lm_cases import BATCH, CASE_IDS, CASES, TINY, compiled_step, mesh_of, model_params, pipeline, placed_params

from jpipe import schedules
from jpipe.models import GPTConfig, PipelinedLM
from jpipe.parallel import DATA, STAGE, TENSOR, ShardingRules, make_mesh, per_device_bytes, total_bytes
from jpipe.parallel.hlo import collectives
from jpipe.pipeline import PipelineOptions

FSDP_CASES = [case for case in CASES if case.fsdp]


class TestMesh:
    def test_axes_are_named_slowest_to_fastest_and_left_to_the_compiler(self):
        mesh = make_mesh(data=2, stage=2, tensor=2)
        assert mesh.axis_names == (DATA, STAGE, TENSOR) == ("data", "stage", "tensor")
        assert dict(mesh.shape) == {"data": 2, "stage": 2, "tensor": 2}
        assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
        assert make_mesh(stage=4).devices.shape == (1, 4, 1)

    def test_clear_error_when_devices_are_short(self):
        with pytest.raises(ValueError, match=r"data=2 x stage=2 x tensor=1 needs 4 devices, only 2 available"):
            make_mesh(data=2, stage=2, devices=jax.devices()[:2])
        with pytest.raises(ValueError, match="stage must be an integer >= 1"):
            make_mesh(stage=0)


class TestRules:
    def test_megatron_column_then_row_parallel(self):
        rules = ShardingRules()
        assert rules.spec(("embed", "heads", "head_dim")) == P(None, TENSOR, None)  # q, k, v: column
        assert rules.spec(("heads", "head_dim", "embed")) == P(TENSOR, None, None)  # out: row
        assert rules.spec(("embed", "mlp")) == P(None, TENSOR)  # up: column
        assert rules.spec(("mlp", "embed")) == P(TENSOR, None)  # down: row
        assert rules.spec(("stage", "layer", "embed")) == P(STAGE, None, None)

    def test_collisions_and_unknown_names_are_rejected(self):
        with pytest.raises(ValueError, match=r"'heads' and 'mlp' both map to mesh axis 'tensor'"):
            ShardingRules().spec(("heads", "mlp"))
        with pytest.raises(ValueError, match=r"no sharding rule for logical axis 'hidden'"):
            ShardingRules().spec(("hidden",))
        with pytest.raises(ValueError, match="repeat an axis"):
            ShardingRules(rules={"embed": (DATA, DATA)})

    def test_fsdp_splits_the_largest_free_dimension(self):
        mesh = make_mesh(data=2, stage=2, tensor=2)
        fsdp = ShardingRules(fsdp=True)
        assert fsdp.param_spec(("stage", "layer", "embed", "mlp"), (2, 3, 16, 64), mesh) == P(STAGE, None, DATA, TENSOR)
        assert fsdp.param_spec(("stage", "layer", "mlp", "embed"), (2, 3, 64, 16), mesh) == P(STAGE, None, TENSOR, DATA)
        # Not split by stage in the pipeline: split over data and stage (the default fsdp_axes).
        assert fsdp.param_spec(("vocab", "embed"), (64, 16), mesh) == P(TENSOR, (DATA, STAGE))
        assert ShardingRules(fsdp=True, fsdp_axes=(DATA,)).param_spec(("vocab", "embed"), (64, 16), mesh) == P(
            TENSOR, DATA
        )
        assert fsdp.param_spec(("position", "embed"), (8, 32), mesh) == P(None, (DATA, STAGE))
        assert fsdp.param_spec(("embed",), (6,), mesh) == P(DATA)  # 4 does not divide 6, 2 does
        assert fsdp.param_spec(("embed",), (3,), mesh) == P(None)  # nothing divides: stays whole
        assert ShardingRules().param_spec(("vocab", "embed"), (64, 16), mesh) == P(TENSOR, None)

    def test_dimensions_must_divide_over_their_mesh_axes(self):
        config = dataclasses.replace(TINY, num_heads=2)
        pipe = PipelinedLM(config, schedule=schedules.build("1f1b", 2, 4), mesh=mesh_of((1, 2, 4)))
        message = r"\['attention'\]\['w[kqv]'\]: dimension 3 \('heads', size 2\) does not divide .* \(4 devices\)"
        with pytest.raises(ValueError, match=message):
            pipe.shardings()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_each_device_stores_only_its_stages(case):
    """Every shard of a block parameter holds exactly the stages the schedule runs on that device."""
    pipe, params = pipeline(case), placed_params(case)
    schedule, mesh = pipe.schedule, pipe.mesh
    stage_of = {device: index[1] for index, device in np.ndenumerate(mesh.devices)}
    logical = pipe.layout.to_stages(model_params(case.config)["blocks"])  # [S, slots, ...] logical order
    v = schedule.virtual
    for leaf, full in zip(jax.tree.leaves(params["blocks"]), jax.tree.leaves(logical)):
        assert len(leaf.addressable_shards) == mesh.size
        for shard in leaf.addressable_shards:
            d = stage_of[shard.device]
            rows = shard.index[0]
            assert (rows.start, rows.stop) == (d * v, (d + 1) * v)
            expected = np.asarray(full)[list(schedule.stages_of(d))][(slice(None), *shard.index[1:])]
            np.testing.assert_array_equal(np.asarray(shard.data), expected)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_the_step_never_moves_stage_parameters_between_stage_devices(case):
    """No collective of the compiled step carries all stages of a block parameter or gradient.

    Interleaved and V placements included: the blocks are stored in device order and handed to the
    executor as such (`stage_order="device"`), so only FSDP's gathers over `data` touch them.
    """
    found = collectives(compiled_step(case).as_text())
    whole = set()
    for leaf in jax.tree.leaves(placed_params(case)["blocks"]):
        for trailing in (leaf.shape[2:], leaf.addressable_shards[0].data.shape[2:]):
            whole.add("[" + ",".join(map(str, leaf.shape[:2] + trailing)) + "]")
    assert not [(c.kind, c.shape) for c in found if any(shape in c.shape for shape in whole)]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_per_device_parameter_bytes(case):
    """Blocks ~ total / (stage x tensor [x data under FSDP]); under FSDP everything ~ total / devices.

    Exactly: each leaf's bytes over the mesh axes its sharding names. Norm scales have no dimension
    for `tensor`, so they are replicated over it: hence "~" (up to 3% here, with tensor = 4).
    """
    pipe, params = pipeline(case), placed_params(case)
    data, stage, tensor = case.mesh
    per_device, blocks = per_device_bytes(params), per_device_bytes(params["blocks"])
    assert len(per_device) == len(blocks) == pipe.mesh.size
    assert set(per_device.values()) == {sum(a.nbytes // _shards(pipe.mesh, a) for a in jax.tree.leaves(params))}
    share = stage * tensor * (data if case.fsdp else 1)
    (block_bytes,) = set(blocks.values())
    assert block_bytes == pytest.approx(total_bytes(params["blocks"]) / share, rel=0.05)
    if case.fsdp:  # the embedding and head are split over data and stage too
        (device_bytes,) = set(per_device.values())
        assert device_bytes == pytest.approx(total_bytes(params) / pipe.mesh.size, rel=0.05)


def _shards(mesh: jax.sharding.Mesh, a: jax.Array) -> int:
    """Into how many distinct pieces `a`'s sharding splits it."""
    count = 1
    for entry in a.sharding.spec:
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            count *= mesh.shape[axis]
    return count


@pytest.mark.parametrize("case", FSDP_CASES, ids=[case.id for case in FSDP_CASES])
def test_fsdp_gathers_parameters_once_per_step_outside_the_tick_loop(case):
    found = collectives(compiled_step(case).as_text())
    assert [c for c in found if c.in_loop and c.kind == "collective-permute"], "the tick loop was not found"
    assert [c for c in found if not c.in_loop and c.kind == "all-gather"], "FSDP's gathers at the step entry"
    assert not [c for c in found if c.in_loop and c.kind == "all-gather"]


def test_tensor_parallel_reduces_activations_inside_each_block():
    """(1, 2, 4): row-parallel projections end in all-reduces of [B, T, D] activations in the tick loop."""
    case = next(case for case in CASES if case.mesh == (1, 2, 4))
    found = collectives(compiled_step(case).as_text())
    activation = f"f32[{BATCH},{TINY.seq_len},{TINY.d_model}]"
    reductions = [c for c in found if c.in_loop and c.kind == "all-reduce" and activation in c.shape]
    assert len(reductions) >= 2  # after attention and after the MLP (forward), more in the backward
    assert not [c for c in found if c.in_loop and c.kind == "all-gather"]


def _lm_step_memory(num_microbatches: int, remat: str = "full"):
    """Per-device bytes and the collectives of the LM step compiled for 1f1b, data 1 x stage 4."""
    config = GPTConfig(vocab_size=128, seq_len=32, d_model=64, num_heads=4, num_layers=8)
    mesh = make_mesh(data=1, stage=4, tensor=1)
    schedule = schedules.build("1f1b", 4, num_microbatches)
    pipe = PipelinedLM(config, schedule=schedule, mesh=mesh, options=PipelineOptions(remat=remat))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pipe.abstract_params(), pipe.shardings()
    )
    tokens = jax.ShapeDtypeStruct((num_microbatches, 4, config.seq_len), jnp.int32)
    compiled = jax.jit(pipe.value_and_grad()).lower(params, tokens, tokens).compile()
    memory = compiled.memory_analysis()
    total = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
    return total, collectives(compiled.as_text()), (4, config.seq_len, config.d_model)


def test_lm_step_memory_is_flat_in_the_number_of_microbatches():
    """The embedding runs inside the pipeline: no [m, B, T, D] buffer, no activation-sized all-reduce."""
    small, _, _ = _lm_step_memory(4)
    large, found, activation = _lm_step_memory(32)
    assert large <= 1.25 * small, (small, large)
    pattern = ",".join(str(d) for d in activation)  # B,T,D in an HLO shape: an activation-sized operand
    reductions = [c for c in found if c.kind in ("all-reduce", "reduce-scatter", "all-gather")]
    assert not [c for c in reductions if pattern in c.shape], reductions
