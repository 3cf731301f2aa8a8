"""The moe family: a DeepSeek-style mixture-of-experts decoder, pipelined like GPT and Llama.

`GPTConfig(family="moe", ...)` (`moe_config(...)`) builds `MoELM`: the GPT shell (token embedding,
final RMSNorm, untied head unless `tie_embeddings`), `dense_layers` llama blocks, then `num_layers`
MoE blocks stacked on a layer axis. An MoE block is pre-RMSNorm grouped-query attention with RoPE
(the llama family's) and, in place of the MLP, `MoE`: `shared_experts` SwiGLU experts every token
goes through, plus `num_experts` routed SwiGLU experts of which each token takes its top
`experts_per_token` by router probability, weighted by that probability (softmax over all experts,
not renormalised over the chosen ones, as DeepSeek-V2).

Routing is capacity-based dense dispatch, exact and the same on every backend: routing groups are
sequences. Each expert takes at most `config.expert_capacity(T)` tokens of a sequence, in priority
order (all first choices of the sequence in token order, then all second choices, ...); a choice
past the capacity is dropped (the token keeps its residual and shared-expert path). Tokens reach
their expert slots with one-hot dispatch and combine tensors `[B, T, E, C]` (einsums, no gathers,
no sorting), so routing is deterministic and differentiable in the gate weights. Because a routing
group is one sequence, the routing (and hence the loss) does not depend on how a batch is split
into microbatches or over data-parallel devices: the pipelined model matches the unpipelined one
exactly on any mesh.

Load balancing: DeepSeek's sequence-wise auxiliary loss, per sequence `sum_i f_i P_i` with `f_i =
E / (k T) x` (choices of expert i in the sequence, before capacity) and `P_i` the mean router
probability of expert i over the sequence; summed over the MoE layers, averaged over sequences,
times `aux_loss_weight`, added to the cross-entropy. In the pipeline the running per-sequence sum
travels with the activation (`{"x": [B, T, D], "aux": [B], "load": [B, E], "dropped": [B]}`) from
stage to stage, and the loss at the last stage adds it, so its gradient reaches every stage's router.

Routing statistics travel the same way: `load` (choices per expert, before capacity) and `dropped`
(choices past capacity), summed over the MoE layers per sequence (no gradient). At the last stage
`head_loss_and_metrics` turns them into the metrics the pipeline returns beside the loss
(`routing_metrics`: `balance_loss`, `expert_load` `[E]`, `dropped_fraction`).

Shapes: B batch, T sequence, D d_model, E routed experts, k experts per token, C capacity, F one
expert's width (`config.expert_width`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jpipe.models.config import GPTConfig
from jpipe.models.gpt import GPT, cross_entropy
from jpipe.models.layers import RMSNorm, normal_param, register_block, stacked_blocks
from jpipe.models.llama import GroupedQueryAttention, LlamaBlock

PyTree = Any
F32 = jnp.float32


def moe_config(**changes) -> GPTConfig:
    """A `GPTConfig` of the moe family (RoPE, untied head); `changes` set any other field."""
    return GPTConfig(**{"family": "moe", "positions": "rope", **changes})


def route(config: GPTConfig, logits: jax.Array) -> dict[str, jax.Array]:
    """Top-k routing of router logits `[B, T, E]` with per-sequence expert capacity.

    Returns float32 `dispatch` `[B, T, E, C]` (1 where a token fills an expert slot), `combine`
    (dispatch times the token's gate for that expert; differentiable in the logits), and per
    sequence: `aux` `[B]` (the balance loss, `sum_i f_i P_i`), `dropped` `[B]` (choices past
    capacity) and `load` `[B, E]` (choices per expert, before capacity).
    """
    batch, seq, experts = logits.shape
    k, capacity = config.experts_per_token, config.expert_capacity(seq)
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)  # [B, T, E]
    gates, chosen = lax.top_k(probs, k)  # [B, T, k]
    choice = jax.nn.one_hot(chosen, experts, dtype=jnp.int32)  # [B, T, k, E]
    # Priority: every token's first choice (in token order), then every second choice, ...
    ordered = jnp.swapaxes(choice, 1, 2).reshape(batch, k * seq, experts)  # [B, k*T, E]
    position = jnp.cumsum(ordered, axis=1) - 1  # slot an (ordered) choice takes in its expert
    position = jnp.sum(position * ordered, axis=-1).reshape(batch, k, seq)  # [B, k, T]
    slot = jax.nn.one_hot(jnp.swapaxes(position, 1, 2), capacity, dtype=F32)  # [B, T, k, C]; 0 past capacity
    choice = choice.astype(F32)
    dispatch = jnp.einsum("btke,btkc->btec", choice, slot)
    combine = jnp.einsum("btke,btkc,btk->btec", choice, slot, gates)
    load = jnp.sum(choice, axis=(1, 2))  # [B, E]
    fraction = lax.stop_gradient(load) * (experts / (k * seq))  # f_i
    aux = jnp.sum(fraction * jnp.mean(probs, axis=1), axis=-1)  # [B]
    dropped = k * seq - jnp.sum(slot, axis=(1, 2, 3))  # [B]
    return {"dispatch": dispatch, "combine": combine, "aux": aux, "dropped": dropped, "load": load}


def _bound(axis: str | None) -> bool:
    """Whether `axis` names a mesh axis of the enclosing `shard_map` (the pipeline's shape checks and
    cost measurements trace a stage outside it: there the experts run whole on one device)."""
    if axis is None:
        return False
    try:
        lax.axis_size(axis)
    except NameError:
        return False
    return True


class Experts(nnx.Module):
    """`num_experts` SwiGLU experts stacked on a leading "expert" axis, applied to their slots."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        e, d, f = config.num_experts, config.d_model, config.expert_width
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * (config.num_layers + config.dense_layers))
        self.w_gate = normal_param(rngs, config, (e, d, f), std, ("expert", "embed", "mlp"))
        self.w_up = normal_param(rngs, config, (e, d, f), std, ("expert", "embed", "mlp"))
        self.w_down = normal_param(rngs, config, (e, f, d), out_std, ("expert", "mlp", "embed"))

    def __call__(self, slots: jax.Array, expert_axis: str | None = None) -> jax.Array:
        """Expert inputs `[B, E, C, D]` -> outputs `[B, E, C, D]` (expert e on slots `[:, e]`).

        `expert_axis`: a manual mesh axis (inside `shard_map`) of n devices that share the experts:
        device r computes experts `r E/n ... (r+1) E/n - 1` for the slots of all n devices, which
        reach it and return with `all_to_all` (expert parallelism).
        """
        dtype = self.config.dtype
        weights = [self.w_gate[...], self.w_up[...], self.w_down[...]]
        expert_axis = expert_axis if _bound(expert_axis) else None
        if expert_axis is not None:
            n = lax.axis_size(expert_axis)
            local = self.config.num_experts // n
            start = lax.axis_index(expert_axis) * local
            weights = [lax.dynamic_slice_in_dim(w, start, local, axis=0) for w in weights]
            # [B, E, C, D] -> [n B, E/n, C, D]: every device's slots of this device's experts.
            slots = lax.all_to_all(slots, expert_axis, split_axis=1, concat_axis=0, tiled=True)
        w_gate, w_up, w_down = (w.astype(dtype) for w in weights)
        gate = jnp.einsum("becd,edf->becf", slots, w_gate)
        up = jnp.einsum("becd,edf->becf", slots, w_up)
        out = jnp.einsum("becf,efd->becd", jax.nn.silu(gate) * up, w_down)
        if expert_axis is not None:
            out = lax.all_to_all(out, expert_axis, split_axis=0, concat_axis=1, tiled=True)  # back: [B, E, C, D]
        return out


