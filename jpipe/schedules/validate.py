"""Schedule validation, stricter than torch.pipelining's: every error names the action and device.

`validate(schedule)` checks, in this order:
  1. shape: `num_devices >= 1`, one action row per device, `num_microbatches >= 1`;
  2. placement: its length is a non-zero multiple of `num_devices`, every device index is in range and
     every device holds the same number of stages (`virtual`);
  3. model stages and routes (when given): `model_stage` has one entry per logical stage, numbers
     the model stages 0..K-1 without gaps, and puts no two replicas of a model stage on one device;
     `routes` has one non-empty route per microbatch, each a tuple of distinct logical stages in
     range that visits no model stage twice;
  4. actions: each row element is an `Action` or a `Composite`; every action (composite members
     included) has its stage and microbatch in range, is on the device that holds its stage, on its
     microbatch's route, and appears once. A composite's two members are `Action`s of different
     microbatches, both of stages on the device whose row holds it. Every data dependency
     (`jpipe.schedules.deps.dependencies`) links two actions of one microbatch, so members of
     different microbatches never need each other's result, directly or through other actions:
     the rule is what makes running them together possible;
  5. completeness: every (stage, microbatch) on the microbatch's route has one F and either one B
     or one I and one W; and one R (recomputation) in every pair or in none;
  6. local order: on each device an action comes after the actions it needs that live on the same
     device (F before its I/B, I before its W, F of the previous hop before F of the next one when
     both are on the device, as at the turn of a V placement, ...); a composite's members count at
     the composite's position;
  7. cross-device order: running every device's list in order, with each action (a composite: both
     members at once) waiting for the actions it consumes (`jpipe.schedules.deps.dependencies`),
     finishes; otherwise the message lists the blocked head of every unfinished device and what it
     waits for.
"""

from __future__ import annotations

from collections import defaultdict, deque

from jpipe.schedules.deps import dependencies
from jpipe.schedules.ir import Action, Composite, Op, Schedule, ScheduleError, format_route, members


def validate(schedule: Schedule) -> None:
    """Raise `ScheduleError` (naming the offending action and device) unless `schedule` can run.

    Args:
      schedule: the schedule to check.
    """
    validated_dependencies(schedule)


def validated_dependencies(schedule: Schedule) -> dict[Action, tuple[Action, ...]]:
    """`validate(schedule)`, then return `dependencies(schedule)` (computed once, for the simulator)."""
    _check_shape(schedule)
    _check_placement(schedule)
    _check_model_stages(schedule)
    _check_routes(schedule)
    positions = _check_actions(schedule)
    _check_complete(schedule, positions)
    deps = dependencies(schedule)
    _check_local_order(schedule, positions, deps)
    _check_progress(schedule, deps)
    return deps


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shape(schedule: Schedule) -> None:
    if not _is_int(schedule.num_devices) or schedule.num_devices < 1:
        raise ScheduleError(f"num_devices must be an int >= 1, got {schedule.num_devices!r}")
    if not _is_int(schedule.num_microbatches) or schedule.num_microbatches < 1:
        raise ScheduleError(f"num_microbatches must be an int >= 1, got {schedule.num_microbatches!r}")
    if len(schedule.actions) != schedule.num_devices:
        raise ScheduleError(
            f"actions has {len(schedule.actions)} rows, expected one per device (num_devices={schedule.num_devices})"
        )


def _check_placement(schedule: Schedule) -> None:
    p = schedule.num_devices
    num_stages = len(schedule.placement)
    if num_stages == 0 or num_stages % p != 0:
        raise ScheduleError(f"placement has {num_stages} stages, which is not a non-zero multiple of num_devices={p}")
    for stage, device in enumerate(schedule.placement):
        if not 0 <= device < p:
            raise ScheduleError(f"placement[{stage}] = {device}: device out of range [0, {p})")
    held = defaultdict(list)
    for stage, device in enumerate(schedule.placement):
        held[device].append(stage)
    virtual = num_stages // p
    for device in range(p):
        if len(held[device]) != virtual:
            raise ScheduleError(
                f"device {device} holds {len(held[device])} stages {held[device]}, expected {virtual} "
                f"(every device holds num_stages / num_devices = {num_stages} / {p})"
            )


