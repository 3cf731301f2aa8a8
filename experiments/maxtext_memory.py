"""Per-device memory of MaxText's pipeline and jpipe's, both compiled by the real TPU compiler.

Nothing runs on a TPU: both training steps are compiled ahead of time for a deviceless TPU
topology (`jax.experimental.topologies.get_topology_desc`, v5e 2x2 = 4 chips) by libtpu's
compiler, and the per-device numbers are `compiled.memory_analysis()`'s. Memory-space assignment
is switched off for both (`--xla_msa_enable=false`, passed as a compiler option: MaxText's
`compile_xla_flags` and jpipe's `.compile(compiler_options=...)`), so every buffer lives in HBM
and is counted.

The job: 8 layers, d_model 256, 4 heads of 64, GELU MLP 1024, vocabulary 1024, sequence 256,
bfloat16 compute, float32 parameters, full remat, AdamW with global-norm clipping, 4 pipeline
stages (mesh data 1 x stage 4 x tensor 1), m = 32 microbatches of one sequence (global batch 32).

- MaxText 0.2.5 (PyPI), its own AOT path `maxtext.trainers.pre_train.train_compile` (`main`, run
  unchanged in a subprocess per option; its `jit_and_compile` is wrapped only to keep the compiled
  object): GPipe with 2 layers per stage (`num_layers_per_pipeline_stage=2`) and circular
  (`num_layers_per_pipeline_stage=1`, 2 repeats).
- jpipe: `PipelinedLM` gradient + optax AdamW with clipping (`jpipe.train.optimizer`), parameters
  and optimizer state donated, for gpipe, 1f1b, interleaved_1f1b (v 2), zb_h1, zbv, v_half and
  v_min (v 2). The stage costs for the executor's "auto" choices are measured as the training loop
  does (`PipelinedLM.stage_costs`, compiled for the default backend, here CPU).

Memory against time (`--tradeoff`): every jpipe schedule also with cost-balanced ticks
(`PipelineOptions(balance_ticks=True)`), with the forward recomputation as R ops
(`recompute=True`) and with both; each row's temp memory beside its simulated step: the lockstep
simulator's makespan of what the executor runs (the step's `PipelinePlan`: its schedule, B split
or whole, sends hidden or not) under the measured per-chunk costs, in layer forwards, relative to
1f1b's; and the Pareto front of the two. The summary gives jpipe's least temp memory at a step no
slower than 1f1b's against MaxText's best on this job with jax 0.12.1 / libtpu 0.0.52 (26.58 MiB,
`MAXTEXT_BEST_JOB1`). The jpipe side needs only jax[tpu] and jpipe (no MaxText):

    python3.12 -m venv /work/venv-tpu-new
    /work/venv-tpu-new/bin/pip install jax==0.12.1 jaxlib==0.12.1 libtpu==0.0.52
    /work/venv-tpu-new/bin/pip install -e .
    /work/venv-tpu-new/bin/python experiments/maxtext_memory.py --jpipe-only --tradeoff --buffers 1f1b,gpipe

(jax 0.12.1's own `jax[tpu]` extra asks for libtpu 0.0.53, which PyPI does not serve; 0.0.52 is the
newest. About 25 minutes on 2 busy CPU cores: 28 compiles, each measuring its costs first.)

Where the two models differ: MaxText's llama2 decoder block with `mlp_activations=[gelu]` and
jpipe's `Block` are both pre-RMSNorm attention + GELU MLP (no gate, no biases) with RoPE (jpipe
with `positions="rope"`), untied embedding and head. Both compute attention scores and softmax
in bfloat16 (MaxText's `float32_logits: false`, jpipe's `float32_attention=False`); their losses
differ in detail (MaxText's
cross-entropy carries a z-loss term and per-token weights); AdamW's weight decay differs (0.1 vs
0.01, no effect on memory).

MaxText needs Python 3.12, so this script runs in its own environment, made once with:

    python3.12 experiments/maxtext_memory.py --setup          # or the commands it prints:
    python3.12 -m venv /work/envs/maxtext
    /work/envs/maxtext/bin/pip install maxtext==0.2.5 "maxtext[tpu]==0.2.5"
    /work/envs/maxtext/bin/pip install "jax[tpu]==<the jax that maxtext installed>"   # libtpu paired with jax
    /work/envs/maxtext/bin/pip install -e .                   # jpipe, from the repository root

Command (from the repository root; about 5 minutes on 2 CPU cores):

    /work/envs/maxtext/bin/python experiments/maxtext_memory.py --markdown experiments/out/maxtext_memory.md

`--jpipe-commit REV` measures jpipe as of a commit (so work in progress in the checkout does not
enter the numbers). `--buffers 1f1b,interleaved_1f1b` also dumps the TPU compiler's buffer assignment of those jpipe
schedules (`xla_dump_to`) and prints the largest temp buffers with the HLO instructions that define
them. `--jpipe-only` / `--maxtext-only` run one side; `--schedules a,b` picks jpipe schedules.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import dataclasses
import importlib.metadata
import importlib.util
import json
import operator
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

# Deviceless compilation never opens a TPU, so several processes may load libtpu at once (the
# MaxText workers, or another program on this machine); without this libtpu refuses on its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

DEFAULT_ENV = pathlib.Path("/work/envs/maxtext")
MAXTEXT_VERSION = "0.2.5"
TOPOLOGY = "v5e:2x2"  # MaxText's name for it: v5e-4
MAXTEXT_TOPOLOGY = "v5e-4"
COMPILER_OPTIONS = {"xla_msa_enable": "false"}
MIB = 2**20

STAGES, MICROBATCHES, GLOBAL_BATCH = 4, 32, 32
MODEL = dict(vocab=1024, seq=256, d_model=256, heads=4, head_dim=64, mlp=1024, layers=8)

MAXTEXT_COMMON = [
    f"compile_topology={MAXTEXT_TOPOLOGY}",
    "compile_topology_num_slices=1",
    "dataset_type=synthetic",
    "enable_checkpointing=false",
    "skip_jax_distributed_system=true",
    "attention=dot_product",
    f"base_emb_dim={MODEL['d_model']}",
    f"base_num_query_heads={MODEL['heads']}",
    f"base_num_kv_heads={MODEL['heads']}",
    f"head_dim={MODEL['head_dim']}",
    f"base_mlp_dim={MODEL['mlp']}",
    f"base_num_decoder_layers={MODEL['layers']}",
    "mlp_activations=[gelu]",
    f"vocab_size={MODEL['vocab']}",
    f"max_target_length={MODEL['seq']}",
    "dtype=bfloat16",
    "weight_dtype=float32",
    "remat_policy=full",
    "opt_type=adamw",
    "gradient_clipping_threshold=1.0",
    f"ici_pipeline_parallelism={STAGES}",
    "ici_fsdp_parallelism=1",
    f"num_pipeline_microbatches={MICROBATCHES}",
    f"per_device_batch_size={GLOBAL_BATCH // STAGES}",
]
MAXTEXT_OPTIONS = {
    "gpipe": ("GPipe, 2 layers/stage", ["num_layers_per_pipeline_stage=2"]),
    "circular": ("circular, 1 layer/stage x 2 repeats", ["num_layers_per_pipeline_stage=1"]),
}
JPIPE_SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zb_h1": 1, "zbv": 2, "v_half": 2, "v_min": 2}
MAXTEXT_BEST_JOB1 = 26.58 * MIB  # MaxText's best temp on this job, jax 0.12.1 / libtpu 0.0.52 (issue 27)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One jpipe configuration of the job: a schedule and the executor options that change its ticks.

    Attributes:
      schedule: a name in `JPIPE_SCHEDULES` (built with its `virtual` there).
      balance_ticks: `PipelineOptions.balance_ticks` (cost-balanced ticks, `jpipe.schedules.fused_ticks`).
      recompute: `PipelineOptions.recompute` (the forward recomputation as R ops, remat full).
    """

    schedule: str
    balance_ticks: bool = False
    recompute: bool = False

    @property
    def virtual(self) -> int:
        return JPIPE_SCHEDULES[self.schedule]

    @property
    def label(self) -> str:
        extras = ["R"] * self.recompute + ["balanced"] * self.balance_ticks
        chunks = f" (v={self.virtual})" if self.virtual > 1 else ""
        return self.schedule + chunks + "".join(f" +{extra}" for extra in extras)


