"""A GPT-style decoder language model in Flax NNX, with blocks stacked on a leading layer axis.

Every parameter carries a `logical_axes` metadata entry naming its dimensions ("embed", "heads",
"mlp", ...); `jpipe.parallel.ShardingRules` maps those names to mesh axes. Blocks are created by
`nnx.split_rngs` + `nnx.vmap`, so the block parameters are single arrays with a leading `[L]` layer
axis (logical name "layer"), ready to be regrouped into pipeline stages (`jpipe.models.layout`).

Shapes: B batch, T sequence, D d_model, H heads, K head_dim, F mlp width, V vocabulary, L layers.
Activations between blocks are `[B, T, D]` in `config.residual_dtype` (the compute dtype, or
float32 with `fp32_residual`); matmuls run in the compute dtype; norms, softmax and the loss in
float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpipe.models.config import GPTConfig
from jpipe.models.layers import (
    PreNormBlock,
    RMSNorm,
    attention_dtype,
    attention_mask,
    document_segments,
    normal_param,
    register_block,
    rope,
    stacked_blocks,
    wide,
)

PyTree = Any


class Attention(nnx.Module):
    """Causal multi-head self-attention; q/k/v split by head (column-parallel), out row-parallel."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, k = config.d_model, config.num_heads, config.head_dim
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.num_layers)
        self.wq = normal_param(rngs, config, (d, h, k), std, ("embed", "heads", "head_dim"))
        self.wk = normal_param(rngs, config, (d, h, k), std, ("embed", "heads", "head_dim"))
        self.wv = normal_param(rngs, config, (d, h, k), std, ("embed", "heads", "head_dim"))
        self.wo = normal_param(rngs, config, (h, k, d), out_std, ("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        """`[B, T, D] -> [B, T, D]`; with `segments` `[B, T]`, a token attends only within its document."""
        config, dtype = self.config, self.config.dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dtype))  # [B, T, H, K]
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dtype))
        if config.positions == "rope":
            q, k = rope(q, config.rope_base), rope(k, config.rope_base)
        wide = attention_dtype(config, dtype)
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=wide)  # [B, H, T, T]
        scores = scores * (1.0 / math.sqrt(config.head_dim))
        mask = attention_mask(x.shape[1], segments)[:, None]  # [1 or B, 1, T, T]
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attended = jnp.einsum("bhqs,bshk->bqhk", weights, v)  # [B, T, H, K]
        return jnp.einsum("bthk,hkd->btd", attended, self.wo[...].astype(dtype))


class MLP(nnx.Module):
    """GELU MLP; the up-projection is column-parallel, the down-projection row-parallel."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.num_layers)
        self.w_up = normal_param(rngs, config, (config.d_model, config.d_ff), std, ("embed", "mlp"))
        self.w_down = normal_param(rngs, config, (config.d_ff, config.d_model), out_std, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, T, D] -> [B, T, D]`."""
        dtype = self.config.dtype
        hidden = jax.nn.gelu(jnp.einsum("btd,df->btf", x, self.w_up[...].astype(dtype)))  # [B, T, F]
        return jnp.einsum("btf,fd->btd", hidden, self.w_down[...].astype(dtype))


@register_block("gpt")
class Block(PreNormBlock):
    """The GPT block: causal multi-head attention and a GELU MLP, pre-RMSNorm."""

    attention_class = Attention
    mlp_class = MLP


class Embed(nnx.Module):
    """Token embedding, plus a learned position table when `config.learned_positions`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        std = config.init_std
        self.tokens = normal_param(rngs, config, (config.vocab_size, config.d_model), std, ("vocab", "embed"))
        if config.learned_positions:
            self.positions = normal_param(rngs, config, (config.seq_len, config.d_model), std, ("position", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Token ids `[B, T]` -> activations `[B, T, D]` in the residual dtype."""
        seq = tokens.shape[-1]
        if seq > self.config.seq_len:
            raise ValueError(f"tokens: sequence length {seq} exceeds GPTConfig.seq_len={self.config.seq_len}")
        x = jnp.take(self.tokens[...], tokens, axis=0)  # [B, T, D]
        if self.config.learned_positions:
            x = x + self.positions[...][None, :seq]
        return x.astype(self.config.residual_dtype)


class Head(nnx.Module):
    """Final norm and the projection to vocabulary logits (the embedding table when tied)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.norm = RMSNorm(config)
        if not config.tie_embeddings:
            # Stored [V, D], as the embedding table is; drawn [D, V] and transposed so that a seed
            # gives the same model as when the head was stored [D, V].
            drawn = normal_param(rngs, config, (config.d_model, config.vocab_size), config.init_std, ("embed", "vocab"))
            self.out = nnx.Param(drawn[...].T, logical_axes=("vocab", "embed"))

    def __call__(self, x: jax.Array, table: jax.Array | None = None) -> jax.Array:
        """`[B, T, D]` -> float32 logits `[B, T, V]`; `table` `[V, D]` is the tied embedding."""
        dtype = self.config.dtype
        h = self.norm(x).astype(dtype)
        out_dtype = wide(dtype)
        if self.config.tie_embeddings:
            if table is None:
                raise ValueError("Head: tie_embeddings=True needs the embedding table")
            return jnp.einsum("btd,vd->btv", h, table.astype(dtype), preferred_element_type=out_dtype)
        return jnp.einsum("btd,vd->btv", h, self.out[...].astype(dtype), preferred_element_type=out_dtype)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of float32 logits `[B, T, V]` against ids `[B, T]`: a scalar.

    The target logit is picked with a one-hot product rather than a gather, so a vocabulary split
    over `tensor` needs only reductions.
    """
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return jnp.mean(log_z - picked)


class GPT(nnx.Module):
    """The whole model, unpipelined: `GPT(config, rngs=nnx.Rngs(0))(tokens) -> logits`.

    Its blocks are those of `config.family` (`jpipe.models.layers.block_class`): GPT blocks, or llama blocks.

    Parameter tree (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`):
    `{"embed": {"tokens": [V, D], "positions": [T, D]?}, "blocks": {...: [L, ...]},
    "head": {"norm": {"scale": [D]}, "out": [V, D]?}}` (an untied head is stored as the embedding table
    is, `[V, D]`, like torch's `lm_head.weight`).
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config, rngs=rngs)
        self.blocks = stacked_blocks(config, rngs)
        self.head = Head(config, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Token ids `[B, T]` -> float32 logits `[B, T, V]`.

        With `config.document_end` set, attention stays within each document of the window.
        """
        segments = self.segments(tokens)

        @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
        def run(block: nnx.Module, x: jax.Array, segments: jax.Array | None) -> jax.Array:
            return block(x, segments)

        x = run(self.blocks, self.embed(tokens), segments)
        return self.head(x, self.embed.tokens[...] if self.config.tie_embeddings else None)

    def segments(self, tokens: jax.Array) -> jax.Array | None:
        """Each token's document `[B, T]` (`document_segments`), or None when attention crosses documents."""
        end = self.config.document_end
        return None if end is None else document_segments(tokens, end)

    def loss(self, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean cross-entropy of next-token prediction; tokens and targets `[B, T]`."""
        return cross_entropy(self(tokens), targets)


def logical_axes(module: nnx.Module) -> PyTree:
    """The `logical_axes` of every parameter, as a pure dict shaped like the module's parameters."""
    state = nnx.state(module, nnx.Param)
    names = jax.tree.map(lambda v: v.get_metadata("logical_axes"), state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(names)


def params_of(module: nnx.Module) -> PyTree:
    """The parameters of `module` as a pure nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))