def _check_model_stages(schedule: Schedule) -> None:
    model_stage = schedule.model_stage
    if model_stage is None:
        return
    num_stages = schedule.num_stages
    if not isinstance(model_stage, tuple) or len(model_stage) != num_stages:
        length = len(model_stage) if isinstance(model_stage, tuple) else model_stage
        raise ScheduleError(
            f"model_stage must be a tuple with one model stage per logical stage ({num_stages}), got {length!r}"
        )
    for stage, part in enumerate(model_stage):
        if not _is_int(part) or part < 0:
            raise ScheduleError(f"model_stage[{stage}] = {part!r}: expected an int >= 0")
    count = max(model_stage) + 1
    missing = sorted(set(range(count)) - set(model_stage))
    if missing:
        raise ScheduleError(
            f"model_stage numbers model stages up to {count - 1} but no logical stage computes {missing} "
            f"(model stages must be numbered 0..K-1 without gaps)"
        )
    home: dict[tuple[int, int], int] = {}
    for stage, part in enumerate(model_stage):
        device = schedule.placement[stage]
        if (part, device) in home:
            raise ScheduleError(
                f"stages {home[part, device]} and {stage} are replicas of model stage {part} on the same "
                f"device {device} (replicas must live on different devices)"
            )
        home[part, device] = stage


def _check_routes(schedule: Schedule) -> None:
    routes = schedule.routes
    if routes is None:
        return
    m, num_stages = schedule.num_microbatches, schedule.num_stages
    if not isinstance(routes, tuple) or len(routes) != m:
        length = len(routes) if isinstance(routes, tuple) else routes
        raise ScheduleError(f"routes must be a tuple with one route per microbatch ({m}), got {length!r}")
    for mb, route in enumerate(routes):
        if not isinstance(route, tuple):
            raise ScheduleError(f"route of microbatch {mb}: expected a tuple of logical stages, got {route!r}")
        if not route:
            raise ScheduleError(f"route of microbatch {mb} is empty: a microbatch visits at least one stage")
        seen: dict[int, int] = {}  # model stage -> the stage of the route computing it
        for hop, stage in enumerate(route):
            if not _is_int(stage) or not 0 <= stage < num_stages:
                raise ScheduleError(
                    f"route of microbatch {mb}, hop {hop}: stage {stage!r} out of range [0, {num_stages})"
                )
            part = schedule.model_stage_of(stage)
            if part in seen:
                if seen[part] == stage:
                    raise ScheduleError(f"route of microbatch {mb} visits stage {stage} twice")
                raise ScheduleError(
                    f"route of microbatch {mb} visits model stage {part} twice (stages {seen[part]} and {stage})"
                )
            seen[part] = stage


def _check_actions(schedule: Schedule) -> dict[Action, tuple[int, int]]:
    """Check types, ranges, placement, composites and duplicates; return each action's (device, position).

    A composite's members both get the composite's position in its row.
    """
    num_stages, m = schedule.num_stages, schedule.num_microbatches
    positions: dict[Action, tuple[int, int]] = {}
    for device, row in enumerate(schedule.actions):
        for position, step in enumerate(row):
            if isinstance(step, Composite):
                _check_composite(schedule, device, position, step)
            elif not _is_action(step):
                raise ScheduleError(
                    f"device {device}, position {position}: expected an Action, got {step!r} "
                    f"(a row holds Actions and Composites of two)"
                )
            for action in members(step):
                if not _is_int(action.stage) or not 0 <= action.stage < num_stages:
                    raise ScheduleError(
                        f"action {action} on device {device}: stage {action.stage} out of range [0, {num_stages})"
                    )
                if not _is_int(action.microbatch) or not 0 <= action.microbatch < m:
                    raise ScheduleError(
                        f"action {action} on device {device}: microbatch {action.microbatch} out of range [0, {m})"
                    )
                home = schedule.placement[action.stage]
                if home != device:
                    where = f" (in composite {step})" if isinstance(step, Composite) else ""
                    raise ScheduleError(
                        f"action {action}{where} is on device {device}, but stage {action.stage} is placed on "
                        f"device {home} (a stage cannot run on two devices)"
                    )
                if not schedule.on_route(action.stage, action.microbatch):
                    route = format_route(schedule.route(action.microbatch))
                    raise ScheduleError(
                        f"action {action} on device {device}: stage {action.stage} is not on microbatch "
                        f"{action.microbatch}'s route ({route})"
                    )
                if action in positions:
                    first_device, first_position = positions[action]
                    raise ScheduleError(
                        f"duplicate action {action} on device {device}: positions {first_position} and {position}"
                    )
                positions[action] = (device, position)
    return positions


