"""jpipe.models: Flax NNX models whose blocks are stacked on a leading layer axis, and their pipelines.

    config = GPTConfig(vocab_size=256, seq_len=128, d_model=128, num_heads=4, num_layers=6)
    pipe = PipelinedLM(config, schedule=schedule, mesh=make_mesh(data=2, stage=2, tensor=2))
    params = pipe.init(seed=0)
    loss, grads = jax.jit(pipe.value_and_grad())(params, tokens, targets)  # tokens, targets [m, B, T]

`llama_config(...)` (GPTConfig(family="llama", ...)) is the Llama-style decoder, pipelined alike;
`moe_config(...)` (GPTConfig(family="moe", ...)) the DeepSeek-style mixture of experts (`MoELM`).
`reference_value_and_grad(config)` is the same loss and gradients, unpipelined, on one device.
`PipelinedModel(model, blocks=..., prologue=..., loss=..., schedule=..., mesh=...)` pipelines any
NNX model whose blocks are stacked with `nnx.vmap` (PipelinedLM is it applied to GPT).
"""

from jpipe.models.adapter import PipelinedModel
from jpipe.models.config import GPTConfig
from jpipe.models.gpt import GPT, Block, cross_entropy, logical_axes, params_of
from jpipe.models.layers import PreNormBlock, block_class
from jpipe.models.layout import StageLayout, masked_layer
from jpipe.models.llama import GroupedQueryAttention, LlamaBlock, SwiGLU, llama_config
from jpipe.models.moe import MoE, MoEBlock, MoELM, moe_config
from jpipe.models.parts import LMParts, num_params, reference_value_and_grad
from jpipe.models.pipelined import PipelinedLM

__all__ = [
    "GPT",
    "Block",
    "GPTConfig",
    "GroupedQueryAttention",
    "LlamaBlock",
    "LMParts",
    "MoE",
    "MoEBlock",
    "MoELM",
    "PipelinedLM",
    "PipelinedModel",
    "PreNormBlock",
    "StageLayout",
    "SwiGLU",
    "block_class",
    "cross_entropy",
    "logical_axes",
    "masked_layer",
    "llama_config",
    "moe_config",
    "num_params",
    "params_of",
    "reference_value_and_grad",
]
