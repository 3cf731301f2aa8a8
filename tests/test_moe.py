"""The moe family (DeepSeek-style mixture of experts): routing, the model, and pipelined == unpipelined,
with experts replicated, tensor-parallel, or split over the data axis (expert parallelism)."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_cases import batch, mesh_of, model_params, reference_step
from lm_cases import reference as reference_of
from pipeline_cases import assert_trees_close

from jpipe import schedules
from jpipe.models import MoELM, PipelinedLM, moe_config
from jpipe.models.moe import route
from jpipe.parallel import DEFAULT_RULES, ShardingRules
from jpipe.train import cli
from jpipe.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent

# 4 experts, top-2, one shared expert, one dense first layer; capacity 4 of 8 tokens per expert and
# sequence, so some choices are dropped (checked below); heads, experts and widths divide by 2 and 4.
MOE = moe_config(
    vocab_size=64,
    seq_len=8,
    d_model=16,
    num_heads=4,
    num_kv_heads=2,
    num_layers=4,
    mlp_ratio=2,
    num_experts=4,
    experts_per_token=2,
    shared_experts=1,
    capacity_factor=1.0,
    aux_loss_weight=0.1,
    dense_layers=1,
)


@dataclasses.dataclass(frozen=True)
class MoECase:
    """mesh (data, stage, tensor), schedule (with `build` options), FSDP, whether experts are split
    over data, and the microbatch count (a multiple of 4: see `moe_batch`)."""

    mesh: tuple[int, int, int]
    schedule: str
    virtual: int
    fsdp: bool
    expert_parallel: bool
    options: tuple[tuple[str, object], ...] = ()
    microbatches: int = 4

    @property
    def id(self) -> str:
        extra = "".join(f"-{key}{'' if value is True else value}" for key, value in self.options)
        extra += ("-fsdp" if self.fsdp else "") + (f"-ep{self.mesh[0]}" if self.expert_parallel else "")
        return f"{self.schedule}-mesh{'x'.join(map(str, self.mesh))}{extra}"


CASES = [
    MoECase((1, 2, 2), "1f1b", 1, fsdp=False, expert_parallel=False),  # experts tensor-parallel on their width
    MoECase((2, 2, 1), "dualpipev", 2, fsdp=True, expert_parallel=True),
    # Expert parallelism 4 (stage 2 x data 4, every fake device), alone and with FSDP; every other
    # schedule with expert parallelism 2 is in test_moe_schedules.py.
    *(
        MoECase((4, 2, 1), name, virtual, fsdp=fsdp, expert_parallel=True)
        for name, virtual in [("1f1b", 1), ("zbv", 2), ("dualpipev", 2), ("dualpipe", 2)]
        for fsdp in (False, True)
    ),
]


@functools.cache
def pipeline(case: MoECase) -> PipelinedLM:
    schedule = schedules.build(case.schedule, case.mesh[1], case.microbatches, case.virtual, **dict(case.options))
    rules = {**DEFAULT_RULES, "expert": "data"} if case.expert_parallel else DEFAULT_RULES
    return PipelinedLM(MOE, schedule=schedule, mesh=mesh_of(case.mesh), rules=ShardingRules(rules, fsdp=case.fsdp))


@functools.cache
def moe_batch(microbatches: int) -> tuple[jax.Array, jax.Array]:
    """tokens, targets `[microbatches, B, T]`: `batch(MOE)` then fresh draws, 4 microbatches at a time."""
    chunks = [batch(MOE)]
    rng = np.random.default_rng(1)
    for _ in range(microbatches // 4 - 1):
        ids = rng.integers(0, MOE.vocab_size, (4, *batch(MOE)[0].shape[1:-1], MOE.seq_len + 1))
        chunks.append((jnp.asarray(ids[..., :-1], jnp.int32), jnp.asarray(ids[..., 1:], jnp.int32)))
    return tuple(jnp.concatenate(parts) for parts in zip(*chunks))


@functools.cache
def moe_reference(microbatches: int) -> tuple[jax.Array, dict]:
    """The one-device loss and gradients of `moe_batch(microbatches)`.

    Routing and capacity are per sequence and the loss is the mean over equal microbatches, so the
    reference of 4k microbatches is the mean of k references of 4 (one compiled reference serves all).
    """
    if microbatches == 4:
        return reference_of(MOE)
    tokens, targets = moe_batch(microbatches)
    step = reference_step(MOE)
    parts = [step(model_params(MOE), tokens[i : i + 4], targets[i : i + 4]) for i in range(0, microbatches, 4)]
    return jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *parts)


def check_parity(case: MoECase) -> None:
    """Loss (cross-entropy + balance loss) and every gradient equal the one-device model's (float32, 1e-5)."""
    assert case.microbatches % 4 == 0
    pipe = pipeline(case)
    assert pipe.expert_axis == ("data" if case.expert_parallel else None)
    params = pipe.place(model_params(MOE))
    inputs = moe_batch(case.microbatches)
    step = jax.jit(pipe.value_and_grad()).lower(params, *inputs).compile()
    if case.expert_parallel:
        assert "all-to-all" in step.as_text()
        experts = params["blocks"]["moe"]["experts"]["w_up"]  # [S, layers, E, D, F]: E stored over data
        assert experts.sharding.spec[2] == "data"
    loss, grads = step(params, *inputs)
    ref_loss, ref_grads = moe_reference(case.microbatches)
    assert_trees_close(loss, ref_loss)
    assert_trees_close(pipe.to_model(grads), ref_grads)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_pipelined_moe_matches_unpipelined(case):
    check_parity(case)


