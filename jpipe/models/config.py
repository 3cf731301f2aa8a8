"""Configuration of the GPT-style decoder language model."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

POSITIONS = ("learned", "rope")
FAMILIES = ("gpt", "llama", "moe")
DTYPES = ("float32", "bfloat16", "float64")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """A decoder-only language model: token embedding, pre-norm causal attention + MLP blocks, head.

    `family` picks the block: "gpt" (multi-head attention, GELU MLP), "llama" (grouped-query
    attention with `num_kv_heads` key/value heads, RoPE, SwiGLU MLP; `jpipe.models.llama`) or
    "moe" (llama attention, and a DeepSeek-style mixture of experts in place of the MLP:
    `jpipe.models.moe`). The families share the embedding, head, parameter naming and logical axes, so the pipeline,
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
      num_experts: the moe family's routed experts per layer (SwiGLU each).
      experts_per_token: the moe family's top-k: routed experts each token goes to.
      shared_experts: the moe family's shared experts (every token goes through them; one SwiGLU
        of shared_experts x the expert width); 0: none.
      expert_d_ff: the moe family's hidden width of one expert (of each SwiGLU branch); unset:
        mlp_ratio x d_model.
      capacity_factor: the moe family's expert capacity per sequence: each expert takes at most
        ceil(capacity_factor x seq x experts_per_token / num_experts) tokens of one sequence;
        tokens past it (in order: every token's first choice, then every token's second, ...) are
        dropped from that expert (the residual stream and the shared experts still carry them).
      aux_loss_weight: the moe family's load-balancing loss weight (DeepSeek's sequence-wise
        balance loss, sum over experts of f_i x P_i per sequence, summed over layers, averaged over
        sequences) added to the cross-entropy; 0: no balancing loss.
      dense_layers: the moe family's dense (llama SwiGLU) blocks before the MoE blocks, as in
        DeepSeek's first layers; they run in the pipeline's prologue, with the embedding, on the
        device of the first stage. The model has dense_layers + num_layers blocks; num_layers MoE
        blocks are pipelined.
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
    num_experts: int = 8
    experts_per_token: int = 2
    shared_experts: int = 1
    expert_d_ff: int | None = None
    capacity_factor: float = 1.25
    aux_loss_weight: float = 0.01
    dense_layers: int = 0

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
        self._check_experts()
        if self.positions not in POSITIONS:
            raise ValueError(f"GPTConfig.positions: expected one of {POSITIONS}, got {self.positions!r}")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rope needs an even head_dim, got {self.head_dim}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"GPTConfig.{name}: expected one of {DTYPES}, got {getattr(self, name)!r}")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_base <= 0:
            raise ValueError("GPTConfig: norm_eps, init_std and rope_base must be > 0")

    def _check_experts(self) -> None:
        for name in ("num_experts", "experts_per_token"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name}: must be an integer >= 1, got {value!r}")
        for name in ("shared_experts", "dense_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"GPTConfig.{name}: must be an integer >= 0, got {value!r}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"GPTConfig.experts_per_token: at most num_experts={self.num_experts}, got {self.experts_per_token}"
            )
        width = self.expert_d_ff
        if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
            raise ValueError(f"GPTConfig.expert_d_ff: must be an integer >= 1 (or unset), got {width!r}")
        if not self.capacity_factor > 0:
            raise ValueError(f"GPTConfig.capacity_factor: must be > 0, got {self.capacity_factor!r}")
        if not self.aux_loss_weight >= 0:
            raise ValueError(f"GPTConfig.aux_loss_weight: must be >= 0, got {self.aux_loss_weight!r}")

    @property
    def moe(self) -> bool:
        """Whether this is the mixture-of-experts family."""
        return self.family == "moe"

    @property
    def expert_width(self) -> int:
        """The hidden width of one expert (each SwiGLU branch): `expert_d_ff`, or `d_ff` when unset."""
        return self.d_ff if self.expert_d_ff is None else self.expert_d_ff

    def expert_capacity(self, seq: int) -> int:
        """Tokens one expert takes from one sequence of `seq` tokens (at least 1, at most seq)."""
        wanted = math.ceil(self.capacity_factor * seq * self.experts_per_token / self.num_experts)
        return max(1, min(seq, wanted))

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `num_kv_heads`, or `num_heads` when unset."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def rope(self) -> bool:
        """Whether attention rotates queries and keys (always for llama and moe; `positions` for gpt)."""
        return self.family in ("llama", "moe") or self.positions == "rope"

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