def tradeoff_variants() -> list[Variant]:
    """Every schedule of `JPIPE_SCHEDULES` as is, with balanced ticks, with R ops, and with both."""
    return [
        Variant(name, balance_ticks=balanced, recompute=recompute)
        for name in JPIPE_SCHEDULES
        for recompute in (False, True)
        for balanced in (False, True)
    ]


@dataclasses.dataclass
class Result:
    system: str
    option: str
    temp: int
    argument: int
    output: int
    alias: int
    compile_s: float
    code: int = 0
    step: float | None = None  # simulated, in layer forwards (`simulated_step`)
    buffer_bytes: int | None = None
    plan: str = ""

    @property
    def total(self) -> int:
        """temp + argument + output bytes, as `experiments/pipeline_memory.py` counts them."""
        return self.temp + self.argument + self.output

    @property
    def resident(self) -> int:
        """temp + argument + the outputs that do not reuse a donated argument: what the step occupies."""
        return self.temp + self.argument + self.output - self.alias


def stats_of(compiled) -> dict:
    memory = compiled.memory_analysis()
    return {
        "temp": memory.temp_size_in_bytes,
        "argument": memory.argument_size_in_bytes,
        "output": memory.output_size_in_bytes,
        "alias": memory.alias_size_in_bytes,
        "code": memory.generated_code_size_in_bytes,
    }


