"""The README, the docs pages and the examples stay true: every code block and example runs.

A page's ```python blocks run in order in one subprocess, in one namespace (a block may use what an
earlier block of the page defined); its ```bash blocks run in order in one `bash -e` in a fresh folder
where `.venv/bin/python`, `.venv/bin/jpipe` and `python` are this interpreter (with this checkout on
`PYTHONPATH`). Output blocks (```text, ```toml and the like) are not run. A block that cannot run here
(it needs a TPU, a GPU, another Python, the network, or minutes) carries a marker on the line before it,
`<!-- not run: <why> -->`, and is reported as a skipped test whose id names the block and the reason.
Examples run as scripts, each in its own subprocess.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
RUN_LANGUAGES = ("python", "bash")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
MARKER = re.compile(r"<!-- not run: (.+?) -->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    page: pathlib.Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the marker's reason

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: pathlib.Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        found.append(Block(page, line, match.group(1), match.group(2), marker.group(1) if marker else None))
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _env() -> dict[str, str]:
    """A user's environment: this checkout importable, the CPU, no fake-device count set for them."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_CURRENT_TEST")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(command: list[str], cwd: pathlib.Path, env: dict[str, str], timeout: float = 300) -> None:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"


def _pages_with(language: str) -> list:
    return [
        pytest.param(page, id=str(page.relative_to(ROOT)))
        for page in PAGES
        if any(b.language == language and b.not_run is None for b in blocks(page))
    ]


RUN_PYTHON = """
import json, sys
namespace = {"__name__": "__main__"}
for name, code in json.load(open(sys.argv[1])):
    print(f"--- {name}", flush=True)
    exec(compile(code, name, "exec"), namespace)
"""


@pytest.mark.parametrize("page", _pages_with("python"))
def test_python_blocks_run(page, tmp_path):
    import json

    runnable = [(b.name, b.code) for b in blocks(page) if b.language == "python" and b.not_run is None]
    (tmp_path / "blocks.json").write_text(json.dumps(runnable))
    _run([sys.executable, "-c", RUN_PYTHON, str(tmp_path / "blocks.json")], tmp_path, _env())


@pytest.mark.parametrize("page", _pages_with("bash"))
def test_bash_blocks_run(page, tmp_path):
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, target in (("python", ""), ("jpipe", " -m jpipe.train")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{target} "$@"\n')
        shim.chmod(0o755)
    script = "".join(
        f"echo '--- {b.name}'\n{b.code}" for b in blocks(page) if b.language == "bash" and b.not_run is None
    )
    env = _env()
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    _run(["bash", "-euo", "pipefail", "-c", script], tmp_path, env)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, id=f"{b.name}-{b.language}-not-run-{_slug(b.not_run)}")
        for b in ALL_BLOCKS
        if b.not_run is not None
    ],
)
def test_marked_block(block):
    """A marked block is listed by name and reason; it must be one this test would otherwise run."""
    assert block.language in RUN_LANGUAGES, f"{block.name}: only runnable blocks need a marker"
    pytest.skip(f"{block.name}: {block.not_run}")


def test_every_block_is_known():
    """A block is run (python, bash), output or data (text, toml, ...), never an unlabelled fence."""
    unlabelled = [b.name for b in ALL_BLOCKS if not b.language]
    assert not unlabelled, f"label these fences (```text for output): {unlabelled}"
    assert sum(b.language in RUN_LANGUAGES and b.not_run is None for b in ALL_BLOCKS) >= 8


@pytest.mark.parametrize("example", [pytest.param(e, id=e.name) for e in EXAMPLES])
def test_example_runs(example, tmp_path):
    env = _env()
    env["STEPS"] = "2"  # examples/own_model.py: two steps, then two more resumed from its checkpoint
    _run([sys.executable, str(example)], tmp_path, env)
    if example.name == "own_model.py":
        _run([sys.executable, str(example)], tmp_path, env)
        assert sorted(p.name for p in (tmp_path / "runs/own_model/checkpoints").iterdir()) == ["2", "4"]


def test_examples_are_documented_and_short():
    assert {e.name for e in EXAMPLES} >= {"own_model.py", "custom_schedule.py", "torch_csv.py", "search.py"}
    readme = (ROOT / "README.md").read_text()
    for example in EXAMPLES:
        assert example.read_text().startswith('"""'), f"{example.name}: say what it shows in a docstring"
        assert f"examples/{example.name}" in readme, f"{example.name}: list it in the README"
    assert len((ROOT / "examples/own_model.py").read_text().splitlines()) < 60


def test_readme_is_short_and_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"link {page.name} from the README"
    for target in re.findall(r"\]\(((?:docs|examples)/[^)#]+)", readme):
        assert (ROOT / target).exists(), target
