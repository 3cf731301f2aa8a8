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
from jax import lax

from jpipe.models.config import GPTConfig

PyTree = Any
F32 = jnp.float32


def _wide(dtype) -> jnp.dtype:
    """Where the model computes in float32 (norms, softmax, logits): float64 for float64 values."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(F32)


def attention_dtype(config: GPTConfig, dtype) -> jnp.dtype:
    """The dtype of attention scores and softmax: float32 (`_wide`) unless `config.float32_attention` is off."""
    return _wide(dtype) if config.float32_attention else jnp.dtype(dtype)


def _normal(rngs: nnx.Rngs, config: GPTConfig, shape: tuple[int, ...], std: float, axes: tuple[str, ...]) -> nnx.Param:
    """A parameter drawn from N(0, std^2), named by its logical axes."""
    value = std * jax.random.normal(rngs.params(), shape, config.params_dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, computed in float32."""

    def __init__(self, config: GPTConfig):
        self.eps = config.norm_eps
        self.scale = nnx.Param(jnp.ones((config.d_model,), config.params_dtype), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., D] -> [..., D]` in x's dtype."""
        x32 = x.astype(_wide(x.dtype))
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(x32.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return (normed * scale).astype(x.dtype)


def rope(x: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding of `x` `[B, T, H, K]` (positions 0..T-1), in x's dtype."""
    seq, head_dim = x.shape[1], x.shape[3]
    inverse_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=_wide(x.dtype)) * (2.0 / head_dim))  # [K/2]
    angles = jnp.arange(seq, dtype=_wide(x.dtype))[:, None] * inverse_freq[None, :]  # [T, K/2]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]  # [1, T, 1, K/2]
    x1, x2 = jnp.split(x.astype(_wide(x.dtype)), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention; q/k/v split by head (column-parallel), out row-parallel."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, k = config.d_model, config.num_heads, config.head_dim
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.num_layers)
        self.wq = _normal(rngs, config, (d, h, k), std, ("embed", "heads", "head_dim"))
        self.wk = _normal(rngs, config, (d, h, k), std, ("embed", "heads", "head_dim"))
        self.wv = _normal(rngs, config, (d, h, k), std, ("embed", "heads", "head_dim"))
        self.wo = _normal(rngs, config, (h, k, d), out_std, ("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, T, D] -> [B, T, D]`."""
        config, dtype = self.config, self.config.dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dtype))  # [B, T, H, K]
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dtype))
        if config.positions == "rope":
            q, k = rope(q, config.rope_base), rope(k, config.rope_base)
        wide = attention_dtype(config, dtype)
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=wide)  # [B, H, T, T]
        scores = scores * (1.0 / math.sqrt(config.head_dim))
        seq = x.shape[1]
        causal = jnp.tril(jnp.ones((seq, seq), jnp.bool_))[None, None]  # [1, 1, T, T]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attended = jnp.einsum("bhqs,bshk->bqhk", weights, v)  # [B, T, H, K]
        return jnp.einsum("bthk,hkd->btd", attended, self.wo[...].astype(dtype))


class MLP(nnx.Module):
    """GELU MLP; the up-projection is column-parallel, the down-projection row-parallel."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.num_layers)
        self.w_up = _normal(rngs, config, (config.d_model, config.d_ff), std, ("embed", "mlp"))
        self.w_down = _normal(rngs, config, (config.d_ff, config.d_model), out_std, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, T, D] -> [B, T, D]`."""
        dtype = self.config.dtype
        hidden = jax.nn.gelu(jnp.einsum("btd,df->btf", x, self.w_up[...].astype(dtype)))  # [B, T, F]
        return jnp.einsum("btf,fd->btd", hidden, self.w_down[...].astype(dtype))


class Block(nnx.Module):
    """Pre-norm transformer block: `x + attention(norm(x))`, then `+ mlp(norm(.))`.

    A family's block subclasses it and names its own `attention_class` and `mlp_class`.
    """

    attention_class: type[nnx.Module] = Attention
    mlp_class: type[nnx.Module] = MLP

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config)
        self.attention = self.attention_class(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config)
        self.mlp = self.mlp_class(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, T, D] -> [B, T, D]` in x's dtype (the residual dtype); branches in the compute dtype."""
        dtype = self.attention.config.dtype
        with jax.named_scope("attention"):
            x = x + self.attention(self.attention_norm(x).astype(dtype)).astype(x.dtype)
        with jax.named_scope("mlp"):
            return x + self.mlp(self.mlp_norm(x).astype(dtype)).astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding, plus a learned position table when `config.learned_positions`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        std = config.init_std
        self.tokens = _normal(rngs, config, (config.vocab_size, config.d_model), std, ("vocab", "embed"))
        if config.learned_positions:
            self.positions = _normal(rngs, config, (config.seq_len, config.d_model), std, ("position", "embed"))

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
            drawn = _normal(rngs, config, (config.d_model, config.vocab_size), config.init_std, ("embed", "vocab"))
            self.out = nnx.Param(drawn[...].T, logical_axes=("vocab", "embed"))

    def __call__(self, x: jax.Array, table: jax.Array | None = None) -> jax.Array:
        """`[B, T, D]` -> float32 logits `[B, T, V]`; `table` `[V, D]` is the tied embedding."""
        dtype = self.config.dtype
        h = self.norm(x).astype(dtype)
        out_dtype = _wide(dtype)
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


def block_class(config: GPTConfig) -> type[nnx.Module]:
    """The block of `config.family`: `Block` (gpt) or `jpipe.models.llama.LlamaBlock` (llama)."""
    if config.family == "llama":
        from jpipe.models.llama import LlamaBlock  # llama builds on this module's pieces

        return LlamaBlock
    return Block


def stacked_blocks(config: GPTConfig, rngs: nnx.Rngs) -> nnx.Module:
    """`config.num_layers` blocks of the config's family as one block whose parameters have a leading `[L]` axis."""
    block = block_class(config)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return block(config, rngs=rngs)

    blocks = create(rngs)
    for _, variable in nnx.iter_graph(blocks):
        if isinstance(variable, nnx.Param):
            variable.set_metadata("logical_axes", ("layer", *variable.get_metadata("logical_axes")))
    return blocks


class GPT(nnx.Module):
    """The whole model, unpipelined: `GPT(config, rngs=nnx.Rngs(0))(tokens) -> logits`.

    Its blocks are those of `config.family` (`block_class`): GPT blocks, or llama blocks.

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
        """Token ids `[B, T]` -> float32 logits `[B, T, V]`."""

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block: nnx.Module, x: jax.Array) -> jax.Array:
            return block(x)

        x = run(self.blocks, self.embed(tokens))
        return self.head(x, self.embed.tokens[...] if self.config.tie_embeddings else None)

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
