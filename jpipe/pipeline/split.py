"""The exact I/W split of a backward pass: every equation of B runs once, in I or in W.

`jax.vjp` gives a backward function `B(g) -> (d_params, d_x)`. Zero-bubble schedules run it as two
ops: I computes `d_x` as early as possible, W computes `d_params` later to fill a bubble. Calling
the vjp twice (once for each output) is correct but W then repeats the whole backward chain. This
module splits B's jaxpr instead:

1. Trace B to a jaxpr whose inputs are the parameters, the stashed forward residuals and the output
   gradient `g`, and inline nested calls (`jit`, `checkpoint`, custom-derivative calls) so every
   equation is visible.
2. Walk the equations backward and give each one a side. **I** gets every equation the input
   gradient depends on, and every forward-recomputing equation (one that does not depend on `g`)
   that does real work (a matmul, a loop) and that anything needs, so W never recomputes the
   forward. **W** gets the rest that the weight gradients need: in practice one contraction per
   weight use (`x^T @ dy`), the reductions for norms and biases, and the casts of their results.
   A `lax.scan` (a stage's loop over layers, or a remat body's loop) is split the same way into an
   I loop and a W loop; what its W body needs from its I body leaves the I loop as a stacked output.
3. The values that cross, computed by I and read by W (the cotangents at the outputs of the
   weight-consuming ops, and the recomputed inputs of those ops under remat), are the *weight
   residuals*: I returns them, the executor keeps them in its weight stash until W.

So I + W evaluates exactly B's equations, each once. Loops, conditionals other than `scan`
(`while`, `cond`) are kept whole on one side. Both halves re-trace B with the same shapes and get
the same jaxpr, hence the same split; the weight residuals' shapes are checked on the W side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.extend import core as jcore

try:  # name stacks make profiles of the split ops read like the original backward
    from jax._src import source_info_util as _source_info
except ImportError:  # pragma: no cover - private module; the split works without it
    _source_info = None

PyTree = Any

# Call-like primitives whose body is inlined before partitioning (their sub-jaxpr parameter).
_INLINED = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
# Equations that do real work: recomputing them in W would repeat forward compute.
_HEAVY = {"dot_general", "conv_general_dilated", "scan", "while", "cond", "custom_linear_solve", "fft"}


def _jaxpr_and_consts(value) -> tuple[jcore.Jaxpr, Sequence]:
    if isinstance(value, jcore.ClosedJaxpr):
        return value.jaxpr, value.consts
    return value, ()


def _bind(eqn: jcore.JaxprEqn, invals: Sequence) -> list:
    """Evaluate one equation on `invals` (as `jax.core.eval_jaxpr` does)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        invals = [*subfuns, *invals]
    if _source_info is not None:
        name_stack = _source_info.current_name_stack() + eqn.source_info.name_stack
        with _source_info.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
            out = eqn.primitive.bind(*invals, **params)
    else:
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _read(env: dict, atom) -> Any:
    return atom.val if isinstance(atom, jcore.Literal) else env[atom]


def _live_eqns(jaxpr: jcore.Jaxpr) -> list[jcore.JaxprEqn]:
    """The equations some output depends on (dead code removed, effects kept)."""
    live = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(v in live for v in eqn.outvars if isinstance(v, jcore.Var)):
            kept.append(eqn)
            live.update(v for v in eqn.invars if isinstance(v, jcore.Var))
    return kept[::-1]


def _eval_inlined(jaxpr: jcore.Jaxpr, consts: Sequence, args: Sequence) -> list:
    """Evaluate `jaxpr`, inlining call-like equations and re-tracing scan bodies the same way."""
    env: dict = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in _live_eqns(jaxpr):
        invals = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _INLINED and _INLINED[name] in eqn.params:
            sub, sub_consts = _jaxpr_and_consts(eqn.params[_INLINED[name]])
            outs = _eval_inlined(sub, sub_consts, invals)
        elif name == "scan":
            outs = _scan(eqn, invals, lambda body, c, a: _eval_inlined(body, c, a))
        else:
            outs = _bind(eqn, invals)
        env.update((v, o) for v, o in zip(eqn.outvars, outs) if not isinstance(v, jcore.DropVar))
    return [_read(env, v) for v in jaxpr.outvars]


