"""Attention within documents (`GPTConfig.document_end`): segments, the mask, the pipelined parity.

A window packs documents; with `document_end` set, a token attends only to earlier tokens of its
own document (the end-of-document token ends its document), in the unpipelined model and in every
stage of the pipelined one (the segments travel with the activation).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_cases import TINY, Case, model_params, pipeline, reference_step
from pipeline_cases import assert_trees_close

from jpipe.data.tokens import BIN_NAME, TokenMeta
from jpipe.models import GPT, llama_config
from jpipe.models.layers import attention_mask, document_segments
from jpipe.train import cli

EOD = 0
LLAMA = llama_config(vocab_size=64, seq_len=8, d_model=16, num_heads=4, num_kv_heads=2, num_layers=4, mlp_ratio=2)


@functools.cache
def documents_batch(m: int = 4, b: int = 4, t: int = 8) -> tuple[jax.Array, jax.Array]:
    """tokens, targets `[m, B, T]` without the id EOD except where placed: boundaries mid-window,
    at the first and last position, two in a row, and rows with none."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 64, (m, b, t + 1))
    for (i, j), positions in {(0, 0): [3], (0, 1): [0], (1, 2): [2, 3], (2, 0): [1, 5], (3, 3): [7]}.items():
        ids[i, j, positions] = EOD
    return jnp.asarray(ids[..., :-1], jnp.int32), jnp.asarray(ids[..., 1:], jnp.int32)


def test_segments_count_the_documents_ended_before_each_token():
    tokens = jnp.array([[5, 0, 7, 0, 0, 9], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])
    np.testing.assert_array_equal(
        document_segments(tokens, EOD), [[0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]
    )
    mask = np.asarray(attention_mask(6, document_segments(tokens, EOD)))
    assert mask[0, 2].tolist() == [False, False, True, False, False, False]  # 7 sees itself, not the first document
    assert mask[0, 3].tolist() == [False, False, True, True, False, False]  # the end token belongs to its document
    np.testing.assert_array_equal(mask[2], np.tril(np.ones((6, 6), bool)))  # a boundary at the end masks nothing


@pytest.mark.parametrize("config", [TINY, LLAMA], ids=["gpt", "llama"])
def test_masking_changes_the_loss_only_when_a_window_holds_a_boundary(config):
    masked = dataclasses.replace(config, document_end=EOD)
    params = model_params(config)
    tokens, targets = documents_batch()
    loss = lambda c, t, y: float(reference_step(c)(params, t, y)[0])  # noqa: E731
    assert loss(masked, tokens, targets) != pytest.approx(loss(config, tokens, targets), rel=1e-4)
    # Without a boundary inside a window (none, or only at the last position) the mask is the causal one.
    inside = (tokens[..., :-1] == EOD).any(axis=-1)
    plain = jnp.where(inside[..., None], 7, tokens)
    assert loss(masked, plain, targets) == loss(config, plain, targets)


def test_with_rope_a_document_reads_as_if_it_were_alone():
    """RoPE scores depend on relative positions only, so the second document's logits in a masked
    window are those of the document run alone (and the first document's those of the unmasked model)."""
    config = dataclasses.replace(LLAMA, document_end=EOD)
    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))), model_params(LLAMA))
    window = jnp.array([[11, 12, 13, EOD, 21, 22, 23, 24]])
    logits = model(window)
    np.testing.assert_allclose(logits[:, 4:], model(window[:, 4:]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits[:, :4], model(window[:, :4]), rtol=1e-5, atol=1e-6)


CASES = [
    Case((1, 4, 1), "1f1b", 1, dataclasses.replace(TINY, document_end=EOD), fsdp=False),  # 6 layers: padding slots
    Case((2, 2, 1), "zbv", 2, dataclasses.replace(LLAMA, document_end=EOD), fsdp=True),  # V placement, data axis
]
# On jax 0.12's CPU compiler the Llama case's GQA key-projection gradient lands 1.4e-5 of its largest
# value off the unpipelined float32 model (limit 1e-5): the same leaf, and the same size of error, as
# test_llama's tensor-parallel cases there (TENSOR_PARALLEL_ON_JAX_012; cause still to be found).
# jax 0.10.2 passes. An expected failure on that pair, never a looser tolerance.
GQA_KEY_GRADIENT_ON_JAX_012 = pytest.mark.xfail(
    jax.__version_info__ >= (0, 12),
    reason="jax 0.12 CPU: GQA wk gradient 1.4e-5 relative off the unpipelined model (limit 1e-5)",
    raises=AssertionError,
    strict=False,
)
PARAMS = [
    pytest.param(case, id=f"{case.config.family}-{case.id}", marks=[GQA_KEY_GRADIENT_ON_JAX_012] * (index == 1))
    for index, case in enumerate(CASES)
]


@pytest.mark.parametrize("case", PARAMS)
def test_pipelined_masked_model_matches_unpipelined(case):
    """Loss and every parameter gradient equal the one-device masked model's (float32, relative 1e-5)."""
    pipe = pipeline(case)
    params = model_params(dataclasses.replace(case.config, document_end=None))
    tokens, targets = documents_batch()
    loss, grads = jax.jit(pipe.value_and_grad())(pipe.place(params), tokens, targets)
    ref_loss, ref_grads = reference_step(case.config)(params, tokens, targets)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(pipe.to_model(grads), ref_grads)
    evaluated = jax.jit(pipe.evaluate())(pipe.place(params), tokens, targets)
    assert_trees_close(evaluated, ref_loss)


def _token_folder(path: pathlib.Path, eod: int = 3, vocab_size: int = 50) -> pathlib.Path:
    """A token folder as `python -m jpipe.data.prepare` writes it: documents of 5 to 20 ids, each ended by `eod`."""
    rng = np.random.default_rng(0)
    ids: list[int] = []
    while len(ids) < 3000:
        ids += [int(i) for i in rng.integers(eod + 1, vocab_size, rng.integers(5, 20))] + [eod]
    path.mkdir()
    np.asarray(ids, np.uint16).tofile(path / BIN_NAME)
    TokenMeta(vocab_size, "uint16", eod, len(ids), ids.count(eod), tokenizer="").write(path)
    return path


def test_the_cli_masks_at_the_token_folders_end_of_document_and_trains(tmp_path, capsys):
    from jpipe.train.loop import train

    data = _token_folder(tmp_path / "tokens")
    args = ["--preset", "tiny", "--model", "llama", "--data-path", str(data), "--data.eval-fraction", "0.1"]
    args += ["--out", str(tmp_path / "run")]
    config = cli.build_config(cli.parse([*args, "--no-cross-document-attention", "--steps", "1"]), training=True)
    assert (config.model.document_end, config.model.vocab_size) == (3, 50)
    assert cli.build_config(cli.parse(args)).model.document_end is None  # attention crosses documents by default
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats with int32 step counts
        summary = train(config, stream=io.StringIO())
    assert np.isfinite(summary.losses).all()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["document_end"] == 3

    assert cli.main(["--preset", "tiny", "--no-cross-document-attention"]) == 2  # byte-level text: no documents
    err = capsys.readouterr().err
    assert err.startswith("error: --cross-document-attention: data.cross_document_attention: false needs a token")
    assert err.count("\n") == 1 and "has none" in err
    assert cli.main([*args, "--model.document-end", "4"]) == 2
    assert "model.document_end: set from the data by data.cross_document_attention false" in capsys.readouterr().err