def _is_action(value: object) -> bool:
    return isinstance(value, Action) and isinstance(value.op, Op)


def _check_composite(schedule: Schedule, device: int, position: int, step: Composite) -> None:
    """A composite holds two actions of different microbatches (ranges and placement are checked after)."""
    for member in (step.first, step.second):
        if not _is_action(member):
            raise ScheduleError(
                f"composite on device {device}, position {position}: members must be Actions, got {member!r}"
            )
    if step.first.microbatch == step.second.microbatch:
        raise ScheduleError(
            f"composite {step} on device {device}, position {position}: both members are microbatch "
            f"{step.first.microbatch}; a composite runs two actions of different microbatches together "
            f"(actions of one microbatch may depend on each other)"
        )


def _check_complete(schedule: Schedule, positions: dict[Action, tuple[int, int]]) -> None:
    recomputes = any(action.op is Op.R for action in positions)
    for stage in range(schedule.num_stages):
        device = schedule.placement[stage]
        for mb in range(schedule.num_microbatches):
            if not schedule.on_route(stage, mb):
                continue
            forward, full, grad_input, grad_weight = (Action(stage, op, mb) for op in (Op.F, Op.B, Op.I, Op.W))
            if forward not in positions:
                raise ScheduleError(
                    f"missing action {forward} on device {device}: stage {stage} microbatch {mb} has no forward"
                )
            recompute = Action(stage, Op.R, mb)
            if recomputes and recompute not in positions:
                raise ScheduleError(
                    f"missing action {recompute} on device {device}: the schedule recomputes forwards (R), "
                    f"so every backward needs its R"
                )
            has_split = grad_input in positions or grad_weight in positions
            if full in positions and has_split:
                split = grad_input if grad_input in positions else grad_weight
                raise ScheduleError(
                    f"action {full} on device {device} mixes a full backward with a split one ({split}): "
                    f"stage {stage} microbatch {mb} needs either one B or one I and one W"
                )
            if full in positions:
                continue
            if not has_split:
                raise ScheduleError(
                    f"missing backward on device {device}: stage {stage} microbatch {mb} needs {full}, or "
                    f"{grad_input} and {grad_weight}"
                )
            if grad_weight not in positions:
                raise ScheduleError(
                    f"missing action {grad_weight} on device {device}: {grad_input} has no weight gradient"
                )
            if grad_input not in positions:
                raise ScheduleError(
                    f"missing action {grad_input} on device {device}: {grad_weight} has no input gradient"
                )


def _check_local_order(
    schedule: Schedule, positions: dict[Action, tuple[int, int]], deps: dict[Action, tuple[Action, ...]]
) -> None:
    for device, row in enumerate(schedule.actions):
        for position, step in enumerate(row):
            for action in members(step):
                for needed in deps[action]:
                    needed_device, needed_position = positions[needed]
                    if needed_device == device and needed_position > position:
                        raise ScheduleError(
                            f"action {action} on device {device} comes before {needed}, which it needs "
                            f"(positions {position} and {needed_position} on the same device)"
                        )


def _check_progress(schedule: Schedule, deps: dict[Action, tuple[Action, ...]]) -> None:
    """Run the device lists in order, each step waiting for its inputs; report a deadlock."""
    done: set[Action] = set()
    cursor = [0] * schedule.num_devices
    waiting: dict[Action, list[int]] = defaultdict(list)
    ready = deque(range(schedule.num_devices))
    while ready:
        device = ready.popleft()
        row = schedule.actions[device]
        while cursor[device] < len(row):
            step = members(row[cursor[device]])
            missing = next((needed for action in step for needed in deps[action] if needed not in done), None)
            if missing is not None:
                waiting[missing].append(device)
                break
            done.update(step)
            cursor[device] += 1
            for action in step:
                ready.extend(waiting.pop(action, ()))
    blocked = []
    for device, row in enumerate(schedule.actions):
        if cursor[device] < len(row):
            head = row[cursor[device]]
            missing = [str(needed) for action in members(head) for needed in deps[action] if needed not in done]
            blocked.append(f"device {device}: {head} waits for {', '.join(missing)}")
    if blocked:
        raise ScheduleError(
            f"schedule {schedule.name!r} deadlocks: the device orders cannot all finish; blocked head "
            f"actions: {'; '.join(blocked)}"
        )