def _scan_counts(params: dict) -> tuple[int, int]:
    """(constants, carries) of a scan equation's flat inputs.

    jax <= 0.10 stores them as `num_consts`/`num_carry`; newer jax as `ft_in`, a tuple of the
    (constants, carries, scanned inputs) groups.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts.vals), len(carry.vals)


def _scan(eqn: jcore.JaxprEqn, invals: Sequence, run_body: Callable) -> list:
    """Re-run a scan equation with `run_body(body_jaxpr, body_consts, body_args) -> body_outs`."""
    p = eqn.params
    body, body_consts = _jaxpr_and_consts(p["jaxpr"])
    nc, nk = _scan_counts(p)
    consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]

    def step(carry, x):
        outs = run_body(body, body_consts, [*consts, *carry, *x])
        return outs[:nk], outs[nk:]

    carry, ys = lax.scan(step, list(init), list(xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]


# --- the partition -------------------------------------------------------------------------------

I_SIDE, W_SIDE, BOTH = "I", "W", "both"


@dataclasses.dataclass
class _ScanPlan:
    """How a scan equation is split: its body's plan and which carries each half owns."""

    body: _Plan
    i_carries: list[int]
    w_carries: list[int]
    i_ys: list[int]  # ys outputs the I loop produces
    w_ys: list[int]  # ys outputs the W loop produces


@dataclasses.dataclass
class _Plan:
    """The partition of one jaxpr.

    side: per equation index, "I", "W", "split" (a scan run as an I loop and a W loop) or absent (dead).
    scans: the split plans of "split" equations.
    boundary: I-side values W reads, in a fixed order (Vars, or (eqn index, k) for a split scan's
      k-th stacked boundary output).
    i_reads, w_reads: indices of the jaxpr's invars each half reads.
    """

    side: dict[int, str]
    scans: dict[int, _ScanPlan]
    boundary: list
    i_reads: set[int]
    w_reads: set[int]


def _taint(jaxpr: jcore.Jaxpr, tainted_in: Sequence[bool]) -> tuple[set, list[bool]]:
    """Vars that depend on a tainted (cotangent) input, and per-outvar taint."""
    tainted = {v for v, t in zip(jaxpr.invars, tainted_in) if t}
    for eqn in jaxpr.eqns:
        ins = [isinstance(v, jcore.Var) and v in tainted for v in eqn.invars]
        if eqn.primitive.name == "scan":
            outs = _scan_taint(eqn, ins)
        else:
            outs = [any(ins)] * len(eqn.outvars)
        tainted.update(v for v, t in zip(eqn.outvars, outs) if t)
    return tainted, [isinstance(v, jcore.Var) and v in tainted for v in jaxpr.outvars]


def _scan_taint(eqn: jcore.JaxprEqn, tainted_in: Sequence[bool]) -> list[bool]:
    p = eqn.params
    body, _ = _jaxpr_and_consts(p["jaxpr"])
    nc, nk = _scan_counts(p)
    carry = list(tainted_in[nc : nc + nk])
    while True:
        _, outs = _taint(body, [*tainted_in[:nc], *carry, *tainted_in[nc + nk :]])
        merged = [a or b for a, b in zip(carry, outs[:nk])]
        if merged == carry:
            return [*carry, *outs[nk:]]
        carry = merged


def _var_sides(jaxpr: jcore.Jaxpr, invar_side: Sequence[str], side: dict[int, str], scans: dict) -> dict:
    """Each var's side: its invar side, BOTH for constvars, else the side of the equation defining it
    (for a split scan, per output: I for the carries and outputs its I loop produces)."""
    var_side: dict = {v: s for v, s in zip(jaxpr.invars, invar_side)}
    var_side.update((v, BOTH) for v in jaxpr.constvars)
    for index, eqn in enumerate(jaxpr.eqns):
        if index not in side:
            continue
        if side[index] == "split":
            plan = scans[index]
            nk = _scan_counts(eqn.params)[1]
            for k, v in enumerate(eqn.outvars):
                owner = I_SIDE if (k in plan.i_carries if k < nk else k - nk in plan.i_ys) else W_SIDE
                var_side[v] = owner
        else:
            var_side.update((v, side[index]) for v in eqn.outvars)
    return var_side


