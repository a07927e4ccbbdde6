"""Which layout a node's lean weights take, following its load (node/model/fast_linear.py PackedWeight).

On CPU, one-row products (one session decoding) are fastest on plain [in, out] float32 matrices; products of
2 to 16 rows (concurrent sessions sharing a pass, prefills) are ~1.6x faster on MKL-packed ones, which are
~5-10 % slower for one row. Both take the same memory and a node keeps one copy, so it follows its passes:
once a quarter of the recent ones carried several rows it packs its matrices, and once fewer than a tenth do
it unpacks them (one session's prompt now and then does not pack them). It converts one matrix at a time, between passes, only while no step is waiting."""

from __future__ import annotations

from node.model.fast_linear import LEAN_MATRICES, PackedWeight, packable, relayout_one

WEIGHT = 0.1      # how much each pass moves the share of recent passes with several rows
PACK_AT = 0.25    # the share at which the weights get packed (packing pays from ~1 pass in 8 with several rows)
UNPACK_AT = 0.1   # ... and unpacked again (apart, so that a mixed load does not flip back and forth)


class AdaptiveLayout:
    """Per executor: `observe` every pass's row count, then `convert_one` while the compute thread is idle."""

    def __init__(self, lean):
        self.lean = lean
        self.share = 0.0      # decaying share of recent passes that carried more than one row
        self.packed = False   # the layout the matrices are moving to (they start plain)

    @classmethod
    def for_span(cls, lean) -> "AdaptiveLayout | None":
        """An adaptive layout for a lean span whose matrices can be packed here; None otherwise."""
        return cls(lean) if lean is not None and packable(lean) else None

    def observe(self, rows: int) -> None:
        self.share += WEIGHT * ((rows > 1) - self.share)
        if self.share >= PACK_AT:
            self.packed = True
        elif self.share <= UNPACK_AT:
            self.packed = False

    def packed_share(self) -> float:
        """The share of the span's matrices packed now (0 to 1)."""
        kinds = [isinstance(getattr(layer, name), PackedWeight) for layer in self.lean.layers for name in LEAN_MATRICES]
        return sum(kinds) / len(kinds)

    def convert_one(self) -> bool:
        """Move one matrix toward the current layout; False when there is nothing left to move."""
        return relayout_one(self.lean, self.packed)
