"""The model as pure functions on parameter pytrees: the pieces the pipeline runs, and the reference.

`LMParts(config)` gives `embed(params, tokens) -> x`, `layer_fn(layer_params, x) -> x` (one block,
to wrap with `jpipe.layered`) and `head_loss(params, x, targets) -> scalar`. Each one rebuilds the
NNX module from its parameters (`nnx.merge` of a graph definition made once per config), so the
functions run exactly the module code. `params` is the pure dict of `gpt.params_of(GPT(...))`, or
any sub-dict holding the entries a function reads.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpipe.models.config import GPTConfig
from jpipe.models.gpt import cross_entropy
from jpipe.models.layers import block_class
from jpipe.models.moe import lm_class

PyTree = Any


@functools.lru_cache(maxsize=32)
def _graphdefs(config: GPTConfig) -> tuple[Any, Any, Any, Any]:
    model = nnx.eval_shape(lambda: lm_class(config)(config, rngs=nnx.Rngs(0)))
    block = nnx.eval_shape(lambda: block_class(config)(config, rngs=nnx.Rngs(0)))
    return nnx.graphdef(model), nnx.graphdef(model.embed), nnx.graphdef(block), nnx.graphdef(model.head)


@dataclasses.dataclass(frozen=True)
class LMParts:
    """Pure-function pieces of `GPT(config)`."""

    config: GPTConfig

    def embed(self, params: PyTree, tokens: jax.Array) -> jax.Array:
        """Token ids `[B, T]` -> activations `[B, T, D]` (residual dtype); reads `params["embed"]`."""
        return nnx.merge(_graphdefs(self.config)[1], params["embed"])(tokens)

    def layer_fn(self, layer_params: PyTree, x: jax.Array) -> jax.Array:
        """One block: `[B, T, D] -> [B, T, D]`; `layer_params` is one layer of `params["blocks"]`."""
        return nnx.merge(_graphdefs(self.config)[2], layer_params)(x)

    def head_loss(self, params: PyTree, x: jax.Array, targets: jax.Array) -> jax.Array:
        """Final norm, head and mean cross-entropy of `x` `[B, T, D]` against ids `[B, T]`: a scalar.

        Reads `params["head"]`, and `params["embed"]["tokens"]` when the embeddings are tied.
        """
        head = nnx.merge(_graphdefs(self.config)[3], params["head"])
        table = params["embed"]["tokens"] if self.config.tie_embeddings else None
        return cross_entropy(head(x, table), targets)

    def loss_params(self, params: PyTree) -> PyTree:
        """The sub-dict of `params` that `head_loss` reads."""
        if self.config.tie_embeddings:
            return {"head": params["head"], "embed": {"tokens": params["embed"]["tokens"]}}
        return {"head": params["head"]}


def reference_value_and_grad(config: GPTConfig) -> Callable:
    """The unpipelined model's loss and gradients: the reference the pipeline must match.

    Returns `fn(params, tokens, targets) -> (loss, grads)` with params the model's pure dict
    (blocks `[L, ...]`) and tokens/targets `[m, B, T]`; the loss is the mean over microbatches of
    `GPT.loss` (`MoELM.loss` for the moe family: its routing groups are sequences, so flattening the
    microbatches changes nothing), computed by the NNX module itself (`nnx.scan` over its stacked blocks).
    """
    graphdef = _graphdefs(config)[0]

    def loss(params, tokens, targets):
        model = nnx.merge(graphdef, params)
        # Equal-sized microbatches: the mean of their means is the mean over all of them.
        return model.loss(tokens.reshape((-1,) + tokens.shape[2:]), targets.reshape((-1,) + targets.shape[2:]))

    return jax.value_and_grad(loss)


def num_params(params: PyTree) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(jnp.size(a) for a in jax.tree.leaves(params)))
