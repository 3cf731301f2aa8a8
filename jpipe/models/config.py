"""Configuration of the GPT-style decoder language model."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

POSITIONS = ("learned", "rope")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """A decoder-only language model: token embedding, pre-norm causal attention + MLP blocks, head.

    Attributes:
      vocab_size: number of token ids.
      seq_len: the longest sequence (learned position table length; RoPE works up to any length,
        but inputs are checked against it).
      d_model: width of the residual stream.
      num_heads: attention heads; `d_model` must divide by it (head_dim = d_model / num_heads).
      num_layers: transformer blocks.
      mlp_ratio: MLP hidden width = mlp_ratio * d_model.
      positions: "learned" (a [seq_len, d_model] table added to the token embedding) or "rope"
        (rotary embeddings on queries and keys; no position parameters).
      tie_embeddings: the head reuses the token embedding table (transposed).
      compute_dtype: "float32", or "bfloat16" (activations and matmuls in bfloat16; norms, softmax
        and the loss in float32). Parameters are always stored in `param_dtype`.
      param_dtype: "float32" (default) or "bfloat16".
      fp32_residual: keep the residual stream (the activation between blocks and between pipeline
        stages) in float32 while blocks compute in `compute_dtype` (Megatron's
        `--fp32-residual-connection`): better precision, twice the bytes sent between stages.
      norm_eps: RMSNorm epsilon.
      rope_base: RoPE frequency base.
      init_std: standard deviation of the normal initialisers (output projections get
        init_std / sqrt(2 * num_layers), GPT-2 style).
    """

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 4
    mlp_ratio: int = 4
    positions: str = "learned"
    tie_embeddings: bool = False
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    fp32_residual: bool = False
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "d_model", "num_heads", "num_layers", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name}: must be an integer >= 1, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"GPTConfig: d_model={self.d_model} must divide by num_heads={self.num_heads}")
        if self.positions not in POSITIONS:
            raise ValueError(f"GPTConfig.positions: expected one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rope needs an even head_dim, got {self.head_dim}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"GPTConfig.{name}: expected one of {DTYPES}, got {getattr(self, name)!r}")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_base <= 0:
            raise ValueError("GPTConfig: norm_eps, init_std and rope_base must be > 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def d_ff(self) -> int:
        return self.mlp_ratio * self.d_model

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype."""
        return jnp.dtype(self.compute_dtype)

    @property
    def residual_dtype(self) -> jnp.dtype:
        """Dtype of the activations between blocks (and between pipeline stages)."""
        return jnp.dtype(jnp.float32) if self.fp32_residual else self.dtype

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)
