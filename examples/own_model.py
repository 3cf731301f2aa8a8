"""Your own Flax NNX model pipelined (1F1B) on 4 fake CPU devices, trained on text with checkpoints.
`[STEPS=20] python examples/own_model.py`: 10 s on a CPU; run again, it resumes from runs/own_model."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # 4 fake CPU devices
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # set JAX_PLATFORMS to run on your accelerators instead
import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jpipe  # noqa: E402
from jpipe.train import checkpoint, data, step  # noqa: E402

VOCAB, DIM, LAYERS, SEQ, MICROBATCHES, BATCH = 256, 32, 4, 32, 4, 8  # byte-level text: 256 tokens


class Block(nnx.Module):  # [B, T, D] -> [B, T, D]
    def __init__(self, rngs: nnx.Rngs):
        self.norm, self.up = nnx.RMSNorm(DIM, rngs=rngs), nnx.Linear(DIM, 4 * DIM, rngs=rngs)
        self.down = nnx.Linear(4 * DIM, DIM, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class TinyLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.blocks = nnx.split_rngs(splits=LAYERS)(nnx.vmap(Block))(rngs)  # stacked: parameters [L, ...]
        self.norm, self.head = nnx.RMSNorm(DIM, rngs=rngs), nnx.Linear(DIM, VOCAB, rngs=rngs)


def loss(model, x, targets):  # runs on the last stage: x [B, T, D], targets [B, T]
    return optax.softmax_cross_entropy_with_integer_labels(model.head(model.norm(x)), targets).mean()


schedule = jpipe.schedules.build("1f1b", num_devices=4, num_microbatches=MICROBATCHES)
mesh = jpipe.parallel.make_mesh(data=1, stage=4)
pipe = jpipe.PipelinedModel(
    TinyLM, blocks="blocks", prologue=lambda m, t: m.embed(t), loss=loss, schedule=schedule, mesh=mesh
)
dataset = data.TokenDataset.open(data.build_corpus(jpipe.__path__[0], data.cache_dir(), 200_000), SEQ)  # jpipe's code
optimizer = optax.adamw(3e-3)
train = step.jit_train_step(pipe.value_and_grad(), optimizer)
params = pipe.init(seed=0)  # the pipeline layout, sharded over the mesh; optimizer moments sharded alike:
opt_shardings = step.optimizer_shardings(optimizer, params, pipe.shardings(), mesh)
state = {"params": params, "opt_state": jax.device_put(optimizer.init(params), opt_shardings)}
with checkpoint.Checkpointer("runs/own_model/checkpoints", keep=2) as ckpt:
    start, state, _ = (0, state, {}) if ckpt.latest_step() is None else ckpt.restore(state)  # resume if saved
    end = start + int(os.environ.get("STEPS", 20))
    for i in range(start, end):
        batch = dataset.batch(seed=0, step=i, batch_size=MICROBATCHES * BATCH)  # a function of (seed, step)
        tokens, targets = (batch[k].reshape(MICROBATCHES, BATCH, SEQ) for k in ("inputs", "targets"))
        state["params"], state["opt_state"], loss_value, _ = train(state["params"], state["opt_state"], tokens, targets)
        print(f"step {i + 1}  loss {float(loss_value):.3f}")
        if (i + 1) % 10 == 0 or i + 1 == end:
            ckpt.save(i + 1, state, {"loss": float(loss_value)})
print(f"saved step {end}; unpipelined TinyLM again: {pipe.to_module(state['params']).head.kernel.shape} head")
