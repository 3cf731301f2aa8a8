"""Configuration of the GPT-style decoder language model."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

POSITIONS = ("learned", "rope")
FAMILIES = ("gpt", "llama")
DTYPES = ("float32", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """A decoder-only language model: token embedding, pre-norm causal attention + MLP blocks, head.

    `family` picks the block: "gpt" (multi-head attention, GELU MLP) or "llama" (grouped-query
    attention with `num_kv_heads` key/value heads, RoPE, SwiGLU MLP; `jpipe.models.llama`). Both
    families share the embedding, head, parameter naming and logical axes, so the pipeline,
    sharding rules, checkpoints and training loop treat them alike.

    Attributes:
      vocab_size: number of token ids.
      seq_len: the longest sequence (learned position table length; RoPE works up to any length,
        but inputs are checked against it).
      d_model: width of the residual stream.
      num_heads: attention heads; `d_model` must divide by it (head_dim = d_model / num_heads).
      num_layers: transformer blocks.
      mlp_ratio: MLP hidden width = mlp_ratio * d_model (for SwiGLU: of each of its two branches).
      positions: the gpt family's positions: "learned" (a [seq_len, d_model] table added to the
        token embedding) or "rope" (rotary embeddings on queries and keys; no position
        parameters). The llama family always uses RoPE.
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
      family: "gpt" or "llama".
      num_kv_heads: key/value heads of the llama family's grouped-query attention (each shared by
        num_heads / num_kv_heads query heads; must divide num_heads); unset: num_heads. The gpt
        family has one per head.
      float32_attention: attention scores and their softmax in float32 (float64 for float64
        values). False: in `compute_dtype`, as MaxText's `float32_logits: false` does; the
        `[B, H, T, T]` scores then take half the bytes in bfloat16. No effect in float32.
      document_end: the end-of-document token id at which attention is masked: a token attends
        only to earlier tokens of its own document in the window (the end-of-document token ends
        its document). Unset: attention crosses document boundaries. The training CLI sets it
        from a token folder with `data.cross_document_attention false`.
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
    family: str = "gpt"
    num_kv_heads: int | None = None
    float32_attention: bool = True
    document_end: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "d_model", "num_heads", "num_layers", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name}: must be an integer >= 1, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"GPTConfig: d_model={self.d_model} must divide by num_heads={self.num_heads}")
        if self.family not in FAMILIES:
            raise ValueError(f"GPTConfig.family: expected one of {FAMILIES}, got {self.family!r}")
        kv = self.num_kv_heads
        if kv is not None:
            if not isinstance(kv, int) or kv < 1 or self.num_heads % kv:
                raise ValueError(f"GPTConfig.num_kv_heads: must divide num_heads={self.num_heads}, got {kv!r}")
            if self.family == "gpt" and kv != self.num_heads:
                raise ValueError(f"GPTConfig.num_kv_heads: the gpt family has num_heads key/value heads, got {kv}")
        for name in ("float32_attention", "fp32_residual", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        end = self.document_end
        if end is not None and (not isinstance(end, int) or isinstance(end, bool) or not 0 <= end < self.vocab_size):
            raise ValueError(
                f"GPTConfig.document_end: must be a token id below vocab_size={self.vocab_size}, got {end!r}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"GPTConfig.positions: expected one of {POSITIONS}, got {self.positions!r}")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rope needs an even head_dim, got {self.head_dim}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"GPTConfig.{name}: expected one of {DTYPES}, got {getattr(self, name)!r}")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_base <= 0:
            raise ValueError("GPTConfig: norm_eps, init_std and rope_base must be > 0")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `num_kv_heads`, or `num_heads` when unset."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def rope(self) -> bool:
        """Whether attention rotates queries and keys (always for llama; `positions` for gpt)."""
        return self.family == "llama" or self.positions == "rope"

    @property
    def learned_positions(self) -> bool:
        """Whether the embedding adds a learned `[seq_len, d_model]` position table."""
        return self.family == "gpt" and self.positions == "learned"

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
