"""Building blocks the model families share: norms, rotary positions, initialisers, the pre-norm
block and the registry of each family's block (`block_class`), stacked on a layer axis.

Shapes: B batch, T sequence, D d_model, H heads, K head_dim, L layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jpipe.models.config import GPTConfig

PyTree = Any
F32 = jnp.float32


def wide(dtype) -> jnp.dtype:
    """Where the model computes in float32 (norms, softmax, logits): float64 for float64 values."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(F32)


def attention_dtype(config: GPTConfig, dtype) -> jnp.dtype:
    """The dtype of attention scores and softmax: float32 (`wide`) unless `config.float32_attention` is off."""
    return wide(dtype) if config.float32_attention else jnp.dtype(dtype)


def normal_param(
    rngs: nnx.Rngs, config: GPTConfig, shape: tuple[int, ...], std: float, axes: tuple[str, ...]
) -> nnx.Param:
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
        x32 = x.astype(wide(x.dtype))
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(x32.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return (normed * scale).astype(x.dtype)


def rope(x: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding of `x` `[B, T, H, K]` (positions 0..T-1), in x's dtype."""
    seq, head_dim = x.shape[1], x.shape[3]
    inverse_freq = base ** (-jnp.arange(0, head_dim // 2, dtype=wide(x.dtype)) * (2.0 / head_dim))  # [K/2]
    angles = jnp.arange(seq, dtype=wide(x.dtype))[:, None] * inverse_freq[None, :]  # [T, K/2]
    sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]  # [1, T, 1, K/2]
    x1, x2 = jnp.split(x.astype(wide(x.dtype)), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def document_segments(tokens: jax.Array, document_end: int) -> jax.Array:
    """Int32 `[B, T]`: each token's document within its window (the end-of-document tokens before it).

    An end-of-document token belongs to the document it ends; the next token starts the next one.
    """
    ends = (tokens == document_end).astype(jnp.int32)
    return jnp.cumsum(ends, axis=-1) - ends


def attention_mask(seq: int, segments: jax.Array | None = None) -> jax.Array:
    """Bool `[1 or B, T, T]` (query, key): causal, and with `segments` `[B, T]` also within one document."""
    causal = jnp.tril(jnp.ones((seq, seq), jnp.bool_))[None]
    if segments is None:
        return causal
    return causal & (segments[:, :, None] == segments[:, None, :])


class PreNormBlock(nnx.Module):
    """Pre-norm transformer block: `x + attention(norm(x))`, then `+ mlp(norm(.))`.

    A family's block subclasses it and names its own `attention_class` and `mlp_class`.
    """

    attention_class: type[nnx.Module]
    mlp_class: type[nnx.Module]

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config)
        self.attention = self.attention_class(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config)
        self.mlp = self.mlp_class(config, rngs=rngs)

    def __call__(self, x: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        """`[B, T, D] -> [B, T, D]` in x's dtype (the residual dtype); branches in the compute dtype.

        `segments` `[B, T]` (`document_segments`): attention stays within each token's document.
        """
        dtype = self.attention.config.dtype
        with jax.named_scope("attention"):
            x = x + self.attention(self.attention_norm(x).astype(dtype), segments).astype(x.dtype)
        with jax.named_scope("mlp"):
            return x + self.mlp(self.mlp_norm(x).astype(dtype)).astype(x.dtype)


BLOCK_CLASSES: dict[str, type[nnx.Module]] = {}
"""`config.family` -> its block (`register_block`): "gpt" (`jpipe.models.gpt.Block`), "llama", ..."""


def register_block(family: str):
    """Class decorator: the block of `family` (`GPTConfig.family`)."""

    def register(block: type[nnx.Module]) -> type[nnx.Module]:
        BLOCK_CLASSES[family] = block
        return block

    return register


def block_class(config: GPTConfig) -> type[nnx.Module]:
    """The block of `config.family` (`BLOCK_CLASSES`)."""
    return BLOCK_CLASSES[config.family]


def stacked_blocks(
    config: GPTConfig, rngs: nnx.Rngs, block: type[nnx.Module] | None = None, count: int | None = None
) -> nnx.Module:
    """`count` blocks (default `config.num_layers`) of class `block` (default: the config's family's)
    as one block whose parameters have a leading `[L]` axis."""
    block = block_class(config) if block is None else block
    count = config.num_layers if count is None else count

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return block(config, rngs=rngs)

    blocks = create(rngs)
    for _, variable in nnx.iter_graph(blocks):
        if isinstance(variable, nnx.Param):
            variable.set_metadata("logical_axes", ("layer", *variable.get_metadata("logical_axes")))
    return blocks
