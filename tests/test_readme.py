"""The README's quick start commands exist; docs/schedules.md's "Adding a schedule" example matches 1f1b."""

from __future__ import annotations

import pathlib
import re

from jpipe import schedules

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SCHEDULES_PAGE = (ROOT / "docs" / "schedules.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", SCHEDULES_PAGE, flags=re.S)


def test_adding_a_schedule_example_builds_validates_and_matches_1f1b():
    block = next(b for b in _python_blocks() if "@register" in b)
    namespace: dict = {}
    try:
        exec(compile(block, "docs/schedules.md", "exec"), namespace)
        built = schedules.build("my_1f1b", 4, 8)
        reference = schedules.build("1f1b", 4, 8)
        assert schedules.simulate(built).makespan == schedules.simulate(reference).makespan
    finally:
        schedules.SCHEDULES.pop("my_1f1b", None)


def test_quick_start_commands_exist():
    commands = re.findall(r"^bash (scripts/\S+)", README, flags=re.M)
    assert commands == ["scripts/train.sh", "scripts/test.sh"]
    for command in commands:
        assert (ROOT / command).is_file(), command
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