METRICS_CASES = [
    CASES[0],
    MoECase((2, 2, 1), "1f1b_overlap", 1, fsdp=False, expert_parallel=True),
]  # TP 2; braided EP 2


@pytest.mark.parametrize("case", METRICS_CASES, ids=[case.id for case in METRICS_CASES])
def test_pipelined_routing_metrics_match_unpipelined(case):
    """`value_and_grad(has_aux=True)`: the routing metrics equal the one-device model's, the loss
    and gradients are those without metrics (float32, 1e-5)."""
    pipe = pipeline(case)
    params = pipe.place(model_params(MOE))
    (loss, metrics), grads = jax.jit(pipe.value_and_grad(has_aux=True))(params, *batch(MOE))
    tokens, targets = (a.reshape((-1,) + a.shape[2:]) for a in batch(MOE))
    ref_loss, ref_metrics = jax.jit(lambda p, t, y: _model_of(p).loss_and_metrics(t, y))(
        model_params(MOE), tokens, targets
    )
    assert set(metrics) == {"balance_loss", "expert_load", "dropped_fraction"}
    assert_trees_close(loss, ref_loss)
    assert_trees_close(metrics, ref_metrics)
    assert_trees_close(pipe.to_model(grads), reference_of(MOE)[1])
    assert float(jnp.sum(metrics["expert_load"])) == pytest.approx(1.0, rel=1e-5)
    assert 0 < float(metrics["dropped_fraction"]) < 1
    evaluated_loss, evaluated = jax.jit(pipe.evaluate(has_aux=True))(params, *batch(MOE))
    assert_trees_close((evaluated_loss, evaluated), (ref_loss, ref_metrics))


def _model_of(params) -> MoELM:
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoELM(MOE, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, params)


def _model(config=MOE) -> MoELM:
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoELM(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, model_params(config))


def _route_by_loop(config, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dispatch `[B, T, E, C]` and dropped `[B]`, by filling slots one choice at a time."""
    batch_size, seq, experts = logits.shape
    k, capacity = config.experts_per_token, config.expert_capacity(seq)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dispatch = np.zeros((batch_size, seq, experts, capacity), np.float32)
    dropped = np.zeros(batch_size)
    for b in range(batch_size):
        chosen = np.argsort(-probs[b], axis=-1, kind="stable")[:, :k]  # [T, k]
        filled = np.zeros(experts, int)
        for j in range(k):  # priority: all first choices, then all second choices
            for t in range(seq):
                e = chosen[t, j]
                if filled[e] < capacity:
                    dispatch[b, t, e, filled[e]] = 1
                    filled[e] += 1
                else:
                    dropped[b] += 1
    return dispatch, dropped


class TestRouting:
    def test_dispatch_fills_slots_in_priority_order_up_to_capacity(self):
        logits = np.random.default_rng(0).normal(size=(3, 8, 4)).astype(np.float32)
        routing = route(MOE, jnp.asarray(logits))
        dispatch, dropped = _route_by_loop(MOE, logits)
        np.testing.assert_array_equal(routing["dispatch"], dispatch)
        np.testing.assert_array_equal(routing["dropped"], dropped)
        assert dropped.sum() > 0  # the test config drops some choices
        # Every slot holds at most one token, every token at most k slots; kept + dropped = k T.
        assert routing["dispatch"].sum(axis=1).max() <= 1
        np.testing.assert_array_equal(routing["dispatch"].sum(axis=(1, 2, 3)) + routing["dropped"], 2 * 8)
        np.testing.assert_array_equal(routing["load"].sum(-1), 2 * 8)

    def test_combine_weights_are_the_router_probabilities_of_kept_choices(self):
        logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 4)), jnp.float32)
        routing = route(MOE, logits)
        probs = jax.nn.softmax(logits, axis=-1)
        np.testing.assert_allclose(routing["combine"].sum(-1), routing["dispatch"].sum(-1) * probs, rtol=1e-6)

    def test_balance_loss_is_one_when_balanced(self):
        """Uniform choices and probabilities: sum_i f_i P_i = sum_i 1 x 1/E = 1 (DeepSeek's normalisation)."""
        config = dataclasses.replace(MOE, experts_per_token=1, capacity_factor=2.0)
        logits = jnp.asarray(np.tile(np.eye(4, dtype=np.float32) * 1e-3, (1, 2, 1)))  # token t -> expert t % 4
        routing = route(config, logits)
        np.testing.assert_allclose(routing["aux"], [1.0], rtol=1e-5)
        assert float(routing["dropped"][0]) == 0

    def test_routing_groups_are_sequences(self):
        """A batch's loss is the mean of its sequences' losses: routing does not mix sequences."""
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoELM(MOE, rngs=nnx.Rngs(0))))
        loss = jax.jit(lambda params, tokens, targets: nnx.merge(graphdef, params).loss(tokens, targets))
        tokens, targets = batch(MOE)[0][0], batch(MOE)[1][0]
        each = [loss(model_params(MOE), tokens[i : i + 1], targets[i : i + 1]) for i in range(tokens.shape[0])]
        np.testing.assert_allclose(loss(model_params(MOE), tokens, targets), np.mean(each), rtol=1e-5)


