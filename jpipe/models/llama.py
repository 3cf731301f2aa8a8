"""The llama family's block: grouped-query attention with RoPE, SwiGLU MLP, RMSNorm pre-norm.

`GPTConfig(family="llama", num_kv_heads=...)` builds `GPT` (the shared shell: token embedding,
stacked blocks, final RMSNorm and an untied head unless `tie_embeddings`) with `LlamaBlock` as its
block, so the pipeline (`PipelinedLM`), sharding rules, checkpoints and the training loop run it
unchanged. Parameters use the GPT's logical axis names: key/value projections are split over
`tensor` on their "heads" axis like the queries, so `num_kv_heads` must divide by the tensor size.

Shapes: B batch, T sequence, D d_model, H query heads, N key/value heads, G = H / N query heads per
key/value head, K head_dim, F mlp width (of each SwiGLU branch).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jpipe.models.config import GPTConfig
from jpipe.models.layers import PreNormBlock, attention_dtype, attention_mask, normal_param, register_block, rope


def llama_config(**changes) -> GPTConfig:
    """A `GPTConfig` of the llama family (RoPE, untied head); `changes` set any other field."""
    return GPTConfig(**{"family": "llama", "positions": "rope", **changes})


class GroupedQueryAttention(nnx.Module):
    """Causal attention with N key/value heads shared by groups of G query heads; RoPE on q and k.

    Query head h reads key/value head h // G. q/k/v are column-parallel (split on "heads"), the
    output projection row-parallel, as in the GPT's attention.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h, n, k = config.d_model, config.num_heads, config.kv_heads, config.head_dim
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.num_layers)
        self.wq = normal_param(rngs, config, (d, h, k), std, ("embed", "heads", "head_dim"))
        self.wk = normal_param(rngs, config, (d, n, k), std, ("embed", "heads", "head_dim"))
        self.wv = normal_param(rngs, config, (d, n, k), std, ("embed", "heads", "head_dim"))
        self.wo = normal_param(rngs, config, (h, k, d), out_std, ("heads", "head_dim", "embed"))

    def __call__(self, x: jax.Array, segments: jax.Array | None = None) -> jax.Array:
        """`[B, T, D] -> [B, T, D]`; with `segments` `[B, T]`, a token attends only within its document."""
        config, dtype = self.config, self.config.dtype
        batch, seq = x.shape[0], x.shape[1]
        n, k = config.kv_heads, config.head_dim
        q = rope(jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dtype)), config.rope_base)  # [B, T, H, K]
        keys = rope(jnp.einsum("btd,dnk->btnk", x, self.wk[...].astype(dtype)), config.rope_base)  # [B, T, N, K]
        values = jnp.einsum("btd,dnk->btnk", x, self.wv[...].astype(dtype))  # [B, T, N, K]
        q = q.reshape(batch, seq, n, config.num_heads // n, k)  # [B, T, N, G, K]
        wide = attention_dtype(config, q.dtype)
        scores = jnp.einsum("bqngk,bsnk->bngqs", q, keys, preferred_element_type=wide)  # [B, N, G, T, T]
        scores = scores * (1.0 / math.sqrt(k))
        mask = attention_mask(seq, segments)[:, None, None]  # [1 or B, 1, 1, T, T]
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attended = jnp.einsum("bngqs,bsnk->bqngk", weights, values)  # [B, T, N, G, K]
        attended = attended.reshape(batch, seq, config.num_heads, k)  # [B, T, H, K]
        return jnp.einsum("bthk,hkd->btd", attended, self.wo[...].astype(dtype))


class SwiGLU(nnx.Module):
    """`down(silu(x @ gate) * (x @ up))`; gate and up column-parallel, down row-parallel."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.num_layers)
        self.w_gate = normal_param(rngs, config, (config.d_model, config.d_ff), std, ("embed", "mlp"))
        self.w_up = normal_param(rngs, config, (config.d_model, config.d_ff), std, ("embed", "mlp"))
        self.w_down = normal_param(rngs, config, (config.d_ff, config.d_model), out_std, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, T, D] -> [B, T, D]`."""
        dtype = self.config.dtype
        gate = jnp.einsum("btd,df->btf", x, self.w_gate[...].astype(dtype))  # [B, T, F]
        up = jnp.einsum("btd,df->btf", x, self.w_up[...].astype(dtype))  # [B, T, F]
        return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.w_down[...].astype(dtype))


@register_block("llama")
class LlamaBlock(PreNormBlock):
    """Pre-RMSNorm block: `x + attention(norm(x))`, then `+ swiglu(norm(.))`."""

    attention_class = GroupedQueryAttention
    mlp_class = SwiGLU
