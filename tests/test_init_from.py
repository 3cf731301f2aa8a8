"""`--init-from`: a new run starts from another run's weights with a new optimizer state."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib

import numpy as np
import pytest

from jpipe.train import cli
from jpipe.train.config import ConfigError
from jpipe.train.init_from import InitSource, check_model, parse_init_from


@pytest.fixture(autouse=True)
def _standard_promotion():
    """optax mixes Python floats with int32 step counts, which strict promotion refuses."""
    import jax

    with jax.numpy_dtype_promotion("standard"):
        yield


def _error(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --init-from: ") and "Traceback" not in err, err
    return err


def test_weights_come_from_the_source_checkpoint_and_the_optimizer_starts_afresh(tmp_path, capsys):
    """Run A trains 2 steps. Run B starts from A's step 2 with a new optimizer: its first step has
    learning rate 0 (the warmup starts from 0), so its weights after step 1 are A's, and its
    evaluation at step 1 is A's final one, on the same held-out batches."""
    from jpipe.train.loop import train

    text = tmp_path / "text.txt"  # a small corpus: nothing to scan or cache but this file
    text.write_text("".join(f"Stage {i % 4} sends microbatch {i} to stage {(i + 1) % 4}.\n" for i in range(150)))
    args = ["--preset", "tiny", "--steps", "2", "--checkpoint-every", "2", "--data-path", str(text)]
    base = cli.build_config(cli.parse([*args, "--data.eval-fraction", "0.1"]))
    first = dataclasses.replace(base, run=dataclasses.replace(base.run, out=str(tmp_path / "a"), eval_every=2))
    source = train(first, stream=io.StringIO())

    init = parse_init_from(str(tmp_path / "a" / "checkpoints" / "2"))
    assert init == InitSource(tmp_path / "a", 2) and parse_init_from(str(tmp_path / "a")).step is None
    second = dataclasses.replace(base, run=dataclasses.replace(base.run, out=str(tmp_path / "b"), eval_every=1))
    check_model(init, second)
    stream = io.StringIO()
    started = train(second, stream=stream, init_from=init)
    assert f"initialized the weights from {tmp_path / 'a'} step 2; the optimizer starts afresh" in stream.getvalue()
    assert started.first_step == 1 and started.losses[0] < source.losses[0] - 0.1
    metrics = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert '"learning_rate": 0.0' in metrics[0]
    first_eval = json.loads(metrics[0])["eval_loss"]
    np.testing.assert_allclose(first_eval, source.final_eval_loss, rtol=1e-6)

    # Another model is refused before JAX starts, naming what differs; so is a folder with no run.
    err = _error(
        capsys, "--preset", "tiny", "--layers", "2", "--init-from", str(tmp_path / "a"), "--out", str(tmp_path / "c")
    )
    assert f"the model of {tmp_path / 'a'} differs from this run's: model.num_layers (4 there, 2 here)" in err
    err = _error(capsys, "--preset", "tiny", "--init-from", str(tmp_path), "--out", str(tmp_path / "c"))
    assert "expected a run folder (holding checkpoints/) or a checkpoint" in err
    assert not (tmp_path / "c").exists()


def test_a_missing_checkpoint_step_is_named(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="--init-from: no checkpoint"):
        parse_init_from(str(pathlib.Path(tmp_path / "run" / "checkpoints" / "7")))
