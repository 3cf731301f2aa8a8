"""Data dependencies between actions, shared by validation, simulation and tick packing."""

from __future__ import annotations

from jpipe.schedules.ir import Action, Op, Schedule, flatten


def input_grad_action(actions: set[Action], stage: int, microbatch: int) -> Action | None:
    """The action that produces the input gradient of (stage, microbatch): its B or its I."""
    for op in (Op.B, Op.I):
        candidate = Action(stage, op, microbatch)
        if candidate in actions:
            return candidate
    return None


def dependencies(schedule: Schedule) -> dict[Action, tuple[Action, ...]]:
    """Map each action to the actions whose results it consumes (device order excluded).

    Along microbatch m's route (`Schedule.route`; by default every stage in order):
    F(s, m) needs the F of the stage before s on the route. B/I(s, m) need F(s, m) and the
    input-gradient action (B or I) of the stage after s on the route; at the route's last stage the
    B/I need only its F (the loss is computed there). W(s, m) needs I(s, m). R(s, m) (recomputation)
    needs F(s, m), and a B/I whose R is in the schedule also needs it.
    Dependencies that do not exist in the schedule, and actions of stages off their microbatch's
    route, get none (validation reports them).
    """
    present = {a for row in schedule.actions for a in flatten(row)}
    deps: dict[Action, tuple[Action, ...]] = {}
    for action in present:
        s, m = action.stage, action.microbatch
        needed: list[Action | None] = []
        if not _on_route(schedule, s, m):
            deps[action] = ()
            continue
        if action.op is Op.F:
            previous = schedule.prev_stage(s, m)
            if previous is not None:
                needed.append(Action(previous, Op.F, m))
        elif action.op is Op.R:
            needed.append(Action(s, Op.F, m))
        elif action.op in (Op.B, Op.I):
            needed.append(Action(s, Op.F, m))
            needed.append(Action(s, Op.R, m))  # dropped below when the schedule has no R
            following = schedule.next_stage(s, m)
            if following is not None:
                needed.append(input_grad_action(present, following, m))
        else:  # W
            needed.append(Action(s, Op.I, m))
        deps[action] = tuple(d for d in needed if d is not None and d in present)
    return deps


def _on_route(schedule: Schedule, stage: object, microbatch: object) -> bool:
    """Whether (stage, microbatch) is on a route, tolerating out-of-range indices (unvalidated input)."""
    if not isinstance(microbatch, int) or not 0 <= microbatch < schedule.num_microbatches:
        return False
    if schedule.routes is None:
        return isinstance(stage, int) and 0 <= stage < schedule.num_stages
    if microbatch >= len(schedule.routes):
        return False
    try:
        return schedule.on_route(stage, microbatch)
    except TypeError:
        return False