class SharedExperts(nnx.Module):
    """The shared experts as one SwiGLU of `shared_experts x expert_width` hidden units."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, f = config.d_model, config.shared_experts * config.expert_width
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * (config.num_layers + config.dense_layers))
        self.w_gate = normal_param(rngs, config, (d, f), std, ("embed", "mlp"))
        self.w_up = normal_param(rngs, config, (d, f), std, ("embed", "mlp"))
        self.w_down = normal_param(rngs, config, (f, d), out_std, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.config.dtype
        gate = jnp.einsum("btd,df->btf", x, self.w_gate[...].astype(dtype))
        up = jnp.einsum("btd,df->btf", x, self.w_up[...].astype(dtype))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.w_down[...].astype(dtype))


class MoE(nnx.Module):
    """Router, routed experts and shared experts: `[B, T, D] -> ([B, T, D], routing statistics)`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.router = normal_param(rngs, config, (config.d_model, config.num_experts), config.init_std, ("embed", None))
        self.experts = Experts(config, rngs=rngs)
        if config.shared_experts:
            self.shared = SharedExperts(config, rngs=rngs)

    def __call__(self, x: jax.Array, expert_axis: str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`x` `[B, T, D]` (compute dtype) -> the experts' sum `[B, T, D]`, and `route`'s `aux`, `dropped`, `load`.

        `expert_axis`: see `Experts.__call__` (None: every device computes every expert).
        """
        dtype = self.config.dtype
        logits = jnp.einsum("btd,de->bte", x, self.router[...].astype(dtype), preferred_element_type=F32)
        routing = route(self.config, logits)
        slots = jnp.einsum("btec,btd->becd", routing["dispatch"].astype(dtype), x)  # [B, E, C, D]
        out = self.experts(slots, expert_axis)
        y = jnp.einsum("btec,becd->btd", routing["combine"].astype(dtype), out)
        if self.config.shared_experts:
            y = y + self.shared(x)
        return y, {name: routing[name] for name in ("aux", "dropped", "load")}


@register_block("moe")
class MoEBlock(nnx.Module):
    """Pre-RMSNorm block: `x + attention(norm(x))`, then `+ moe(norm(.))`; returns the routing statistics too."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config)
        self.attention = GroupedQueryAttention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config)
        self.moe = MoE(config, rngs=rngs)

    def __call__(
        self, x: jax.Array, segments: jax.Array | None = None, expert_axis: str | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`[B, T, D] -> ([B, T, D], statistics)`, x in the residual dtype; branches in the compute dtype.

        `expert_axis`: the manual mesh axis the experts are computed over (`Experts.__call__`).
        """
        dtype = self.attention.config.dtype
        with jax.named_scope("attention"):
            x = x + self.attention(self.attention_norm(x).astype(dtype), segments).astype(x.dtype)
        with jax.named_scope("moe"):
            y, stats = self.moe(self.mlp_norm(x).astype(dtype), expert_axis)
        return x + y.astype(x.dtype), stats


class MoELM(GPT):
    """The moe family's whole model, unpipelined (`GPT` with dense first layers and MoE blocks).

    Parameter tree: the GPT's (`embed`, `blocks` `[num_layers, ...]`, `head`), plus `dense_blocks`
    `[dense_layers, ...]` (llama blocks) when `dense_layers > 0`.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        if config.dense_layers:
            self.dense_blocks = stacked_blocks(config, rngs, LlamaBlock, config.dense_layers)

    def first(self, tokens: jax.Array) -> dict[str, jax.Array]:
        """Token ids `[B, T]` -> the activation entering the MoE blocks: `{"x", "aux", "load", "dropped",
        ["segments"]}`.

        The embedding, then the dense blocks; float32 zeros for the running sums over the MoE
        layers: `aux` `[B]` (balance loss), `load` `[B, E]` and `dropped` `[B]` (routing statistics).
        """
        x = self.embed(tokens)
        segments = self.segments(tokens)
        if self.config.dense_layers:

            @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
            def dense(block: nnx.Module, x: jax.Array, segments: jax.Array | None) -> jax.Array:
                return block(x, segments)

            x = dense(self.dense_blocks, x, segments)
        # Zeros computed from the tokens, so that inside the pipeline's shard_map they vary over its axes as x does.
        zeros = (tokens[:, 0] * 0).astype(F32)  # [B]
        load = zeros[:, None] + jnp.zeros((1, self.config.num_experts), F32)
        activation = {"x": x, "aux": zeros, "load": load, "dropped": zeros}
        if segments is not None:
            # Float32 as the pipeline carries them (exact for ids up to 2^24; no gradient).
            activation["segments"] = segments.astype(F32)
        return activation

    def hidden(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Token ids `[B, T]` -> the last block's output `[B, T, D]`, and statistics summed over the MoE layers."""
        activation = self.first(tokens)

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block: nnx.Module, activation: dict) -> dict:
            return moe_layer(block, activation)

        last = run(self.blocks, activation)
        return last["x"], {name: last[name] for name in ("aux", "load", "dropped")}

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Token ids `[B, T]` -> float32 logits `[B, T, V]`."""
        x, _ = self.hidden(tokens)
        return self.head(x, self.embed.tokens[...] if self.config.tie_embeddings else None)

    def loss(self, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean next-token cross-entropy plus `aux_loss_weight` x the mean per-sequence balance loss."""
        return self.loss_and_metrics(tokens, targets)[0]

    def loss_and_metrics(self, tokens: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`loss` and the routing metrics of the batch (`routing_metrics`)."""
        x, stats = self.hidden(tokens)
        return head_loss_and_metrics(self, {"x": x, **stats}, targets)


def moe_layer(
    block: MoEBlock, activation: dict[str, jax.Array], expert_axis: str | None = None
) -> dict[str, jax.Array]:
    """One MoE block on the activation `{"x", "aux", "load", "dropped", ["segments"]}`: the next
    activation, the block's balance loss added to `aux` and its routing statistics to `load` `[B, E]`
    and `dropped` `[B]`.

    `expert_axis`: the manual mesh axis the experts are computed over (expert parallelism), or None."""
    segments = activation.get("segments")
    segments = None if segments is None else lax.stop_gradient(segments)
    x, stats = block(activation["x"], segments, expert_axis)
    return {
        **activation,
        "x": x,
        "aux": activation["aux"] + stats["aux"],
        "load": activation["load"] + lax.stop_gradient(stats["load"]),
        "dropped": activation["dropped"] + lax.stop_gradient(stats["dropped"]),
    }


def head_loss(model: MoELM, activation: dict[str, jax.Array], targets: jax.Array) -> jax.Array:
    """Final norm, head and mean cross-entropy, plus the weighted mean balance loss: a scalar."""
    table = model.embed.tokens[...] if model.config.tie_embeddings else None
    loss = cross_entropy(model.head(activation["x"], table), targets)
    if model.config.aux_loss_weight:
        loss = loss + model.config.aux_loss_weight * jnp.mean(activation["aux"])
    return loss


def routing_metrics(config: GPTConfig, activation: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch's routing metrics from the last MoE block's activation (float32, no gradient).

    With `n = num_layers x experts_per_token x T` routed choices per sequence:
      balance_loss: the mean per-sequence balance loss `aux` (unweighted; summed over the MoE
        layers, so `num_layers` when balanced), a scalar.
      expert_load: `[E]`, the fraction of routed choices that chose each expert (before capacity),
        mean over sequences (and hence over the MoE layers); sums to 1.
      dropped_fraction: choices past capacity / all routed choices, a scalar.
    """
    seq = activation["x"].shape[1]
    choices = max(config.num_layers * config.experts_per_token * seq, 1)
    load, dropped = (lax.stop_gradient(activation[name]) for name in ("load", "dropped"))
    return {
        "balance_loss": jnp.mean(lax.stop_gradient(activation["aux"])),
        "expert_load": jnp.mean(load, axis=0) / choices,
        "dropped_fraction": jnp.mean(dropped) / choices,
    }


def head_loss_and_metrics(
    model: MoELM, activation: dict[str, jax.Array], targets: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`head_loss` and `routing_metrics`: the pipeline's `has_aux` loss function for the moe family."""
    return head_loss(model, activation, targets), routing_metrics(model.config, activation)


def activation_shape(config: GPTConfig, batch: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
    """What passes between the stages of an moe model (`MoELM.first`'s output's shapes)."""
    shapes = {
        "x": jax.ShapeDtypeStruct((batch, seq, config.d_model), config.residual_dtype),
        "aux": jax.ShapeDtypeStruct((batch,), F32),
        "load": jax.ShapeDtypeStruct((batch, config.num_experts), F32),
        "dropped": jax.ShapeDtypeStruct((batch,), F32),
    }
    if config.document_end is not None:
        shapes["segments"] = jax.ShapeDtypeStruct((batch, seq), F32)
    return shapes


def lm_class(config: GPTConfig) -> type[GPT]:
    """The whole model's class for `config.family`: `MoELM` for moe, else `GPT`."""
    return MoELM if config.moe else GPT
