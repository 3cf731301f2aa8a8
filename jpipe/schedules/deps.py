"""Data dependencies between actions, shared by validation, simulation and tick packing."""

from __future__ import annotations

from jpipe.schedules.ir import Action, Op, Schedule


def input_grad_action(actions: set[Action], stage: int, microbatch: int) -> Action | None:
    """The action that produces the input gradient of (stage, microbatch): its B or its I."""
    for op in (Op.B, Op.I):
        candidate = Action(stage, op, microbatch)
        if candidate in actions:
            return candidate
    return None


def dependencies(schedule: Schedule) -> dict[Action, tuple[Action, ...]]:
    """Map each action to the actions whose results it consumes (device order excluded).

    F(s, m) needs F(s-1, m). B/I(s, m) need F(s, m) and the input-gradient action (B or I) of
    (s+1, m); the last stage's B/I need only its F (the loss is computed there). W(s, m) needs I(s, m).
    Dependencies that do not exist in the schedule are left out (validation reports them).
    """
    present = {a for row in schedule.actions for a in row}
    last = schedule.num_stages - 1
    deps: dict[Action, tuple[Action, ...]] = {}
    for action in present:
        s, m = action.stage, action.microbatch
        needed: list[Action | None] = []
        if action.op is Op.F:
            if s > 0:
                needed.append(Action(s - 1, Op.F, m))
        elif action.op in (Op.B, Op.I):
            needed.append(Action(s, Op.F, m))
            if s < last:
                needed.append(input_grad_action(present, s + 1, m))
        else:  # W
            needed.append(Action(s, Op.I, m))
        deps[action] = tuple(d for d in needed if d is not None and d in present)
    return deps
