"""Two-stream schedules for hidden sends (`build(..., send_latency=1)`, `jpipe.schedules.streams`)."""

from __future__ import annotations

import pytest

from jpipe.schedules import SCHEDULES, Cost, ScheduleError, build, default_virtual, simulate, validate
from jpipe.schedules.simulate import peak_activations
from jpipe.schedules.streams import two_streams


def _cases():
    for name in sorted(SCHEDULES):
        for p in (2, 4):
            for m in (1, 3, 2 * p, 4 * p + 1):
                yield pytest.param(name, p, m, id=f"{name}-p{p}-m{m}")


@pytest.mark.parametrize(("name", "p", "m"), list(_cases()))
def test_two_streams_are_valid_and_never_slower_with_a_send_latency(name, p, m):
    virtual = default_virtual(name)
    try:
        plain = build(name, p, m, virtual)
    except ScheduleError:
        return  # a combination the schedule does not support (tested in test_generators)
    chosen = build(name, p, m, virtual, send_latency=1)
    validate(chosen)
    assert (chosen.num_microbatches, chosen.placement) == (m, plain.placement)
    assert chosen.name in (name, f"{name}[2 streams]")
    hidden = simulate(chosen, mode="lockstep", send_latency=1).makespan
    assert hidden <= simulate(plain, mode="lockstep", send_latency=1).makespan
    if m >= 2 and chosen.name == name:
        # Kept the named order: the two streams (when buildable) were not faster.
        try:
            streamed = two_streams(lambda n: build(name, p, n, virtual), m)
        except ScheduleError:
            return
        assert simulate(streamed, mode="lockstep", send_latency=1).makespan >= hidden


def test_two_streams_interleave_even_and_odd_microbatches_tick_by_tick():
    streamed = two_streams(lambda n: build("1f1b", 2, n), 4)
    assert streamed.name == "1f1b[2 streams]"
    # Device 0 starts both streams before the first backward: F0 (stream A), F1 (stream B), ...
    assert [str(a) for a in streamed.actions[0][:4]] == ["0F0", "0F1", "0F2", "0F3"]
    # Each device holds both streams' in-flight microbatches.
    assert peak_activations(streamed) == (4.0, 2.0)  # 1f1b alone at m = 4: (2, 1)


@pytest.mark.parametrize(("name", "virtual", "bound"), [("zbv", 2, 102), ("zb_h1", 1, 54)])
def test_one_tick_latency_costs_only_the_longer_fill_for_zbv_and_zb_h1(name, virtual, bound):
    """p = 4, m = 16, unit costs per chunk: the last device cannot start before (p - 1) hops of 2 ticks."""
    unit = Cost(per="chunk")
    plain = simulate(build(name, 4, 16, virtual), unit, mode="lockstep").makespan
    hidden = simulate(build(name, 4, 16, virtual, send_latency=1), unit, mode="lockstep", send_latency=1).makespan
    assert hidden == bound  # the lower bound: (p - 1) x 2 ticks of fill, then the busiest device's work
    assert (plain, hidden / plain) == ({"zbv": 99, "zb_h1": 51}[name], bound / plain)
    if name == "zbv":
        assert hidden / plain <= 1.05


def test_send_latency_must_be_zero_or_one():
    with pytest.raises(ScheduleError, match="send_latency must be 0 or 1, got 2"):
        build("1f1b", 2, 4, send_latency=2)


@pytest.mark.parametrize("name", ["1f1b", "zb_h1", "zbv", "interleaved_1f1b"])
def test_a_streams_memory_limit_keeps_the_named_order_unless_two_streams_fit(name):
    free = build(name, 4, 8, send_latency=1)
    assert free.name == f"{name}[2 streams]"  # faster with the extra tick of latency...
    assert max(peak_activations(free)) > 1.25 * max(peak_activations(build(name, 4, 8)))  # ...at a memory cost
    assert build(name, 4, 8, send_latency=1, streams_memory_limit=1.25).name == name
    assert build(name, 4, 8, send_latency=1, streams_memory_limit=3.0).name == f"{name}[2 streams]"
    with pytest.raises(ScheduleError, match="streams_memory_limit"):
        build(name, 4, 8, send_latency=1, streams_memory_limit=0)


def test_training_builds_hidden_sends_within_its_two_stream_memory():
    from jpipe.train.config import ConfigError, ParallelConfig

    assert ParallelConfig().two_stream_memory == 1.25
    with pytest.raises(ConfigError, match="two_stream_memory"):
        ParallelConfig(two_stream_memory=0)
