"""The training command line: --help from the config dataclasses, config files, --resume from
config.json, and one-line user errors (exit status 2). Parse-only except one tiny resume run."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jpipe.train import cli
from jpipe.train.config import ConfigError, as_dict
from jpipe.train.fields import config_fields, field_docs
from jpipe.train.presets import preset
from jpipe.train.resume import extension_note

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(*argv: str):
    return cli.build_config(cli.parse(list(argv)))


def _error(capsys, *argv: str) -> str:
    """The one line `jpipe argv` prints on stderr, asserting exit status 2."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit:  # argparse's own errors (bad int, unknown flag)
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main([*argv, "--help"])
    assert exit.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # help text without its line wrapping


def _save_run(out: pathlib.Path, config) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, out=str(out)))
    (out / "config.json").write_text(json.dumps(as_dict(config), indent=2, default=str) + "\n")  # as the loop does


class TestHelp:
    def test_help_shows_each_fields_documentation_and_the_presets_value(self, capsys):
        quickstart = _help(capsys)
        assert "(default: None)" not in quickstart
        assert "--layers INT, --model.num-layers INT transformer blocks. (default: 8)" in quickstart
        assert "--stages INT, --parallel.stage INT pipeline devices (the mesh's stage axis). (default: 4)" in quickstart
        assert "--out STR, --run.out STR folder for everything the run writes" in quickstart
        assert "(default: runs/quickstart)" in quickstart
        assert "--optimizer.weight-decay FLOAT AdamW's decoupled weight decay. (default: 0.01)" in quickstart
        tiny = _help(capsys, "--preset", "tiny")
        assert "transformer blocks. (default: 4)" in tiny and "(default: runs/tiny)" in tiny

    def test_help_shows_the_config_files_values(self, capsys, tmp_path):
        (tmp_path / "exp.toml").write_text('[model]\nnum_layers = 12\n[run]\nout = "runs/exp"\n')
        text = _help(capsys, "--config", str(tmp_path / "exp.toml"))
        assert "transformer blocks. (default: 12)" in text and "(default: runs/exp)" in text

    def test_every_config_field_is_documented(self):
        for key, spec in config_fields(preset("quickstart")).items():
            assert spec.doc, f"{key} has no description in its dataclass's Attributes section"

    def test_field_docs_reads_multiline_attributes(self):
        class Example:
            """Summary.

            Attributes:
              alpha: first line
                continued.
              beta: one line.

            Notes: not a field.
            """

        assert field_docs(Example) == {"alpha": "first line continued.", "beta": "one line."}

    def test_the_jpipe_console_script_prints_help(self):
        script = pathlib.Path(sys.executable).parent / "jpipe"
        assert script.exists(), "the jpipe console script is not installed: pip install -e ."
        env = {**os.environ}
        env.pop("XLA_FLAGS", None)
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: jpipe [options]")
        assert "--layers INT, --model.num-layers INT" in result.stdout


class TestConfigFile:
    def test_flags_override_the_file_which_overrides_the_preset(self, tmp_path):
        path = tmp_path / "exp.toml"
        path.write_text(
            'preset = "tiny"\n[model]\nnum_layers = 6\nd_model = 32\n[parallel]\nschedule = "zb_h1"\n'
            "[optimizer]\nlearning_rate = 1\n"
        )
        config = _config("--config", str(path), "--layers", "8")
        tiny = preset("tiny")
        assert config.model.num_layers == 8  # flag over file
        assert config.model.d_model == 32 and config.parallel.schedule == "zb_h1"  # file over preset
        assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
        assert config.data == tiny.data and config.run == tiny.run  # the file's preset
        assert _config("--config", str(path), "--preset", "quickstart").run.out == "runs/quickstart"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("[model]\nnum_layer = 6\n", "exp.toml: model.num_layer: unknown field; model has vocab_size"),
            ("[modle]\nnum_layers = 6\n", "exp.toml: unknown section 'modle'"),
            ('[model]\nnum_layers = "6"\n', "exp.toml: model.num_layers: expected int, got '6'"),
            ("[parallel]\nfsdp = 1\n", "exp.toml: parallel.fsdp: expected bool, got 1"),
            ("[parallel]\nstage = 0\n", "exp.toml: parallel.stage: must be an integer >= 1, got 0"),
            ("[model\n", "--config: "),
        ],
    )
    def test_bad_files_are_one_line_naming_file_and_field(self, capsys, tmp_path, text, message):
        (tmp_path / "exp.toml").write_text(text)
        err = _error(capsys, "--config", str(tmp_path / "exp.toml"))
        assert message in err.replace(str(tmp_path) + "/", "")

    def test_a_missing_file_is_named(self, capsys, tmp_path):
        assert "--config: cannot read" in _error(capsys, "--config", str(tmp_path / "none.toml"))


