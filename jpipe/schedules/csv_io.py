"""torch.pipelining CSV import/export (placeholder, being written)."""
from jpipe.schedules.ir import Schedule


def to_csv(schedule: Schedule) -> str:
    raise NotImplementedError


def from_csv(text: str, name: str = "csv") -> Schedule:
    raise NotImplementedError
