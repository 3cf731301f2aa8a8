"""The executor's options, declared once (`PipelineOptions`), and their plan ("auto" resolved once)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from conftest import make_mesh_or_skip
from pipeline_cases import loss_fn, stage_fn

import jpipe
from jpipe import schedules
from jpipe.pipeline import PipelineOptions
from jpipe.train.presets import preset


def test_the_options_defaults_are_value_and_grads():
    parameters = inspect.signature(jpipe.value_and_grad).parameters
    for field in dataclasses.fields(PipelineOptions):
        assert parameters[field.name].default == field.default, field.name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"split_backward": "yes"}, r"split_backward: expected True, False or 'auto', got 'yes'"),
        ({"overlap_sends": 1}, r"overlap_sends: expected True, False or 'auto', got 1"),
        ({"braid": "auto"}, r"braid: expected True or False, got 'auto'"),
    ],
)
def test_bad_options_are_refused_when_made(changes, message):
    with pytest.raises(ValueError, match=message):
        PipelineOptions(**changes)


def test_the_plan_resolves_auto_with_the_simulator_and_keeps_explicit_choices():
    schedule = schedules.build("1f1b", 4, 8)
    free_sends = PipelineOptions().plan(schedule)
    assert free_sends.split == schedules.best_split(schedule, None)
    assert not free_sends.overlap  # sends that cost nothing are not worth the extra ticks
    assert PipelineOptions(cost=schedules.Cost(comm=0.5)).plan(schedule).overlap  # sends under compute
    explicit = PipelineOptions(split_backward=False, overlap_sends=True).plan(schedule)
    assert (explicit.split, explicit.overlap) == (False, True)
    assert explicit.describe() == "backward whole, sends overlapped"
    assert "(auto)" in free_sends.describe()


def test_the_step_carries_the_plan_it_runs():
    schedule = schedules.build("zbv", 2, 4, 2)
    mesh = make_mesh_or_skip((2,), ("stage",))
    step = jpipe.value_and_grad(stage_fn, loss_fn, schedule=schedule, mesh=mesh, overlap_sends=True)
    assert step.plan == PipelineOptions(overlap_sends=True).plan(schedule)
    assert step.program.send_latency == 1 and step.plan.overlap


def test_the_training_config_builds_the_options_from_its_fields():
    parallel = dataclasses.replace(preset("tiny").parallel, remat="full", split_backward=True, overlap_sends=False)
    assert parallel.pipeline_options() == PipelineOptions(remat="full", split_backward=True, overlap_sends=False)