class TestResume:
    def test_resume_starts_from_the_saved_config_and_may_change_the_layout(self, tmp_path):
        saved = preset("tiny")
        saved = dataclasses.replace(saved, model=dataclasses.replace(saved.model, num_layers=6, d_model=32))
        _save_run(tmp_path / "run", saved)
        config = _config(
            "--resume", "--out", str(tmp_path / "run"), "--schedule", "zbv", "--virtual", "2", "--data", "1",
            "--stages", "1", "--remat", "full", "--fsdp", "--stop-at-step", "3",
        )  # fmt: skip
        assert config.model == saved.model and config.optimizer == saved.optimizer and config.data == saved.data
        assert (config.parallel.schedule, config.parallel.virtual, config.parallel.stage) == ("zbv", 2, 1)
        assert config.run.stop_at_step == 3 and config.run.steps == saved.run.steps

    def test_repeating_the_saved_values_is_not_a_change(self, tmp_path):
        _save_run(tmp_path / "run", preset("tiny"))
        config = _config("--preset", "quickstart", "--resume", "--out", str(tmp_path / "run"), "--layers", "4")
        assert config.model == preset("tiny").model  # the saved run, not the quickstart preset

    def test_changing_anything_else_is_refused_naming_the_flags(self, capsys, tmp_path):
        _save_run(tmp_path / "run", preset("tiny"))
        err = _error(capsys, "--resume", "--out", str(tmp_path / "run"), "--layers", "8", "--learning-rate", "0.1")
        assert err.startswith("error: --resume: --layers (4 -> 8), --learning-rate (0.01 -> 0.1) would change the run")
        assert "--stages" in err  # lists what may change

    def test_a_config_file_on_resume_is_checked_the_same_way(self, capsys, tmp_path):
        _save_run(tmp_path / "run", preset("tiny"))
        (tmp_path / "exp.toml").write_text("[data]\nbatch_size = 16\n")
        err = _error(capsys, "--resume", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "exp.toml"))
        assert "exp.toml (8 -> 16) would change the run" in err

    def test_resume_of_a_missing_run_is_refused(self, capsys, tmp_path):
        err = _error(capsys, "--preset", "tiny", "--resume", "--out", str(tmp_path / "typo"))
        assert err.startswith(f"error: --resume: no run to resume in {tmp_path / 'typo'} (no config.json there)")
        assert "--resume auto" in err and not (tmp_path / "typo").exists()
        assert "--resume: expected no value or 'auto', got 'always'" in _error(capsys, "--resume", "always")

    def test_resume_auto_starts_a_missing_run_as_configured_and_resumes_an_existing_one(self, tmp_path):
        from jpipe.train.resume import resumes

        new = str(tmp_path / "new")
        config = _config("--preset", "tiny", "--resume", "auto", "--out", new, "--layers", "2")
        assert config.model.num_layers == 2 and not resumes("auto", new) and resumes(True, new)
        _save_run(tmp_path / "run", preset("tiny"))
        config = _config("--preset", "quickstart", "--resume", "auto", "--out", str(tmp_path / "run"))
        assert config.model == preset("tiny").model and resumes("auto", str(tmp_path / "run"))

    def test_more_steps_extend_the_run_keeping_the_schedules_horizon(self, capsys, tmp_path):
        out = tmp_path / "run"
        _save_run(out, preset("tiny"))  # 6 steps, warmup 2
        (out / "checkpoints" / "6").mkdir(parents=True)
        (out / "checkpoints" / "8.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save is no checkpoint
        config = _config("--resume", "--out", str(out), "--steps", "10")
        assert (config.run.steps, config.optimizer.decay_steps) == (10, 6)
        assert config.optimizer.learning_rate_at(10, 6) == pytest.approx(1e-3)  # the final rate, 0.1 x 1e-2
        note = extension_note(preset("tiny"), config, str(out))
        assert note == (
            "resume: extending the run from 6 to 10 steps; the learning-rate schedule keeps its horizon: its decay "
            "ended at step 6, so steps 7..10 train at the final learning rate 0.001 (add --decay-steps 10 to "
            "stretch the decay to the new end instead)"
        )
        stretched = _config("--resume", "--out", str(out), "--steps", "10", "--decay-steps", "10")
        assert stretched.optimizer.decay_steps == 10
        assert extension_note(preset("tiny"), stretched, str(out)).endswith(
            "decays until step 10: step 7 trains at 0.0055 (step 6 trained at 0.00232), and the rate is the final "
            "0.001 after step 10, past the run's end"
        )
        assert _config("--resume", "--out", str(out), "--steps", "6").optimizer.decay_steps is None  # no change
        err = _error(capsys, "--resume", "--out", str(out), "--steps", "5")
        assert err.endswith(
            f"the run in {out} has a checkpoint at step 6; resuming it needs --steps 6 or more, got 5\n"
        )
        assert err.startswith("error: --steps: ")
        err = _error(capsys, "--resume", "--out", str(out), "--decay-steps", "10")  # without new steps: a change
        assert err.startswith("error: --resume: --decay-steps (unset -> 10) would change the run")

    def test_learning_rate_at_is_the_optax_schedule(self):
        from jpipe.train.optimizer import learning_rate_schedule

        for optimizer, steps in [
            (preset("tiny").optimizer, 6),
            (dataclasses.replace(preset("tiny").optimizer, decay_steps=4), 9),
            (dataclasses.replace(preset("quickstart").optimizer, decay_steps=50), 30),
        ]:
            schedule = learning_rate_schedule(optimizer, steps)
            expected = [float(schedule(count)) for count in range(steps + 3)]
            np.testing.assert_allclose(
                [optimizer.learning_rate_at(steps, c) for c in range(steps + 3)], expected, rtol=1e-5
            )

    def test_a_run_resumes_from_its_config_json_alone_with_another_schedule(self, tmp_path):
        """A tiny run with a non-preset model stops at step 2; `--resume --out` with a new layout and
        no model flags continues it (restoring needs the saved 2-layer model); `--resume --steps 5`
        extends the finished run to step 5 at the final learning rate."""
        out = tmp_path / "run"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("XLA_FLAGS", None)

        def run(*args: str) -> subprocess.CompletedProcess:
            command = [sys.executable, "-m", "jpipe.train", *args]
            return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)

        first = run("--preset", "tiny", "--layers", "2", "--d-model", "8", "--steps", "3", "--stop-at-step", "2",
                    "--eval-every", "100", "--out", str(out))  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        second = run("--resume", "--out", str(out), "--schedule", "gpipe", "--data", "1")
        assert second.returncode == 0, second.stderr[-3000:]
        assert "resumed from step 2" in second.stdout and "step 3/3" in second.stdout
        saved = json.loads((out / "config.json").read_text())
        assert (saved["model"]["num_layers"], saved["model"]["d_model"]) == (2, 8)
        assert (saved["parallel"]["schedule"], saved["parallel"]["data"]) == ("gpipe", 1)
        assert saved["run"]["steps"] == 3
        third = run("--resume", "--out", str(out), "--steps", "5", "--data", "1")
        assert third.returncode == 0, third.stderr[-3000:]
        assert "resume: extending the run from 3 to 5 steps" in third.stdout, third.stdout
        assert "resumed from step 3" in third.stdout and "step 5/5" in third.stdout
        saved = json.loads((out / "config.json").read_text())
        assert (saved["run"]["steps"], saved["optimizer"]["decay_steps"]) == (5, 3)
        rates = {
            r["step"]: r["learning_rate"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        }
        assert sorted(rates) == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([rates[4], rates[5]], [1e-3, 1e-3], rtol=1e-6)  # tiny: 1e-2, ratio 0.1


class TestUserErrors:
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--tensor", "3", "--data", "1"], "--tensor: parallel.tensor: 3 tensor-parallel devices must divide"),
            (["--heads", "3"], "--heads: model: d_model=16 must divide by num_heads=3"),
            (["--coordinator", "localhost"], "--coordinator: expected HOST:PORT"),
            (["--coordinator", "h:0", "--num-processes", "2", "--process-id", "0"], "--coordinator: expected"),
            (["--coordinator", "h:1234"], "--coordinator: needs --num-processes and --process-id"),
            (["--num-processes", "2"], "--num-processes 2: needs --coordinator HOST:PORT"),
            (["--num-processes", "0"], "--num-processes: must be >= 1, got 0"),
            (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"], "--process-id: must be below"),
            (["--process-id", "-1"], "--process-id: must be >= 0"),
            (["--num-processes", "3", "--process-id", "0", "--coordinator", "h:1"], "--num-processes: data 2 x "),
            (["--stages", "x"], "argument --stages/--parallel.stage: invalid int value: 'x'"),
            (["--split-backward", "maybe"], "expected true, false or auto, got 'maybe'"),
            (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ],
    )
    def test_one_line_naming_the_flag(self, capsys, args, message):
        assert message in _error(capsys, "--preset", "tiny", *args)

    def test_an_ipv6_coordinator_and_the_split_backward_forms_parse(self):
        args = cli.parse(["--coordinator", "[::1]:1234", "--num-processes", "2", "--process-id", "1"])
        assert cli.check_processes(args) == 2
        assert _config("--split-backward").parallel.split_backward is True
        assert _config("--split-backward", "off").parallel.split_backward is False
        assert _config("--no-fsdp", "--fsdp").parallel.fsdp is True

    def test_build_config_names_the_flag(self):
        with pytest.raises(ConfigError, match="^--stages: parallel.stage"):
            _config("--stages", "0")


def test_the_docs_config_file_example_builds(tmp_path):
    readme = (ROOT / "docs" / "training.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "exp.toml").write_text(example)
    config = _config("--config", str(tmp_path / "exp.toml"), "--steps", "500")
    assert (config.parallel.schedule, config.parallel.virtual, config.model.num_layers) == ("zbv", 2, 8)
    assert config.optimizer.learning_rate == 1e-3 and config.run.steps == 500 and config.run.out == "runs/tiny"


@pytest.mark.parametrize(
    ("args", "virtual"),
    [
        (["--schedule", "zbv"], 2),
        (["--schedule", "bitpipe"], 4),
        (["--schedule", "1f1b"], 1),
        (["--schedule", "zbv", "--virtual", "2"], 2),
        (["--schedule", "interleaved_1f1b", "--virtual", "3"], 3),
    ],
)
def test_a_schedule_without_virtual_gets_its_own_chunks_per_device(args, virtual):
    config = cli.build_config(cli.parse(args))
    assert config.parallel.virtual == virtual


class TestScheduleFlag:
    """`--schedule` takes torch's class names, torch CSV files and every registered schedule."""

    def test_torch_class_names_are_jpipes_generators_with_their_virtual(self):
        for name, (jpipe_name, virtual) in {
            "ZBVZeroBubble": ("zbv", 2),
            "ScheduleInterleaved1F1B": ("interleaved_1f1b", 2),
            "schedule1f1b": ("1f1b", 1),
            "GPipe": ("gpipe", 1),
        }.items():
            config = _config("--preset", "tiny", "--schedule", name)
            assert (config.parallel.schedule, config.parallel.virtual) == (jpipe_name, virtual), name

    def test_stp_is_a_training_schedule(self):
        config = _config(
            "--preset", "tiny", "--schedule", "stp", "--microbatches", "6", "--data", "1", "--batch-size", "12"
        )  # fmt: skip
        assert (config.parallel.schedule, config.parallel.virtual) == ("stp", 2)

    def test_a_torch_csv_file_gives_the_layout_and_is_checked_against_it(self, capsys):
        csv = ROOT / "tests" / "fixtures" / "torch-schedules" / "torch-ZBVZeroBubble-4rank-8mb-2v.csv"
        args = ["--preset", "tiny", "--schedule", str(csv), "--stages", "4", "--data", "1", "--layers", "8"]
        config = _config(*args, "--microbatches", "8")
        assert (config.parallel.schedule, config.parallel.virtual) == (str(csv), 2)
        err = _error(capsys, *args, "--microbatches", "4")
        assert (
            err.startswith("error: ") and "--schedule" in err.split(": ")[1] and "--microbatches" in err.split(": ")[1]
        )
        assert f"parallel.schedule: {csv} is a schedule for 4 stages, 8 microbatches and virtual 2;" in err
        assert "the run asks for parallel.stage 4, parallel.microbatches 4 and parallel.virtual 2" in err
        assert "--schedule: parallel.schedule: cannot read the CSV schedule" in _error(capsys, "--schedule", "no.csv")
        err = _error(capsys, "--schedule", "InterleavedZeroBubble")
        assert "unknown schedule 'InterleavedZeroBubble'" in err and "a CSV file's path" in err


def test_overlap_pairs_builds_braided_pairs_and_only_for_paired_schedules():
    from jpipe.train.config import ParallelConfig

    config = ParallelConfig(data=1, stage=2, schedule="dualpipev", virtual=2, overlap_pairs=True)
    assert config.schedule_options == {"overlap": True}
    with pytest.raises(ConfigError, match="only schedules 'dualpipev' and 'dualpipe' have F&B pairs, got '1f1b'"):
        ParallelConfig(schedule="1f1b", overlap_pairs=True)
    from jpipe import schedules

    assert schedules.build("dualpipev", 2, 4, **config.schedule_options).has_composites
