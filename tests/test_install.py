"""Install and first use: the distribution's metadata and license, the quick start's environment, and
a user's first run on their own text (prepare, then train) with no libtpu start-up noise."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import tomllib

from jpipe import schedules

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBTPU_NOISE = ("libtpu", "TPU_WORKER_HOSTNAMES", "E0000", "Source Location Trace", "InitGoogle")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_distribution_name_license_and_extras():
    project = _pyproject()["project"]
    # PyPI's "jpipe" is another project (a JMESPath command line tool); the import name stays jpipe.
    assert project["name"] == "jpipe-pp"
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    extras = project["optional-dependencies"]
    assert extras["tpu"] == ["jax[tpu]"] and extras["gpu"] == ["jax[cuda12]"]
    assert any(r.startswith("tokenizers") for r in extras["data"])
    assert "jpipe-pp[tpu,data]" in extras["test"] and "pytest>=8" in extras["test"]
    assert not any("tokenizers" in r or "libtpu" in r or "tpu" in r for r in project["dependencies"])


def test_the_quick_start_installs_only_what_training_needs():
    script = (ROOT / "scripts" / "train.sh").read_text()
    commands = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    installs = [line.split("pip install", 1)[1] for line in commands if "pip install" in line]
    assert installs == [" --quiet --upgrade pip", " --quiet -e ."], installs
    assert "'.[test]'" in (ROOT / "scripts" / "test.sh").read_text()


def test_the_first_ci_half_installs_the_locked_versions_and_the_second_the_newest():
    """requirements/lock-py311.txt pins every package of the test environment but jpipe itself (its
    `pip freeze`, from scripts/lock.sh); scripts/test.sh uses it on Python 3.11 unless JPIPE_LOCK=none,
    which .ci/run's Python 3.12 half passes."""
    lines = [line for line in (ROOT / "requirements" / "lock-py311.txt").read_text().splitlines() if line[:1] != "#"]
    pins = dict(line.split("==") for line in lines)
    assert len(pins) == len(lines) and pins["jax"] == pins["jaxlib"] == "0.10.2" and "jpipe-pp" not in pins
    assert {"flax", "optax", "orbax-checkpoint", "numpy", "pytest", "libtpu", "tokenizers"} <= set(pins)
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert "requirements/lock-py$(" in test_sh and "-c \"$lock\" -e '.[test]'" in test_sh
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'JPIPE_VENV=.venv312 JPIPE_PYTHON="$python312" JPIPE_LOCK=none bash scripts/test.sh' in ci
    assert "\nbash scripts/test.sh\n" in ci  # the first half: the README's command as written
    assert "freeze --exclude-editable --exclude jpipe-pp" in (ROOT / "scripts" / "lock.sh").read_text()


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def test_prepare_then_train_llama_on_the_tokens_without_libtpu_noise(tmp_path):
    """As a user would: `python -m jpipe.data.prepare` on a folder of .txt and .jsonl, then
    `python -m jpipe.train --data-path <tokens> --model llama --schedule <a CSV file>` with
    JAX_PLATFORMS unset (the test extra installs libtpu; without TPU chips nothing of it may be
    printed)."""
    source = tmp_path / "text"
    source.mkdir()
    (source / "intro.txt").write_text("Pipelines overlap the stages of a model. " * 40)
    with open(source / "more.jsonl", "w") as lines:
        for i in range(40):
            lines.write(
                json.dumps({"text": f"Microbatch {i} flows forward, then its gradient flows back. " * 2}) + "\n"
            )
    tokens = tmp_path / "tokens"
    prepared = _run("jpipe.data.prepare", str(source), "--out", str(tokens), "--vocab-size", "400")
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stderr == "" and "(41 documents, vocabulary" in prepared.stdout
    vocab_size = json.loads((tokens / "tokens.json").read_text())["vocab_size"]
    assert 257 < vocab_size <= 400  # the BPE stops merging where no pair repeats

    # The schedule from a CSV file in torch.pipelining's format (zb_h1's, for the tiny preset's 2 stages).
    csv = tmp_path / "zb_h1.csv"
    csv.write_text(schedules.to_csv(schedules.build("zb_h1", 2, 2)))
    args = [
        "--preset",
        "tiny",
        "--model",
        "llama",
        "--steps",
        "2",
        "--data.eval-fraction",
        "0.2",
        "--schedule",
        str(csv),
    ]
    trained = _run("jpipe.train", "--data-path", str(tokens), *args, "--out", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "step 2/2" in trained.stdout and "zb_h1: p=2 m=2 v=1" in trained.stdout
    assert not [line for line in trained.stderr.splitlines() if any(noise in line for noise in LIBTPU_NOISE)], (
        trained.stderr[-3000:]
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["vocab_size"] == vocab_size and config["data"]["path"] == str(tokens)
