"""Text and matplotlib charts of schedules (placeholder, being written)."""


def render(schedule, **kwargs) -> str:
    raise NotImplementedError


def plot(simulation, path, **kwargs):
    raise NotImplementedError
