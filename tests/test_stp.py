"""STP's braided V schedule: its order, and its PP and TP bubbles against the published formulas.

Unit costs per chunk: T_F = T_B (jpipe's I) = T_W = 1, a full B = 2, T_AR = `all_reduce` at most
one compute unit (so a composite hides both all-reduces). Bubbles per device: TP =
`Simulation.exposed_all_reduce`, PP = `Simulation.pp_bubble` (makespan minus busy time).
"""

from __future__ import annotations

import pytest

from jpipe.schedules import Composite, Cost, Op, ScheduleError, build, simulate
from jpipe.schedules.ir import members

REDUCES = (0.0, 0.25, 0.5, 1.0)
SIZES = ((2, 5), (2, 8), (3, 8), (4, 11), (4, 16), (6, 24))


def unit_cost(all_reduce: float) -> Cost:
    return Cost(f=1, b=2, i=1, w=1, all_reduce=all_reduce, per="chunk")  # the formulas' per-chunk times


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_order_follows_the_reference_steps(p: int, m: int):
    schedule = build("stp", p, m)
    for r, row in enumerate(schedule.actions):
        c0, c1 = r, 2 * p - 1 - r
        braided = [step for step in row if isinstance(step, Composite)]
        kinds = [tuple(a.op.value + ("0" if a.stage == c0 else "1") for a in step.actions) for step in braided]
        assert kinds.count(("F0", "F0")) == (r + 1) // 2  # step 3
        assert kinds.count(("F0", "W1")) == p - 1 - r  # step 4
        # Steps 4-6: one forward-and-backward composite per forward of c1 after the warm-up, and
        # one per forward of c0 in step 5.
        with_backward = [k for k in kinds if k[1][0] in "BI"]
        assert len(with_backward) == (p - 1 - r) + 2 * (m - 3 * p + 1) + 1 + 2 * r + (2 * p - 2 - r)
        assert all(k[0][1] == k[1][1] for k in with_backward)  # one chunk, two microbatches
        # Forwards run alone: steps 1 and 2, and the odd one of step 3.
        alone = [step for step in row if not isinstance(step, Composite) and step.op is Op.F]
        assert len(alone) == 2 * (p - 1 - r) + 2 * (r + 1) + (r + 1) % 2
        assert row[: 2 * (p - 1 - r)] == tuple(step for step in row[: 2 * (p - 1 - r)] if step.stage == c0)
        # Every backward of device r's chunks: I with a deferred W or a full B.
        flat = schedule.flat_actions(r)
        assert sum(a.op is Op.F for a in flat) == 2 * m
        assert sum(a.op in (Op.B, Op.I) for a in flat) == 2 * m
        assert flat[-1].op in (Op.B, Op.W)
        assert c1 in {a.stage for step in braided for a in members(step)}


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_needs_m_at_least_3p_minus_1(p: int):
    build("stp", p, 3 * p - 1)
    with pytest.raises(ScheduleError, match=r"stp needs num_microbatches >= 3 \* num_devices - 1"):
        build("stp", p, 3 * p - 2)
    with pytest.raises(ScheduleError, match="stp needs virtual == 2"):
        build("stp", p, 3 * p, 1)


@pytest.mark.parametrize("all_reduce", REDUCES)
@pytest.mark.parametrize(("p", "m"), SIZES)
def test_stp_bubbles_match_the_published_formulas(p: int, m: int, all_reduce: float):
    """TP `(2p + 1) T_AR` always; PP `(p - 1)(T_F + T_AR + T_B - T_W)` for even p, one T_AR more for odd p.

    Device r runs `2p + 1` forwards alone when r is even and `2p` when odd (steps 1-3): those are
    its exposed all-reduces, the TP bubble. Every device's PP + TP bubble (makespan minus its
    6m units of work) is `(p - 1)(T_F + T_AR + T_B - T_W) + 2p T_AR`, plus one more T_AR when p
    is odd (the last device, p - 1, is then even: it runs the extra solo forward on the turn of
    the V, on the critical path). So the published PP bubble is the largest device's for even p,
    and `(p - 1)(T_F + T_AR + T_B - T_W) + T_AR` for odd p (on the odd devices).
    """
    t_f = t_b = t_w = 1.0
    simulation = simulate(build("stp", p, m), unit_cost(all_reduce), "async")
    pp_formula = (p - 1) * (t_f + all_reduce + t_b - t_w)
    tp_formula = (2 * p + 1) * all_reduce
    odd_p = p % 2
    bubble = pp_formula + (2 * p + odd_p) * all_reduce
    work = 2 * m * (t_f + t_b + t_w)
    assert simulation.makespan == pytest.approx(work + bubble, abs=1e-9)
    for r in range(p):
        even = r % 2 == 0
        assert simulation.exposed_all_reduce[r] == pytest.approx((2 * p + even) * all_reduce, abs=1e-9)
        assert simulation.pp_bubble[r] == pytest.approx(bubble - (2 * p + even) * all_reduce, abs=1e-9)
    assert max(simulation.exposed_all_reduce) == pytest.approx(tp_formula, abs=1e-9)
    assert max(simulation.pp_bubble) == pytest.approx(pp_formula + odd_p * all_reduce, abs=1e-9)


