"""Schedule generators by name (placeholder, being written)."""
from typing import Callable

from jpipe.schedules.ir import Schedule

SCHEDULES: dict[str, Callable[..., Schedule]] = {}


def register(name: str):
    def wrap(fn):
        SCHEDULES[name] = fn
        return fn
    return wrap


def build(name: str, num_devices: int, num_microbatches: int, virtual: int = 1) -> Schedule:
    raise NotImplementedError
