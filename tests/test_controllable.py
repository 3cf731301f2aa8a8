"""V-Half and V-Min (controllable-memory V schedules): validity, the authors' peak memory, the bubble
against 1F1B, the executor's buffers and the search.

Memory unit: microbatches x full device stage, as `Simulation.peak_activations` counts it (one
chunk-microbatch stash, what one F of one chunk keeps, is 1/2: two chunks per device). A stash lives
from its F to its W, so the inputs the weight gradient needs are in it; the weight residuals an I
keeps for its W on top of that (`Cost.weight_residuals`) are not counted: the authors count the same
(their `mem_of_stage`: +1 at F, -1 at W). Times: F = I = W = 1 per chunk (the paper's setting),
against 1F1B on the same model (F = 2, B = 4 per full stage).
"""

from __future__ import annotations

import pytest

from jpipe.pipeline.program import compile_program
from jpipe.schedules import SCHEDULES, Cost, Op, build, search_result, simulate, v_placement
from jpipe.schedules.controllable import PERIOD, authors_peak, v_half_block, v_min_block

NAMES = ("v_half", "v_min")
CHUNK = Cost(f=1.0, b=2.0, i=1.0, w=1.0)
STAGE = Cost(f=2.0, b=4.0, i=2.0, w=2.0)  # 1F1B's full stage: two chunks


def _cost(virtual: int) -> Cost:
    return CHUNK if virtual == 2 else STAGE


def test_registered_with_two_chunks_on_the_v_placement():
    assert set(NAMES) <= set(SCHEDULES)
    with pytest.raises(ValueError, match="virtual"):
        build("v_half", 4, 8, 1)


@pytest.mark.parametrize("name", NAMES)
def test_every_p_and_m_builds_a_valid_split_schedule(name):
    for p in (1, 2, 3, 4, 5, 6, 8):
        for m in range(1, 25):
            schedule = build(name, p, m)  # validates
            assert schedule.placement == v_placement(p)
            assert {a.op for row in schedule.actions for a in row} == {Op.F, Op.I, Op.W}


@pytest.mark.parametrize("block", [v_half_block, v_min_block])
def test_blocks_give_each_device_four_distinct_slots_modulo_the_period(block):
    for p in range(1, 13):
        for slots in block(p):
            assert len({slot % PERIOD for slot in slots}) == 4, (p, slots)


@pytest.mark.parametrize("p", [4, 8])
@pytest.mark.parametrize("name", NAMES)
def test_simulated_peak_is_the_authors_formula(name, p):
    """V-Min (p + 4) // 3, V-Half (p + 2) // 2 microbatches x full stage, once m fills the pipeline;
    the acceptance asks for 10%, the count is exact."""
    for m in (2 * p, 4 * p, 8 * p):
        peaks = simulate(build(name, p, m), CHUNK).peak_activations
        assert max(peaks) == authors_peak(name, p)
        assert max(simulate(build(name, p, m), CHUNK).peak_memory) == max(peaks)  # no weight residuals


@pytest.mark.parametrize("name", NAMES)
def test_peak_tends_to_its_share_of_1f1b(name):
    """Exact for every p up to 16; 1F1B holds p, so the ratio goes to 1/2 (V-Half) and 1/3 (V-Min)."""
    for p in range(2, 17):
        assert max(simulate(build(name, p, 4 * p), CHUNK).peak_activations) == authors_peak(name, p)
        assert max(simulate(build("1f1b", p, 4 * p), STAGE).peak_activations) == p
    share = {"v_half": 1 / 2, "v_min": 1 / 3}[name]
    assert authors_peak(name, 64) / 64 == pytest.approx(share, abs=0.04)


@pytest.mark.parametrize("p", [4, 8])
@pytest.mark.parametrize("name", NAMES)
def test_executor_buffers_hold_the_authors_peak(name, p):
    """The executor's stash buffer (`compile_program`'s slots, one chunk-microbatch stash each) is
    twice the full-stage peak; the weight stash (I to W) adds at most 2 slots."""
    program = compile_program(build(name, p, 4 * p), split=True)
    assert program.num_stash_slots == 2 * authors_peak(name, p)
    assert 1 <= program.num_weight_slots <= 2


@pytest.mark.parametrize("name", NAMES)
def test_bubble_is_under_1f1bs(name):
    """Async (every action as soon as its inputs are there): never slower than 1F1B; from p = 3 and
    m >= 2p at most 3/4 (V-Half) and 4/5 (V-Min) of its bubble (the authors: 1/2, and 2/3 plus a
    constant for V-Min). Lockstep (the executor's ticks, which do not squeeze the block): at most one
    chunk pass over 1F1B's makespan."""
    share = {"v_half": 0.75, "v_min": 0.8}[name]
    for p in (2, 3, 4, 6, 8):
        for m in (p, 2 * p, 4 * p, 8 * p):
            base = simulate(build("1f1b", p, m), STAGE)
            sim = simulate(build(name, p, m), CHUNK)
            assert sim.makespan <= base.makespan
            if p >= 3 and m >= 2 * p:
                assert sim.bubble_fraction <= share * base.bubble_fraction, (p, m)
            locked = simulate(build(name, p, m), CHUNK, "lockstep").makespan
            assert locked <= simulate(build("1f1b", p, m), STAGE, "lockstep").makespan + CHUNK.f, (p, m)


def test_search_considers_them_under_a_tight_memory_limit():
    """p = 4: at 2 full stages only V-Min (and the serial naive order) fit, so V-Min is the baseline."""
    result = search_result(4, 8, _cost, memory_limit=2.0, virtual=2, budget=200)
    named = {n.schedule.name: n.memory for n in result.named}
    assert named["v_min"] == 2.0 and named["v_half"] == 3.0
    assert result.baseline.name == "v_min"
    assert result.makespan <= result.baseline_makespan


@pytest.mark.parametrize("name", NAMES)
def test_training_cli_runs_them_with_two_chunks(name):
    from jpipe.train import cli

    config = cli.build_config(cli.parser().parse_args(["--preset", "tiny", "--schedule", name]))
    assert (config.parallel.schedule, config.parallel.virtual) == (name, 2)