def _partition(
    jaxpr: jcore.Jaxpr,
    tainted_in: Sequence[bool],
    invar_side: Sequence[str],
    need_i: Sequence[bool],
    need_w: Sequence[bool],
) -> tuple[_Plan, dict]:
    """Assign every equation of `jaxpr` to I or W (or split it), walking backward once.

    Args:
      tainted_in: per invar, whether it depends on the output gradient.
      invar_side: per invar, "I" (only I has it: W reads it as a boundary value) or "both".
      need_i, need_w: per outvar, whether the I half / the W half must produce it. An outvar both
        halves need is produced by I (and crosses as a boundary value when W reads it).

    Returns:
      The plan, and each defined var's side ("I", "W" or "both" for invars both halves have).
    """
    tainted, _ = _taint(jaxpr, tainted_in)
    want_i = {v for v, n in zip(jaxpr.outvars, need_i) if n and isinstance(v, jcore.Var)}
    want_w = {v for v, n in zip(jaxpr.outvars, need_w) if n and isinstance(v, jcore.Var)}
    side: dict[int, str] = {}
    scans: dict[int, _ScanPlan] = {}
    i_inputs: dict[int, list] = {}
    w_inputs: dict[int, list] = {}
    for index in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[index]
        outs = eqn.outvars
        out_i = [isinstance(v, jcore.Var) and v in want_i for v in outs]
        out_w = [isinstance(v, jcore.Var) and v in want_w for v in outs]
        if not any(out_i) and not any(out_w):
            if not eqn.effects:
                continue
            out_i = [True] * len(outs)  # effects (e.g. debug callbacks) run once, in I
        ins_tainted = [isinstance(v, jcore.Var) and v in tainted for v in eqn.invars]
        if eqn.primitive.name == "scan" and any(ins_tainted):
            plan = _partition_scan(eqn, ins_tainted, out_i, out_w)
            if plan.i_carries or plan.i_ys or plan.body.boundary:
                if plan.w_carries or plan.w_ys:
                    side[index], scans[index] = "split", plan
                    i_inputs[index] = [eqn.invars[k] for k in sorted(plan.body.i_reads)]
                    w_inputs[index] = [eqn.invars[k] for k in sorted(plan.body.w_reads)]
                else:
                    side[index], i_inputs[index] = I_SIDE, list(eqn.invars)
            else:
                side[index], w_inputs[index] = W_SIDE, list(eqn.invars)
        elif any(out_i):
            side[index], i_inputs[index] = I_SIDE, list(eqn.invars)
        elif not any(ins_tainted) and eqn.primitive.name in _HEAVY:
            # Forward recompute that only W needs: run it in I, so W never recomputes the forward.
            side[index], i_inputs[index] = I_SIDE, list(eqn.invars)
        else:
            side[index], w_inputs[index] = W_SIDE, list(eqn.invars)
        want_i.update(v for v in i_inputs.get(index, ()) if isinstance(v, jcore.Var))
        want_w.update(v for v in w_inputs.get(index, ()) if isinstance(v, jcore.Var))

    var_side = _var_sides(jaxpr, invar_side, side, scans)

    # Boundary: I-side values that a W-side reader (a W equation, a split scan's W loop, or a
    # W-needed outvar not produced by I) reads.
    boundary: list = []
    seen: set = set()

    def cross(v):
        if isinstance(v, jcore.Var) and var_side.get(v) == I_SIDE and v not in seen:
            seen.add(v)
            boundary.append(v)

    for index, eqn in enumerate(jaxpr.eqns):
        if side.get(index) == W_SIDE:
            for v in eqn.invars:
                cross(v)
        elif side.get(index) == "split":
            for v in w_inputs[index]:
                cross(v)
            boundary.extend((index, k) for k in range(len(scans[index].body.boundary)))
    for v, n in zip(jaxpr.outvars, need_w):
        if n:
            cross(v)
    i_reads = {k for k, v in enumerate(jaxpr.invars) if v in want_i}
    w_reads = {k for k, v in enumerate(jaxpr.invars) if v in want_w and invar_side[k] != I_SIDE}
    return _Plan(side, scans, boundary, i_reads, w_reads), var_side


