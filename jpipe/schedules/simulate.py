"""Schedule simulation (placeholder, being written)."""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Cost:
    f: float = 1.0
    b: float = 2.0
    i: float = 1.0
    w: float = 1.0
    comm: float = 0.0


@dataclasses.dataclass(frozen=True)
class Event:
    pass


@dataclasses.dataclass(frozen=True)
class Simulation:
    pass


def simulate(schedule, cost=Cost(), mode="async"):
    raise NotImplementedError
