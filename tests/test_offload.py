"""Activation offload (`jpipe.pipeline.offload`): the stash and weight stash in host memory.

On CPU the host is the device, so an offloaded program must give exactly the sequential model's
loss and every gradient (float32, 1e-5): zb_h1 and zbv under remat full, with hidden sends, braided
(cost-balanced) ticks and R. The host placement itself is checked where the TPU compiler is
installed (`tests/test_compile.py`).
"""

from __future__ import annotations

import jax
import pytest
from conftest import make_mesh_or_skip
from pipeline_cases import assert_trees_close, loss_fn, make_problem, reference_value_and_grad, stage_fn

import jpipe
from jpipe import schedules
from jpipe.pipeline.offload import CHOICES, offloaded
from jpipe.pipeline.options import PipelineOptions
from jpipe.pipeline.state import Buffer
from jpipe.schedules import Cost

PARITY = {
    "zb_h1-all-remat-full-sends": ("zb_h1", "full", "all", {"overlap_sends": True}),
    "zbv-all-balanced-recompute": ("zbv", "full", "all", {"balance_ticks": True, "recompute": True}),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_offloaded_step_matches_sequential(case):
    name, remat, offload, options = PARITY[case]
    schedule = schedules.build(name, 4, 8)
    mesh = make_mesh_or_skip((4,), ("stage",))
    stage_params, loss_params, inputs, targets = make_problem(schedule.num_stages, 8, layers=2)
    stage = jpipe.layered(stage_fn)
    cost = Cost(f=1.0, b=1.8, i=1.2, w=0.6, r=1.0)
    step = jpipe.value_and_grad(
        stage, loss_fn, schedule=schedule, mesh=mesh, remat=remat, offload=offload, cost=cost, **options
    )
    loss, grads = jax.jit(step)(stage_params, loss_params, inputs, targets)
    ref_loss, ref_grads = reference_value_and_grad(stage_params, loss_params, inputs, targets, stage)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(grads, ref_grads)


def test_choices_name_the_buffers_and_refuse_others():
    assert offloaded("none") == frozenset()
    assert offloaded("all") == {Buffer.STASH, Buffer.WEIGHT_STASH}
    assert set(CHOICES) == {"none", "stash", "weights", "all"}
    with pytest.raises(ValueError, match="offload: expected one of 'none', 'stash', 'weights', 'all', got 'host'"):
        PipelineOptions(offload="host")
