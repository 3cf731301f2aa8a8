"""What `--schedule` takes besides jpipe's registered names: torch's class names and torch CSV files.

- A registered name (`jpipe.schedules.SCHEDULES`, `ROUTED_SCHEDULES`, `COMPOSITE_SCHEDULES`:
  `1f1b`, `zbv`, `stp`, ...) or "auto" (searched, `jpipe.train.auto`).
- A torch.distributed.pipelining class name (`ScheduleZBVZeroBubble`, or `ZBVZeroBubble` as torch's
  `get_schedule_class` spells it; any case): jpipe's generator of the same schedule. The orders of
  the two implementations may differ in detail; to run torch's exact order, pass its CSV file.
- A path ending in `.csv`: a schedule written by torch (`_dump_csv`, compute only or with comms) or
  by `jpipe.schedules.to_csv`, run unchanged. Its rows are the pipeline devices (`--stages`), its
  cells give the microbatches (`--microbatches`) and the stages per device (`--virtual`, taken from
  the file when not given).
"""

from __future__ import annotations

import pathlib

from jpipe import schedules
from jpipe.train.config import ConfigError, ParallelConfig

# torch.distributed.pipelining's schedule classes -> jpipe's generators of the same schedule.
# (torch's InterleavedZeroBubble has no jpipe generator: run its CSV file.)
TORCH_SCHEDULES = {
    "schedulegpipe": "gpipe",
    "schedule1f1b": "1f1b",
    "scheduleinterleaved1f1b": "interleaved_1f1b",
    "scheduleloopedbfs": "looped_bfs",
    "schedulezbvzerobubble": "zbv",
    "scheduledualpipev": "dualpipev",
}


def is_csv(name: str) -> bool:
    """Whether the schedule `name` is a CSV file's path."""
    return isinstance(name, str) and name.lower().endswith(".csv")


def torch_name(name: str) -> str | None:
    """jpipe's name of torch's schedule class `name` (with or without its "Schedule" prefix), or None."""
    key = name.lower()
    return TORCH_SCHEDULES.get(key) or TORCH_SCHEDULES.get("schedule" + key)


def read_csv(path: str) -> schedules.Schedule:
    """The validated schedule in the CSV file `path`; ConfigError naming `parallel.schedule` otherwise."""
    try:
        text = pathlib.Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"parallel.schedule: cannot read the CSV schedule {path!r} ({error.strerror})") from None
    try:
        schedule = schedules.from_csv(text, name=pathlib.Path(path).stem)
        schedules.validate(schedule)
    except schedules.ScheduleError as error:
        raise ConfigError(f"parallel.schedule: {path}: {error}") from None
    return schedule


def csv_schedule(parallel: ParallelConfig) -> schedules.Schedule | None:
    """The CSV file's schedule when `parallel.schedule` names one (checked against the layout), else None."""
    if not is_csv(parallel.schedule):
        return None
    schedule = read_csv(parallel.schedule)
    found = (schedule.num_devices, schedule.num_microbatches, schedule.virtual)
    asked = (parallel.stage, parallel.microbatches, parallel.virtual)
    if found != asked:
        raise ConfigError(
            f"parallel.schedule: {parallel.schedule} is a schedule for {found[0]} stages, {found[1]} microbatches "
            f"and virtual {found[2]}; the run asks for parallel.stage {asked[0]}, parallel.microbatches {asked[1]} "
            f"and parallel.virtual {asked[2]}"
        )
    return schedule


def resolve_schedule_flag(overrides: dict, sources: dict) -> None:
    """In place: a torch class name becomes jpipe's name; a CSV file gives the virtual when none is given."""
    name = overrides.get("parallel.schedule")
    if not isinstance(name, str):
        return
    if torch_name(name) is not None:
        overrides["parallel.schedule"] = torch_name(name)
    elif is_csv(name) and "parallel.virtual" not in overrides:
        source = sources.get("parallel.schedule", "--schedule")
        try:
            overrides["parallel.virtual"] = read_csv(name).virtual
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
        sources["parallel.virtual"] = source
