"""Schedule validation (placeholder, being written)."""


def validate(schedule) -> None:
    raise NotImplementedError