class TestMoEModel:
    def test_parameters(self):
        shapes = jax.tree.map(lambda a: a.shape, model_params(MOE))
        layers, d, e, f = 4, 16, 4, 32
        moe = shapes["blocks"]["moe"]
        assert moe["router"] == (layers, d, e)
        assert moe["experts"] == {"w_gate": (layers, e, d, f), "w_up": (layers, e, d, f), "w_down": (layers, e, f, d)}
        assert moe["shared"]["w_gate"] == (layers, d, f)
        assert shapes["dense_blocks"]["mlp"]["w_up"] == (1, d, f)  # one dense llama block

    def test_balance_loss_is_in_the_loss(self):
        tokens, targets = batch(MOE)[0][0], batch(MOE)[1][0]
        without = dataclasses.replace(MOE, aux_loss_weight=0.0)
        graphdefs = [nnx.graphdef(nnx.eval_shape(lambda c=c: MoELM(c, rngs=nnx.Rngs(0)))) for c in (MOE, without)]

        @jax.jit
        def losses(params, tokens, targets):
            model, plain = (nnx.merge(graphdef, params) for graphdef in graphdefs)
            _, stats = model.hidden(tokens)
            return model.loss(tokens, targets), plain.loss(tokens, targets), stats

        loss, plain_loss, stats = losses(model_params(MOE), tokens, targets)
        assert float(loss - plain_loss) == pytest.approx(0.1 * float(jnp.mean(stats["aux"])), rel=1e-4)
        assert stats["load"].shape == (4, 4) and float(jnp.sum(stats["dropped"])) > 0

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"experts_per_token": 5}, "at most num_experts"),
            ({"num_experts": 0}, "num_experts"),
            ({"capacity_factor": 0.0}, "capacity_factor"),
            ({"dense_layers": -1}, "dense_layers"),
        ],
    )
    def test_config_checks(self, change, message):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(MOE, **change)

    def test_experts_must_divide_over_the_expert_parallel_devices(self):
        config = dataclasses.replace(MOE, num_experts=3, experts_per_token=1)
        schedule = schedules.build("1f1b", 2, 4)
        rules = ShardingRules({**DEFAULT_RULES, "expert": "data"})
        with pytest.raises(ValueError, match="num_experts=3 must divide over 2"):
            PipelinedLM(config, schedule=schedule, mesh=mesh_of((2, 2, 1)), rules=rules)


def test_model_moe_trains_with_dualpipev(tmp_path):
    """`python -m jpipe.train --model moe --schedule dualpipev --expert-parallel`: 2 steps, finite losses."""
    out = tmp_path / "moe"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    args = ["--preset", "tiny", "--model", "moe", "--schedule", "dualpipev", "--virtual", "2", "--microbatches", "4"]
    args += ["--expert-parallel", "--model.num-experts", "4", "--steps", "2", "--eval-every", "2", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "jpipe.train", *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2" in result.stdout
    records = read_metrics(out / "metrics.jsonl")
    losses = [record["loss"] for record in records if "loss" in record]
    assert len(losses) >= 2 and all(np.isfinite(losses))
    routing = ("balance_loss", "dropped_fraction", "expert_load_max", "expert_load_min")
    for record in records:
        assert all(np.isfinite(record[name]) for name in routing), record
        assert 0 <= record["dropped_fraction"] <= 1
        assert 0 <= record["expert_load_min"] <= 0.25 <= record["expert_load_max"] <= 1  # 4 experts
    assert "balance " in result.stdout and "dropped " in result.stdout and "expert load " in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expert-parallel", "--model", "llama"], "parallel.expert_parallel: only for model.family 'moe'"),
        (["--model.num-experts", "3"], "parallel.expert_parallel: 2 data-parallel devices must divide"),
    ],
)
def test_bad_moe_flags_are_one_line_errors(args, message, capsys):
    assert cli.main(["--preset", "tiny", "--model", "moe", "--expert-parallel", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