@pytest.mark.parametrize("all_reduce", REDUCES)
@pytest.mark.parametrize(("p", "m"), [(2, 5), (2, 8), (3, 8), (4, 11), (4, 16), (6, 24)])
def test_zbv_bubbles_against_the_published_formulas(p: int, m: int, all_reduce: float):
    """ZB-V: TP `4m T_AR` holds (every F and I alone); PP is `(p - 1)(T_F + T_AR)` at unit costs.

    STP's table gives ZB-V's PP bubble as `(p - 1)(T_F + 2 T_AR + T_B - 2 T_W)`, i.e.
    `2(p - 1) T_AR` at unit costs; jpipe's zbv idles `(p - 1)(T_F + T_AR)` on every device (at
    T_AR = 0 the `(p - 1) T_F` fill that no V schedule avoids, see `zbv`'s makespan
    `6mt + (p - 1)t`). The two agree only at T_AR = T_F.
    """
    simulation = simulate(build("zbv", p, m), unit_cost(all_reduce), "async")
    for r in range(p):
        assert simulation.exposed_all_reduce[r] == pytest.approx(4 * m * all_reduce, abs=1e-9)
        assert simulation.pp_bubble[r] == pytest.approx((p - 1) * (1.0 + all_reduce), abs=1e-9)
    paper = (p - 1) * (1.0 + 2 * all_reduce + 1.0 - 2 * 1.0)
    assert (max(simulation.pp_bubble) == pytest.approx(paper, abs=1e-9)) == (all_reduce == 1.0)


@pytest.mark.parametrize(("p", "m"), [(2, 8), (4, 16)])
def test_stp_beats_zbv_by_the_hidden_all_reduces(p: int, m: int):
    cost = unit_cost(0.5)
    stp = simulate(build("stp", p, m), cost, "async")
    zbv = simulate(build("zbv", p, m), cost, "async")
    # Same work 6m and PP fill (p - 1)(T_F + T_AR) per device (even p); zbv exposes 4m T_AR, stp 2p.
    assert zbv.makespan - stp.makespan == pytest.approx((4 * m - 2 * p) * 0.5, abs=1e-9)
    # Flattened (what the executor runs today) every forward and input gradient waits for its all-reduce.
    flat = simulate(build("stp", p, m), cost, "async", braid=False)
    schedule = build("stp", p, m)
    for r in range(p):
        exposed = sum(a.op in (Op.F, Op.I) for a in schedule.flat_actions(r)) * 0.5
        assert flat.exposed_all_reduce[r] == pytest.approx(exposed, abs=1e-9)
    assert flat.makespan > stp.makespan


def test_stp_lockstep_numbers_at_p4_m16():
    """Lockstep ticks cost their slowest device: a braided F&B tick (3) beside single ops."""
    schedule = build("stp", 4, 16)
    cost = unit_cost(0.5)
    whole = simulate(schedule, cost, "lockstep", split_backward=False)
    split = simulate(schedule, cost, "lockstep")
    asynchronous = simulate(schedule, cost, "async")
    assert asynchronous.makespan == pytest.approx(104.5, abs=1e-9)
    assert whole.makespan == pytest.approx(110.5, abs=1e-9)
    assert split.makespan == pytest.approx(137.0, abs=1e-9)


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_stp_peak_chunk_activations(p: int, m: int):
    """Device r holds max(3p + 1, 3p + r) chunk activations (the published peak is 3p)."""
    peaks = simulate(build("stp", p, m)).peak_activations  # in full-device units: 2 chunks
    assert [2 * peak for peak in peaks] == [max(3 * p + 1, 3 * p + r) for r in range(p)]


def test_forward_runs_a_schedule_with_composites():
    """`jpipe.forward` keeps the forwards of composites too (in their flattened order)."""
    jax = pytest.importorskip("jax")
    from conftest import make_mesh_or_skip
    from pipeline_cases import assert_trees_close, make_problem, sequential_outputs, stage_fn

    import jpipe

    schedule = build("stp", 2, 5)
    mesh = make_mesh_or_skip((2,), ("stage",))
    stage_params, _, inputs, _ = make_problem(schedule.num_stages, schedule.num_microbatches)
    outputs = jax.jit(jpipe.forward(stage_fn, schedule=schedule, mesh=mesh))(stage_params, inputs)
    assert_trees_close(outputs, sequential_outputs(stage_params, inputs))
