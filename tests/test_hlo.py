"""jpipe.parallel.hlo on small hand-written scheduled modules: the forms an all-to-all takes."""

from __future__ import annotations

from jpipe.parallel.hlo import collective_overlaps, collectives, op_names

# What the TPU compiler prints under --xla_tpu_enable_async_all_to_all: an async-start wrapping one
# all-to-all, printed as `all-to-all-start`; `a2a` and `a2a.1` overlap, the matmul sits inside both.
_SUGARED = """HloModule m, is_scheduled=true

%body (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4] parameter(0)
  %a2a = ((f32[4,4]), f32[4,4]) all-to-all-start(%p), channel_id=1, dimensions={0}
  %a2a.1 = ((f32[4,4]), f32[4,4]) all-to-all-start(%p), channel_id=2, dimensions={0}
  %done.1 = f32[4,4] all-to-all-done(%a2a.1)
  %mm = f32[4,4] dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="f/dot"}
  %done = f32[4,4] all-to-all-done(%a2a)
  %sync = f32[4,4] all-to-all(%done), channel_id=3, dimensions={0}
  ROOT %out = f32[4,4] add(%sync, %mm)
}

ENTRY %main (x: f32[4,4]) -> f32[4,4] {
  %x = f32[4,4] parameter(0)
  ROOT %w = f32[4,4] while(%x), condition=%cond, body=%body
}
"""

# The unabridged form: a generic async-start calling a computation that holds the all-to-all.
_WRAPPED = """HloModule m, is_scheduled=true

%wrapped (q: f32[4,4]) -> f32[4,4] {
  %q = f32[4,4] parameter(0)
  ROOT %inner = f32[4,4] all-to-all(%q), channel_id=1, dimensions={0}, metadata={op_name="moe/all_to_all"}
}

%body (p: f32[4,4]) -> f32[4,4] {
  %p = f32[4,4] parameter(0)
  %start = ((f32[4,4]), f32[4,4], s32[]) async-start(%p), calls=%wrapped
  %mm = f32[4,4] dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %done = f32[4,4] async-done(%start)
  ROOT %out = f32[4,4] add(%done, %mm)
}

ENTRY %main (x: f32[4,4]) -> f32[4,4] {
  %x = f32[4,4] parameter(0)
  ROOT %w = f32[4,4] while(%x), condition=%cond, body=%body
}
"""


def test_all_to_all_start_done_pairs_and_a_synchronous_one():
    found = {o.name: o for o in collective_overlaps(_SUGARED, "all-to-all")}
    assert set(found) == {"a2a", "a2a.1", "sync"}
    assert found["a2a"].asynchronous and found["a2a"].matmuls_in_flight == ("mm",) and found["a2a"].in_loop
    # a2a.1's done comes before the matmul; a2a's done is found by its whole name, not by a2a.1's.
    assert found["a2a.1"].asynchronous and not found["a2a.1"].hidden
    assert not found["sync"].asynchronous and not found["sync"].hidden


def test_a_generic_async_start_wrapping_an_all_to_all_is_one_asynchronous_all_to_all():
    (found,) = collective_overlaps(_WRAPPED, "all-to-all")
    assert (found.name, found.asynchronous, found.matmuls_in_flight) == ("start", True, ("mm",))
    assert found.in_loop and found.op_name == "moe/all_to_all"
    assert [c.kind for c in collectives(_WRAPPED)] == ["all-to-all"]


def test_op_names_maps_instructions_to_their_metadata():
    assert op_names(_SUGARED) == {"mm": "f/dot"}