# --- environment -------------------------------------------------------------------------------


def setup(env: pathlib.Path) -> None:
    """Create the Python 3.12 environment with MaxText, jax[tpu] and jpipe (editable)."""
    if sys.version_info[:2] != (3, 12):
        sys.exit(
            f"--setup: run it with Python 3.12 (this is {sys.version.split()[0]}); e.g. "
            "$(pyenv root)/versions/3.12.1/bin/python3.12 experiments/maxtext_memory.py --setup"
        )
    repo = pathlib.Path(__file__).resolve().parents[1]
    pip = str(env / "bin" / "pip")
    steps = [
        [sys.executable, "-m", "venv", str(env)],
        [pip, "install", "-U", "pip"],
        [pip, "install", f"maxtext[tpu]=={MAXTEXT_VERSION}"],
    ]
    for command in steps:
        _run_step(command)
    jax_version = subprocess.run(
        [str(env / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('jax'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # maxtext[tpu] takes the newest libtpu; jax[tpu] pins the one this jax release was built with.
    _run_step([pip, "install", f"jax[tpu]=={jax_version}"])
    _run_step([pip, "install", "-e", str(repo)])
    print(f"done: run {env / 'bin' / 'python'} {pathlib.Path(__file__).relative_to(repo)}")


def _run_step(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def check_environment(maxtext: bool = True) -> None:
    """Exit with the setup commands unless this Python can compile for TPU (and run MaxText if `maxtext`)."""
    if maxtext and sys.version_info[:2] != (3, 12):
        sys.exit(
            f"maxtext_memory.py: MaxText {MAXTEXT_VERSION} needs Python 3.12, this is {sys.version.split()[0]} "
            f"({sys.executable}). Create its environment with `python3.12 {__file__} --setup` and run "
            f"{DEFAULT_ENV}/bin/python {__file__}"
        )
    needed = ("maxtext", "libtpu", "jpipe") if maxtext else ("libtpu", "jpipe")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(
            f"maxtext_memory.py: not installed in {sys.prefix}: {', '.join(missing)}. "
            f"Run `{sys.executable} {__file__} --setup` (see the module docstring for the commands)."
        )


def export_jpipe(commit: str) -> pathlib.Path:
    """`git archive` the jpipe package at `commit` into a temporary folder and import it from there."""
    repo = pathlib.Path(__file__).resolve().parents[1]
    target = pathlib.Path(tempfile.mkdtemp(prefix="jpipe_at_"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "jpipe"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    sys.path.insert(0, str(target))
    return target


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "libtpu", "maxtext", "flax", "optax"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    import jpipe

    source = pathlib.Path(jpipe.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(source), "status", "--porcelain", "--", "jpipe"], capture_output=True, text=True
    )
    if commit.returncode == 0:
        out["jpipe"] = commit.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    else:
        out["jpipe"] = f"{source} (not a git checkout)"
    return out


# --- MaxText -----------------------------------------------------------------------------------


def maxtext_worker(option: str, result_path: str, workdir: str, dump: str | None) -> None:
    """Subprocess body: MaxText's train_compile.main for one option; writes the memory stats as JSON."""
    from maxtext.trainers.pre_train import train_compile

    captured = {}
    compile_fn = train_compile.jit_and_compile

    def keep(*args, **kwargs):
        start = time.perf_counter()
        compiled = compile_fn(*args, **kwargs)
        captured["compile_s"] = time.perf_counter() - start
        captured["compiled"] = compiled
        return compiled

    train_compile.jit_and_compile = keep
    flags = " ".join(f"--{key}={value}" for key, value in COMPILER_OPTIONS.items())
    if dump:
        flags += f" --xla_dump_to={dump}"
    base = pathlib.Path(train_compile.__file__).resolve().parents[2] / "configs" / "base.yml"
    argv = [
        "train_compile",
        str(base),
        *MAXTEXT_COMMON,
        *MAXTEXT_OPTIONS[option][1],
        f"run_name=maxtext_memory_{option}",
        f"base_output_directory={workdir}",
        f"compile_xla_flags={flags}",
    ]
    train_compile.main(argv)
    result = {**stats_of(captured["compiled"]), "compile_s": captured["compile_s"]}
    pathlib.Path(result_path).write_text(json.dumps(result))


def run_maxtext(option: str, workdir: pathlib.Path, dump: str | None = None) -> Result:
    result_path = workdir / f"maxtext_{option}.json"
    log_path = workdir / f"maxtext_{option}.log"
    command = [
        sys.executable,
        __file__,
        "--maxtext-worker",
        option,
        "--result",
        str(result_path),
        "--workdir",
        str(workdir),
    ]
    if dump:
        command += ["--dump", dump]
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not result_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"MaxText train_compile ({option}) failed, exit {done.returncode}; log {log_path}:\n{tail}")
    stats = json.loads(result_path.read_text())
    compile_s = stats.pop("compile_s")
    return Result("MaxText", MAXTEXT_OPTIONS[option][0], compile_s=compile_s, **stats)


# --- jpipe -------------------------------------------------------------------------------------


def topology_mesh():
    from jax.experimental.topologies import get_topology_desc

    from jpipe.parallel.mesh import make_mesh

    devices = get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices
    return make_mesh(data=1, stage=STAGES, tensor=1, devices=devices)


def jpipe_model_config():
    from jpipe.models import GPTConfig

    return GPTConfig(
        vocab_size=MODEL["vocab"],
        seq_len=MODEL["seq"],
        d_model=MODEL["d_model"],
        num_heads=MODEL["heads"],
        num_layers=MODEL["layers"],
        mlp_ratio=MODEL["mlp"] // MODEL["d_model"],
        positions="rope",
        compute_dtype="bfloat16",
        param_dtype="float32",
        float32_attention=False,  # as MaxText's float32_logits: false
    )


def compile_jpipe(variant: Variant, mesh, compiler_options: dict):
    """The jpipe training step (gradient + AdamW with clipping, state donated), compiled for the topology.

    Returns `(compiled, compile seconds, pipe, plan, costs)`: `plan` is the `PipelinePlan` the step
    runs (its "auto" choices resolved under the measured costs), `costs` the largest chunk's
    `StageCosts` measured as the training loop measures them (`PipelinedLM.stage_costs`).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jpipe import schedules
    from jpipe.models import PipelinedLM
    from jpipe.pipeline import PipelineOptions
    from jpipe.train.config import OptimizerConfig
    from jpipe.train.optimizer import make_optimizer

    schedule = schedules.build(variant.schedule, STAGES, MICROBATCHES, variant.virtual)
    options = PipelineOptions(remat="full", balance_ticks=variant.balance_ticks, recompute=variant.recompute)
    pipe = PipelinedLM(jpipe_model_config(), schedule=schedule, mesh=mesh, options=options)
    costs = pipe.stage_costs(batch=GLOBAL_BATCH // MICROBATCHES)
    pipe = dataclasses.replace(pipe, options=dataclasses.replace(pipe.options, cost=costs.cost(per="chunk")))

    param_shardings = pipe.shardings()
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pipe.abstract_params(), param_shardings
    )
    optimizer = make_optimizer(OptimizerConfig(), total_steps=1000)
    opt_state = jax.eval_shape(optimizer.init, params)
    params_structure = jax.tree.structure(params)
    replicated = NamedSharding(mesh, P())

    def is_params_like(tree):
        return jax.tree.structure(tree) == params_structure

    # Adam's mu and nu are shaped like the parameters and placed like them; the counters replicated.
    opt_shardings = jax.tree.map(
        lambda sub: param_shardings if is_params_like(sub) else jax.tree.map(lambda _: replicated, sub),
        opt_state,
        is_leaf=is_params_like,
    )
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_state, opt_shardings)
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    tokens = jax.ShapeDtypeStruct(
        (MICROBATCHES, GLOBAL_BATCH // MICROBATCHES, MODEL["seq"]), jnp.int32, sharding=batch_sharding
    )
    loss_and_grads = pipe.value_and_grad()

    def train_step(params, opt_state, tokens, targets):
        loss, grads = loss_and_grads(params, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

    step = jax.jit(train_step, out_shardings=(param_shardings, opt_shardings, None, None), donate_argnums=(0, 1))
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, tokens, tokens).compile(compiler_options=compiler_options)
    return compiled, time.perf_counter() - start, pipe, loss_and_grads.plan, costs


def simulated_step(plan, costs, layers_per_chunk: int) -> tuple[float, int]:
    """The lockstep simulator's step for what the executor runs, and the buffers it allocates.

    Returns `(step, buffer bytes)`: the makespan of `plan.schedule` (B split as `plan.split`, sends
    as `plan.overlap`) under the measured per-chunk costs (units of one chunk's forward), times the
    layers of a chunk: in layer forwards, so schedules with different chunk sizes compare. (Not
    times the chunk's forward FLOPs: `cost_analysis()` counts the body of the chunk's scan over
    its layers once, so a 2-layer chunk reports one layer's FLOPs; the ratios between its ops hold.)
    And the stash, weight-residual and recompute slots `compile_program` allocates per device times
    their measured bytes.
    """
    from jpipe import schedules
    from jpipe.pipeline.program import compile_program

    latency = int(plan.overlap)
    cost = costs.cost(per="chunk")
    sim = schedules.simulate(plan.schedule, cost, "lockstep", split_backward=plan.split, send_latency=latency)
    program = compile_program(plan.schedule, split=plan.split, send_latency=latency, braid=plan.options.braid)
    buffers = (
        program.num_stash_slots * costs.stash_bytes
        + program.num_weight_slots * costs.weight_residual_bytes
        + program.num_recompute_slots * costs.recomputed_bytes
    )
    return sim.makespan * layers_per_chunk, buffers


def run_jpipe(variant: Variant, mesh, dump: str | None = None) -> Result:
    options = dict(COMPILER_OPTIONS)
    if dump:
        options["xla_dump_to"] = dump
    compiled, compile_s, pipe, plan, costs = compile_jpipe(variant, mesh, options)
    step, buffers = simulated_step(plan, costs, max(pipe.layout.layer_counts))
    from jpipe.schedules.ir import Op, flatten

    described = plan.describe()
    if not any(action.op is Op.B for row in plan.schedule.actions for action in flatten(row)):
        described = described.replace("backward whole", "backward I + W as written")  # no B to run whole
    stats = stats_of(compiled)
    return Result("jpipe", variant.label, compile_s=compile_s, step=step, buffer_bytes=buffers, plan=described, **stats)


# --- buffer assignment -------------------------------------------------------------------------


def buffer_report(dump: pathlib.Path, temp_bytes: int, code_bytes: int, top: int = 14) -> str:
    """The largest slots of the TPU compiler's temp allocation, with the instructions defining them.

    A slot is an (offset, size) range of the `preallocated-temp` allocation; values sharing it are
    live at different times. Returns text lines.
    """
    assignment = _one(dump, "*after_optimizations-buffer-assignment.txt")
    hlo = _one(dump, "*after_optimizations.txt")
    allocations, current = [], None
    for line in assignment.read_text().splitlines():
        head = re.match(r"allocation (\d+): size (\d+), (.*)", line)
        if head:
            current = {"size": int(head.group(2)), "kind": head.group(3), "values": []}
            allocations.append(current)
            continue
        value = re.match(r"\s*value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", line)
        if value and current is not None:
            name, size, offset, shape = value.groups()
            current["values"].append((name, int(size), int(offset), shape.split("{")[0]))
    temp = max(
        (a for a in allocations if "preallocated-temp" in a["kind"] and "color" not in a["kind"]),
        key=lambda a: a["size"],
    )
    definitions = {}
    for line in hlo.read_text().splitlines():
        found = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ([a-z-]+)\(", line)
        if found:
            op_name = re.search(r'op_name="([^"]*)"', line)
            definitions[found.group(1)] = (found.group(3), op_name.group(1) if op_name else "")
    slots = collections.defaultdict(list)
    for name, size, offset, shape in temp["values"]:
        slots[offset].append((name, size, shape))
    ranked = sorted(slots.items(), key=lambda item: -max(size for _, size, _ in item[1]))
    lines = [
        f"buffer assignment: preallocated temp {temp['size'] / MIB:.2f} MiB; memory_analysis temp "
        f"{temp_bytes / MIB:.2f} MiB, of which {code_bytes / MIB:.2f} MiB generated code "
        f"(memory_analysis counts the program in temp) and "
        f"{(temp_bytes - temp['size'] - code_bytes) / MIB:+.2f} MiB in neither",
        "largest temp slots (size, shapes, defining instructions: op kind, jax op_name):",
    ]
    for offset, values in ranked[:top]:
        size = max(s for _, s, _ in values)
        shapes = sorted({shape for _, _, shape in values})
        more = " ..." if len(shapes) > 3 else ""
        lines.append(f"  {size / MIB:6.2f} MiB @ {offset:>9}: {', '.join(shapes[:3])}{more}")
        shown = 0
        for name, _, _ in values:
            base = name.split("{")[0]
            if base.startswith(("wide.param", "tuple", "param", "get-tuple-element")) or base not in definitions:
                continue
            kind, op_name = definitions[base]
            lines.append(f"      {name} = {kind}  [{op_name[-110:]}]")
            shown += 1
            if shown == 4:
                break
    return "\n".join(lines)


def _one(folder: pathlib.Path, pattern: str) -> pathlib.Path:
    """The largest file in `folder` matching `pattern` (the training step's module)."""
    matches = list(folder.glob(pattern))
    if not matches:
        raise FileNotFoundError(f"no {pattern} in {folder}")
    return max(matches, key=lambda p: p.stat().st_size)


# --- report ------------------------------------------------------------------------------------


def table(results: list[Result], info: dict, notes: list[str]) -> str:
    header = (
        "| system | option | temp MiB | argument MiB | output MiB | alias MiB | total MiB | resident MiB "
        "| code MiB | compile s |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r.system} | {r.option} | {r.temp / MIB:.2f} | {r.argument / MIB:.2f} | {r.output / MIB:.2f} | "
        f"{r.alias / MIB:.2f} | {r.total / MIB:.2f} | {r.resident / MIB:.2f} | "
        f"{r.code / MIB:.2f} | {r.compile_s:.1f} |"
        for r in results
    ]
    lines = [
        f"Per-device bytes from `memory_analysis()`, TPU {TOPOLOGY} (4 chips) compiled deviceless, "
        f"`--xla_msa_enable=false`; m = {MICROBATCHES} microbatches of 1 sequence, 4 stages, remat full; "
        "total = temp + argument + output (as experiments/pipeline_memory.py counts); outputs reuse the donated "
        "arguments (alias), so resident = temp + argument + output - alias is what the step occupies.",
        "",
        header,
        *rows,
        "",
    ]
    lines += ratio_lines(results)
    lines.append("")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    lines += [f"Note: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def ratio_lines(results: list[Result]) -> list[str]:
    maxtext = [r for r in results if r.system == "MaxText"]
    ours = [r for r in results if r.system == "jpipe"]
    if not maxtext or not ours:
        return []
    lines = []
    for key in ("temp", "total", "resident"):
        value = operator.attrgetter(key)
        best_mt, best_jp = min(maxtext, key=value), min(ours, key=value)
        lines.append(
            f"- {key}: jpipe best ({best_jp.option}, {value(best_jp) / MIB:.2f} MiB) / MaxText best "
            f"({best_mt.option}, {value(best_mt) / MIB:.2f} MiB) = {value(best_jp) / value(best_mt):.3f}"
        )
        gpipe = next((r for r in maxtext if r.option.startswith("GPipe")), None)
        one_f_one_b = next((r for r in ours if r.option == "1f1b"), None)
        if gpipe and one_f_one_b:
            lines.append(
                f"- {key}: jpipe 1f1b {value(one_f_one_b) / MIB:.2f} MiB / MaxText GPipe "
                f"{value(gpipe) / MIB:.2f} MiB = {value(one_f_one_b) / value(gpipe):.3f}"
            )
    return lines


def tradeoff_lines(results: list[Result]) -> list[str]:
    """jpipe's memory against time: temp MiB per device and simulated step relative to 1f1b's.

    A row is on the Pareto front (*) when no other row has both less temp memory and a shorter
    simulated step. Then jpipe's least temp memory at a step no slower than 1f1b's, against MaxText's
    best on this job (`MAXTEXT_BEST_JOB1`), and the fastest row within 1.25x 1f1b's temp memory.
    """
    rows = [r for r in results if r.system == "jpipe" and r.step]
    base = next((r for r in rows if r.option == "1f1b"), None)
    if base is None:
        return []
    front = {id(r) for r in rows if not any(_dominates(o, r) for o in rows)}
    lines = [
        "Memory against time (jpipe): temp MiB per device from `memory_analysis()`; step: the lockstep simulator's "
        "makespan of what the executor runs (its plan), measured per-chunk FLOP costs, relative to 1f1b's; "
        "buffers: the stash, weight-residual and recompute slots the executor allocates x measured bytes; "
        "* on the Pareto front (temp, step).",
        "",
        "| schedule | temp MiB | step (layer F) | step / 1f1b | buffers MiB | code MiB | plan | front |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r.temp):
        lines.append(
            f"| {r.option} | {r.temp / MIB:.2f} | {r.step:.1f} | {r.step / base.step:.3f} | "
            f"{(r.buffer_bytes or 0) / MIB:.2f} | {r.code / MIB:.2f} | {r.plan} | {'*' if id(r) in front else ''} |"
        )
    no_slower = [r for r in rows if r.step <= base.step * (1 + 1e-9)]
    best = min(no_slower, key=lambda r: r.temp)
    within = [r for r in rows if r.temp <= 1.25 * base.temp]
    fastest = min(within, key=lambda r: (r.step, r.temp))
    lines += [
        "",
        f"- least temp at a simulated step no slower than 1f1b's: {best.option}, {best.temp / MIB:.2f} MiB "
        f"(step {best.step / base.step:.3f}); / MaxText's best on this job "
        f"({MAXTEXT_BEST_JOB1 / MIB:.2f} MiB, jax 0.12.1 / libtpu 0.0.52) = {best.temp / MAXTEXT_BEST_JOB1:.3f}; "
        f"/ jpipe 1f1b ({base.temp / MIB:.2f} MiB) = {best.temp / base.temp:.3f}",
        f"- fastest within 1.25x 1f1b's temp ({1.25 * base.temp / MIB:.2f} MiB): {fastest.option}, "
        f"{fastest.temp / MIB:.2f} MiB, step {fastest.step / base.step:.3f}",
    ]
    return lines


def _dominates(a: Result, b: Result) -> bool:
    """Whether `a` is at least as good as `b` in temp and step, and better in one."""
    return a.temp <= b.temp and a.step <= b.step and (a.temp < b.temp or a.step < b.step)


def measure_jpipe(variants: list[Variant], buffers: list[str], top: int, workdir: pathlib.Path, notes: list[str]):
    """Compile every variant (a failure becomes a note) and print the buffer reports asked for."""
    mesh = topology_mesh()
    results = []
    for variant in variants:
        try:
            result = run_jpipe(variant, mesh)
        except Exception as error:  # noqa: BLE001 - one variant that does not compile must not end the sweep
            notes.append(f"jpipe {variant.label}: not measured ({type(error).__name__}: {str(error)[:200]})")
            print(notes[-1], flush=True)
            continue
        print(
            f"jpipe {result.option}: temp {result.temp / MIB:.2f} MiB, total {result.total / MIB:.2f} MiB, "
            f"simulated step {result.step:.1f} layer forwards, compile {result.compile_s:.0f} s",
            flush=True,
        )
        results.append(result)
    for name in buffers:
        dump = workdir / f"dump_{name}"
        result = run_jpipe(Variant(name), mesh, dump=str(dump))
        print(f"\n== jpipe {result.option}: largest temp buffers ==")
        print(buffer_report(dump, result.temp, result.code, top), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="create the Python 3.12 environment (--env)")
    parser.add_argument("--env", type=pathlib.Path, default=DEFAULT_ENV)
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the table as markdown here")
    parser.add_argument("--buffers", default="", help="comma-separated jpipe schedules to dump and analyse")
    parser.add_argument("--top", type=int, default=14, help="temp slots listed per --buffers schedule")
    parser.add_argument(
        "--jpipe-commit",
        help="measure jpipe as of this commit of the repository (exported to a temporary folder) "
        "instead of the installed/working-tree jpipe",
    )
    parser.add_argument("--jpipe-only", action="store_true")
    parser.add_argument("--maxtext-only", action="store_true")
    parser.add_argument(
        "--tradeoff",
        action="store_true",
        help="jpipe: every schedule also with balanced ticks, R ops and both; print memory against simulated step",
    )
    parser.add_argument("--schedules", help="comma-separated jpipe schedules (default: all of JPIPE_SCHEDULES)")
    parser.add_argument("--maxtext-worker", choices=sorted(MAXTEXT_OPTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.setup:
        setup(args.env)
        return
    if args.maxtext_worker:
        maxtext_worker(args.maxtext_worker, args.result, args.workdir, args.dump)
        return
    check_environment(maxtext=not args.jpipe_only)
    exported = export_jpipe(args.jpipe_commit) if args.jpipe_commit else None
    info = versions()
    if exported:
        info["jpipe"] = f"{args.jpipe_commit} (exported)"
    print("versions:", ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    names = args.schedules.split(",") if args.schedules else list(JPIPE_SCHEDULES)
    variants = [v for v in tradeoff_variants() if v.schedule in names] if args.tradeoff else list(map(Variant, names))
    notes: list[str] = []
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="maxtext_memory_") as scratch:
        workdir = pathlib.Path(scratch)
        if not args.jpipe_only:
            for option in MAXTEXT_OPTIONS:
                result = run_maxtext(option, workdir)
                print(
                    f"MaxText {result.option}: temp {result.temp / MIB:.2f} MiB, total {result.total / MIB:.2f} MiB",
                    flush=True,
                )
                results.append(result)
        if not args.maxtext_only:
            buffers = list(filter(None, args.buffers.split(",")))
            results += measure_jpipe(variants, buffers, args.top, workdir, notes)
    text = table(results, info, notes)
    text += "\n" + "\n".join(tradeoff_lines(results)) + "\n"
    print("\n" + text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