def _partition_scan(eqn: jcore.JaxprEqn, tainted_in: Sequence[bool], out_i: list[bool], out_w: list[bool]) -> _ScanPlan:
    """Split a scan: carries owned by I are those I needs (closed under the body's reads)."""
    p = eqn.params
    body, _ = _jaxpr_and_consts(p["jaxpr"])
    nc, nk = _scan_counts(p)
    num_ys = len(eqn.outvars) - nk
    carry_taint = _scan_taint(eqn, tainted_in)[:nk]
    body_tainted = [*tainted_in[:nc], *carry_taint, *tainted_in[nc + nk :]]
    i_carries = {k for k in range(nk) if out_i[k]}
    w_carries = {k for k in range(nk) if out_w[k] and k not in i_carries}
    while True:
        invar_side = [BOTH] * nc + [I_SIDE if k in i_carries else BOTH for k in range(nk)]
        invar_side += [BOTH] * (len(body.invars) - nc - nk)
        need_i = [k in i_carries for k in range(nk)] + out_i[nk:]
        need_w = [k in w_carries for k in range(nk)] + [w and not i for w, i in zip(out_w[nk:], out_i[nk:])]
        plan, var_side = _partition(body, body_tainted, invar_side, need_i, need_w)
        grown_i = i_carries | {k for k in range(nk) if nc + k in plan.i_reads}
        grown_w = (w_carries | {k for k in range(nk) if nc + k in plan.w_reads}) - grown_i
        if grown_i == i_carries and grown_w == w_carries:
            break
        i_carries, w_carries = grown_i, grown_w
    # A ys output I must produce, or that is I-side in the body, comes out of the I loop.
    i_ys, w_ys = [], []
    for j in range(num_ys):
        v = body.outvars[nk + j]
        if out_i[nk + j] or (out_w[nk + j] and isinstance(v, jcore.Var) and var_side.get(v) == I_SIDE):
            i_ys.append(j)
        elif out_w[nk + j]:
            w_ys.append(j)
    # The W loop reads W-carry inits and the consts/xs its body reads; the I loop likewise.
    plan.i_reads = {k for k in plan.i_reads if not nc <= k < nc + nk} | {nc + k for k in i_carries}
    plan.w_reads = {k for k in plan.w_reads if not nc <= k < nc + nk} | {nc + k for k in w_carries}
    return _ScanPlan(plan, sorted(i_carries), sorted(w_carries), i_ys, w_ys)


# --- running the halves --------------------------------------------------------------------------


def _run_half(jaxpr: jcore.Jaxpr, plan: _Plan, env: dict, half: str) -> None:
    """Evaluate, in order, the equations of `half` ("I" or "W") and that half of each split scan."""
    for index, eqn in enumerate(jaxpr.eqns):
        kind = plan.side.get(index)
        if kind == half:
            outs = _bind(eqn, [_read(env, v) for v in eqn.invars])
            env.update((v, o) for v, o in zip(eqn.outvars, outs) if not isinstance(v, jcore.DropVar))
        elif kind == "split":
            _run_scan_half(eqn, plan.scans[index], index, env, half)


def _run_i(jaxpr: jcore.Jaxpr, consts: Sequence, plan: _Plan, env: dict, outputs: Sequence) -> tuple[list, list]:
    """Run the I half: `env` holds the invars I reads; returns (values of `outputs`, boundary)."""
    env = {**dict(zip(jaxpr.constvars, consts)), **env}
    _run_half(jaxpr, plan, env, I_SIDE)
    crossing = [env[v] if isinstance(v, tuple) else _read(env, v) for v in plan.boundary]
    return [_read(env, v) for v in outputs], crossing


def _run_w(jaxpr: jcore.Jaxpr, consts: Sequence, plan: _Plan, env: dict, boundary: Sequence, outputs: Sequence) -> list:
    """Run the W half: `env` holds the invars W reads, `boundary` what I handed over."""
    env = {**dict(zip(jaxpr.constvars, consts)), **env, **dict(zip(plan.boundary, boundary))}
    _run_half(jaxpr, plan, env, W_SIDE)
    return [_read(env, v) for v in outputs]


