"""Schedules built from braided steps (composites): STP (Qi et al. 2025) and the overlapped 1F1B
(Megatron-Core's combined 1F1B).

A braided step (`jpipe.schedules.ir.Composite`) runs two actions of different microbatches on one
device together, so that each one's tensor-parallel all-reduce or expert-parallel all-to-all runs
under the other's compute (`jpipe.schedules.simulate.Cost.duration`). The executor runs both in one
tick (`jpipe.value_and_grad(..., braid=True)`, the default), or one after the other with
`braid=False`.

Notation: `p` devices, `m` microbatches, device `r` with chunks `c0 = r` and `c1 = 2p - 1 - r`
(V placement); F, B, I, W as everywhere in jpipe (STP's T_B is jpipe's I, its T_W jpipe's W).
"""

from __future__ import annotations

from collections import deque

from jpipe.schedules.generators import _require_virtual, _schedule, register
from jpipe.schedules.ir import Action, Cell, Composite, Op, Schedule, ScheduleError, loop_placement, v_placement


@register("1f1b_overlap", composite=True)
def one_f_one_b_overlap(num_devices: int, num_microbatches: int, virtual: int = 1) -> Schedule:
    """1F1B whose steady-state forward and backward run as one braided step, as Megatron-Core's
    "combined 1F1B" (`--overlap-moe-expert-parallel-comm --delay-wgrad-compute`) pairs them to
    hide each one's expert-parallel all-to-all under the other's compute. Loop placement, virtual 1.

    Device r runs `w = min(m, 2(p - r) - 1)` forwards, then `m - w` composites `(F(w + k); B(k))`,
    then the `w` backwards left. Any p, m >= 1 (no pairs on device r when `m <= w`).

    Why the warm-up is ZB-H2's and not 1F1B's `p - 1 - r`: a braided step's results are ready only
    when it ends, so a forward in a pair reaches the next device one pair later, and so does a
    backward going the other way. With 1F1B's warm-up (or one more forward, the least that keeps
    the last device from pairing F(k) with its own B(k)) each pair waits for the pair of the same
    step on the next device, which waits for this device's previous pair: the steady state takes
    two pairs per microbatch (simulated 1.7-1.8x 1F1B's makespan at p = 4-8, m = 4p, no
    collectives). `2(p - r) - 1` forwards is the least warm-up at which every pair's inputs arrived
    a pair earlier. The price is memory: device r holds up to `2(p - r)` microbatches during a
    pair (`peak_activations`: 2p on device 0, twice 1F1B's p). This warm-up is derived from jpipe's
    model of a braided step; Megatron-Core's own warm-up count was not checked against it. With the
    split backward (`split_backward=True`) a pair keeps the I and its W runs after it, which is
    what `--delay-wgrad-compute` does.

    Simulated (async; F = 1, B = 2, I = W = 1 per device stage, an all-to-all of `a <= F` per F and
    per backward, `Cost.all_to_all`; `tests/test_moe_simulate.py`), for m >= 2p - 1: makespan
    `(m + p - 1)(F + B) + 2pa` against 1F1B's `(m + p - 1)(F + B + 2a)`: the all-to-alls of the
    steady pairs are hidden, the fill's and drain's are not. Without collectives (a = 0) it equals
    1F1B's; in lockstep ticks with whole backwards it is shorter (p = 4, m = 16: 57 against 72;
    1F1B with the split backward, one op per tick: 54).
    """
    _require_virtual("1f1b_overlap", virtual, 1)
    p, m = num_devices, num_microbatches
    rows = [_overlapped_one_f_one_b(d, min(m, 2 * (p - d) - 1), m) for d in range(p)]
    return _schedule("1f1b_overlap", p, m, loop_placement(p, 1), rows)


def _overlapped_one_f_one_b(stage: int, warmup: int, m: int) -> list[Cell]:
    """`warmup` forwards, then `(F(warmup + k); B(k))` while forwards are left, then the backwards."""
    row: list[Cell] = [Action(stage, Op.F, mb) for mb in range(warmup)]
    row += [Composite(Action(stage, Op.F, warmup + k), Action(stage, Op.B, k)) for k in range(m - warmup)]
    return row + [Action(stage, Op.B, mb) for mb in range(m - warmup, m)]


