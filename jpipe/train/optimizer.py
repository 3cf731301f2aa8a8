"""AdamW with linear warmup then cosine decay, and global-norm gradient clipping (optax)."""

from __future__ import annotations

import optax

from jpipe.train.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_learning_rate_ratio` of it.

    The decay ends at `config.decay_steps` (unset: `total_steps`); the rate stays at its end value after
    (`OptimizerConfig.schedule_shape`; `OptimizerConfig.learning_rate_at` is the same in plain Python).
    """
    warmup, decay = config.schedule_shape(total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=decay,
        end_value=config.learning_rate * config.min_learning_rate_ratio,
    )


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """`clip_by_global_norm` then AdamW on the schedule above."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            learning_rate_schedule(config, total_steps),
            b1=config.beta1,
            b2=config.beta2,
            weight_decay=config.weight_decay,
        ),
    )