def _run_scan_half(eqn: jcore.JaxprEqn, split: _ScanPlan, index: int, env: dict, half: str) -> None:
    """Run one loop of a split scan, writing its outputs (and, for I, its stacked boundary) to `env`."""
    p = eqn.params
    body, body_consts = _jaxpr_and_consts(p["jaxpr"])
    nc, nk = _scan_counts(p)
    plan = split.body
    reads = sorted(plan.i_reads if half == I_SIDE else plan.w_reads)
    const_reads = [k for k in reads if k < nc]
    xs_reads = [k for k in reads if k >= nc + nk]
    carries = split.i_carries if half == I_SIDE else split.w_carries
    ys = split.i_ys if half == I_SIDE else split.w_ys
    consts = {body.invars[k]: _read(env, eqn.invars[k]) for k in const_reads}
    init = [_read(env, eqn.invars[nc + k]) for k in carries]
    xs = [_read(env, eqn.invars[k]) for k in xs_reads]
    carry_outs = [body.outvars[k] for k in carries]
    ys_outs = [body.outvars[nk + j] for j in ys]
    if half == W_SIDE:
        xs += [env[(index, k)] for k in range(len(plan.boundary))]

    def step(carry, x):
        local = {**consts, **dict(zip([body.invars[nc + k] for k in carries], carry))}
        local.update(zip([body.invars[k] for k in xs_reads], x[: len(xs_reads)]))
        if half == I_SIDE:
            outs, crossing = _run_i(body, body_consts, plan, local, carry_outs + ys_outs)
            return outs[: len(carries)], outs[len(carries) :] + crossing
        outs = _run_w(body, body_consts, plan, local, x[len(xs_reads) :], carry_outs + ys_outs)
        return outs[: len(carries)], outs[len(carries) :]

    carry, stacked = lax.scan(step, init, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    env.update(zip([eqn.outvars[k] for k in carries], carry))
    env.update(zip([eqn.outvars[nk + j] for j in ys], stacked[: len(ys)]))
    if half == I_SIDE:
        env.update(((index, k), b) for k, b in enumerate(stacked[len(ys) :]))


# --- the public pair -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitBackward:
    """The I/W split of `backward(params, residuals, g) -> (d_params, d_x)`.

    `backward` must be traceable; its jaxpr is re-derived (cheaply) on each call, so `input_grad`
    and `weight_grad` may be called in different traces.
    """

    backward: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]

    def _analyse(self, params, residuals, g):
        closed, out_tree = jax.make_jaxpr(self.backward, return_shape=True)(params, residuals, g)
        flat_in = [jax.tree.leaves(t) for t in (params, residuals, g)]
        n_params, n_res, n_g = (len(f) for f in flat_in)
        # Inline calls so every equation is visible; keep the flat argument order.
        flat = [x for f in flat_in for x in f]
        inlined = jax.make_jaxpr(lambda *a: _eval_inlined(closed.jaxpr, closed.consts, a))(*flat)
        jaxpr = inlined.jaxpr
        n_dparams = len(jax.tree.leaves(out_tree[0]))
        n_out = len(jaxpr.outvars)
        tainted = [False] * (n_params + n_res) + [True] * n_g
        invar_side = [BOTH] * (n_params + n_res) + [I_SIDE] * n_g
        need_w = [k < n_dparams for k in range(n_out)]
        need_i = [k >= n_dparams for k in range(n_out)]
        plan, _ = _partition(jaxpr, tainted, invar_side, need_i, need_w)
        return inlined, plan, out_tree, n_dparams

    def input_grad(self, params: PyTree, residuals: PyTree, g: PyTree) -> tuple[PyTree, list[jax.Array]]:
        """I: `(d_x, weight_residuals)`; weight_residuals is a flat list of arrays."""
        inlined, plan, out_tree, n_dparams = self._analyse(params, residuals, g)
        jaxpr = inlined.jaxpr
        args = [x for t in (params, residuals, g) for x in jax.tree.leaves(t)]
        env = {jaxpr.invars[k]: args[k] for k in plan.i_reads}
        outs, boundary = _run_i(jaxpr, inlined.consts, plan, env, jaxpr.outvars[n_dparams:])
        return jax.tree.unflatten(jax.tree.structure(out_tree[1]), outs), boundary

    def weight_grad(self, params: PyTree, residuals: PyTree, g_like: PyTree, weight_residuals: Sequence) -> PyTree:
        """W: `d_params` from what `input_grad` returned (`g_like` gives only the output gradient's shapes)."""
        inlined, plan, out_tree, n_dparams = self._analyse(params, residuals, g_like)
        jaxpr = inlined.jaxpr
        if len(weight_residuals) != len(plan.boundary):
            raise AssertionError("I and W traced different backward jaxprs")  # pragma: no cover
        args = [x for t in (params, residuals, g_like) for x in jax.tree.leaves(t)]
        env = {jaxpr.invars[k]: args[k] for k in plan.w_reads}
        outs = _run_w(jaxpr, inlined.consts, plan, env, weight_residuals, jaxpr.outvars[:n_dparams])
        return jax.tree.unflatten(jax.tree.structure(out_tree[0]), outs)