@register("stp", composite=True)
def stp(num_devices: int, num_microbatches: int, virtual: int = 2) -> Schedule:
    """STP's synergistic V schedule (Qi et al. 2025, "Synergistic Tensor and Pipeline Parallelism",
    arXiv 2510.27257; MICLAB-BUPT/STP, `STPSchedule.generate`), V placement; needs `m >= 3p - 1`.

    Device r's order, read from the reference's nine steps (STP's instructions in brackets;
    `(X; Y)` is a composite, "split" means the backward runs as I with its W deferred to a queue,
    "W" pops the oldest deferred W):
      1. `2(p - 1 - r)` forwards of c0;
      2. r + 1 pairs `F(c0), F(c1)`;
      3. r + 1 forwards of c0: a single one when r + 1 is odd, then composites `(F(c0); F(c0))` of
         two consecutive microbatches [ForwardAndForward];
      4. p - 1 - r rounds `(F(c1); I(c1))` [ForwardAndBackward, split], `(F(c0); W)`
         [ForwardAndWeight];
      5. `2(m - 3p + 1) + 1 + 2r` composites `(F(c); B(c))` with c = c1, c0, c1, ... (the forward
         and backward of one chunk on different microbatches), the last r of them split;
      6. `2p - 2 - r` rounds `B(c0)`, `(F(c1); I(c1))` (split);
      7. r + 1 pairs `B(c0), B(c1)`;
      8. `B(c0)`, then p - 1 - r times `W, W, B(c0)`;
      9. the 2r W's left.
    The reference asserts `m >= 2p` only, but its step counts need `m >= 3p - 1` (step 5 is
    empty, and step 6's count wrong, below that on device 0). Its trainer runs the two forwards of
    a ForwardAndForward one after the other (no braiding flag), the other composites braided.

    Published bubbles (README and paper, per-chunk times, T_AR the TP all-reduce time of one
    chunk pass): PP `(p - 1)(T_F + T_AR + T_B - T_W)`, TP `(2p + 1) T_AR`; peak activations `3p`
    chunk activations. Simulated (async, T_F = T_B = T_W = 1, B = 2, T_AR <= 1; `tests/test_stp.py`):
    device r's TP bubble is `(2p + 1) T_AR` for even r (its solo forwards) and `2p T_AR` for odd r;
    its PP bubble is the published one for even p (largest on odd r) and one T_AR more for odd p;
    the makespan is `6m + (p - 1)(T_F + T_AR + T_B - T_W) + 2p T_AR` (+ T_AR for odd p). Peak:
    device r holds `max(3p + 1, 3p + r)` chunk activations (up to `4p - 1` on the last device;
    twice `peak_activations`), counting, as jpipe does, an I's activations as live until its W and
    a composite's members one after the other (`tests/test_stp.py`).
    """
    _require_virtual("stp", virtual, 2)
    p, m = num_devices, num_microbatches
    if m < 3 * p - 1:
        raise ScheduleError(
            f"stp needs num_microbatches >= 3 * num_devices - 1 = {3 * p - 1} (STP's step counts), "
            f"got num_microbatches={m}"
        )
    last = 2 * p - 1
    rows = [_stp_order(p, m, r, r, last - r) for r in range(p)]
    return _schedule("stp", p, m, v_placement(p), rows)


def _stp_order(p: int, m: int, r: int, c0: int, c1: int) -> list[Cell]:
    """Device r's steps (see `stp`)."""
    next_forward = {c0: 0, c1: 0}
    next_backward = {c0: 0, c1: 0}
    deferred: deque[Action] = deque()
    row: list[Cell] = []

    def forward(stage: int) -> Action:
        action = Action(stage, Op.F, next_forward[stage])
        next_forward[stage] += 1
        return action

    def backward(stage: int, split: bool = False) -> Action:
        mb = next_backward[stage]
        next_backward[stage] += 1
        if not split:
            return Action(stage, Op.B, mb)
        deferred.append(Action(stage, Op.W, mb))
        return Action(stage, Op.I, mb)

    row += [forward(c0) for _ in range(2 * (p - 1 - r))]  # 1
    for _ in range(r + 1):  # 2
        row += [forward(c0), forward(c1)]
    if (r + 1) % 2 == 1:  # 3
        row.append(forward(c0))
    for _ in range((r + 1) // 2):
        row.append(Composite(forward(c0), forward(c0)))
    for _ in range(p - 1 - r):  # 4
        row.append(Composite(forward(c1), backward(c1, split=True)))
        row.append(Composite(forward(c0), deferred.popleft()))
    steady = 2 * (m - 3 * p + 1) + 1 + 2 * r  # 5
    for index in range(steady):
        chunk = c1 if index % 2 == 0 else c0
        row.append(Composite(forward(chunk), backward(chunk, split=index >= steady - r)))
    for _ in range(2 * p - 2 - r):  # 6
        row.append(backward(c0))
        row.append(Composite(forward(c1), backward(c1, split=True)))
    for _ in range(r + 1):  # 7
        row += [backward(c0), backward(c1)]
    row.append(backward(c0))  # 8
    for _ in range(p - 1 - r):
        row += [deferred.popleft(), deferred.popleft(), backward(c0)]
    row += list(deferred)  # 9
    return row
