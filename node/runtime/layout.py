"""Which layout a node's lean weights take, following its load (common/weights/fast_linear.py PackedWeight).

On CPU, one-row products (one session decoding) are fastest on plain [in, out] float32 matrices; products of
2 to 32 rows (concurrent sessions sharing a pass) are ~1.6x faster on MKL-packed ones, which are ~5-10 %
slower for one row. Longer passes (prefill chunks) gain little either way and do not count. Both layouts take
the same memory and a node keeps one copy, so it follows its passes: once a quarter of the recent ones carried
2 to 32 rows it packs its matrices, and once fewer than a tenth do it unpacks them.

The compute thread converts between passes, only while no step waits, in small pieces: packing a matrix is
one copy (~1 ms). Unpacking one reads it again from the model's safetensors files where the span came from
them (a copy, ~1-5 ms; checked against the packed matrix on a probe product); otherwise it is a product with
the identity matrix (exact), done 64 rows at a time (~1 ms each, ~0.8 s of 2-thread products for a third of
SmolLM2), which slows the sessions that run meanwhile."""

from __future__ import annotations

import logging

import torch

from common.weights.fast_linear import PACKED_ROWS, PackedWeight
from node.model.compact import packable
from node.model.lean import LEAN_MATRICES, LEAN_PROJECTIONS

log = logging.getLogger(__name__)

WEIGHT = 0.1        # how much each pass moves the share of recent passes with several rows
PACK_AT = 0.25      # the share at which the weights get packed (packing pays from ~1 pass in 8 with several rows)
UNPACK_AT = 0.1     # ... and unpacked again (apart, so that a mixed load does not flip back and forth)
UNPACK_ROWS = 64    # rows of a matrix unpacked per piece


class AdaptiveLayout:
    """Per executor: `observe` every pass's row count, and call `convert_one` while the compute thread idles."""

    def __init__(self, lean, source=None):
        self.lean = lean
        self.source = source  # node/model/loader.WeightSource to read matrices again from (None: unpack by products)
        self.read_again = 0   # matrices unpacked by reading them again
        self.share = 0.0      # decaying share of recent passes that carried 2 to 32 rows
        self.packed = False   # the layout the matrices are moving to (they start plain)
        self._unpacking: tuple[object, str, torch.Tensor, int] | None = None  # (layer, name, W_t so far, rows done)
        self._settled: bool | None = False  # every matrix is packed (True) or plain (False); None: mixed

    @classmethod
    def for_span(cls, lean, source=None) -> "AdaptiveLayout | None":
        """An adaptive layout for a lean span whose matrices can be packed here; None otherwise. `source`: where
        its weights can be read again (node/model/loader.WeightSource), or None."""
        return cls(lean, source) if lean is not None and packable(lean) else None

    def observe(self, rows: int) -> None:
        if rows > PACKED_ROWS[-1]:
            return
        self.share += WEIGHT * ((rows in PACKED_ROWS) - self.share)
        if self.share >= PACK_AT:
            self.packed = True
        elif self.share <= UNPACK_AT:
            self.packed = False

    def converting(self) -> bool:
        """Whether the matrices are not all in the current layout yet (`convert_one` has work)."""
        return self._settled != self.packed

    def packed_share(self) -> float:
        """The share of the span's matrices packed now (0 to 1)."""
        kinds = [isinstance(getattr(layer, name), PackedWeight) for layer in self.lean.layers for name in LEAN_MATRICES]
        return sum(kinds) / len(kinds)

    def convert_one(self) -> bool:
        """One piece of work toward the current layout; False when there is nothing left to do (no scan then:
        it runs after every pass)."""
        if self._settled == self.packed:
            return False
        self._settled = None
        if self.packed:
            self._unpacking = None  # a half-unpacked matrix stays packed
            for layer, name in self._matrices():
                if isinstance(getattr(layer, name), torch.Tensor):
                    setattr(layer, name, PackedWeight(getattr(layer, name)))
                    return True
            self._settled = True
            return False
        if self._unpacking is None:
            index, layer, name = next(((index, layer, name) for index, (layer, name) in enumerate(self._matrices())
                                       if isinstance(getattr(layer, name), PackedWeight)), (None, None, None))
            if layer is None:
                self._settled = False
                return False
            weight = getattr(layer, name)
            plain = self._read_again(index // len(LEAN_MATRICES), name, weight)
            if plain is not None:
                setattr(layer, name, plain)
                self.read_again += 1
                return True
            self._unpacking = (layer, name, torch.empty(weight.in_features, weight.out_features), 0)
        layer, name, plain, done = self._unpacking
        stop = min(done + UNPACK_ROWS, plain.shape[0])
        plain[done:stop] = getattr(layer, name).unpack(done, stop)
        if stop == plain.shape[0]:
            setattr(layer, name, plain)
            self._unpacking = None
        else:
            self._unpacking = (layer, name, plain, stop)
        return True

    def _read_again(self, layer: int, name: str, packed: PackedWeight) -> torch.Tensor | None:
        """Matrix `name` of the span's `layer`-th layer read again from the model files, if it can be and it is the
        matrix that was packed (a probe product through both agrees); None otherwise (then no more reading)."""
        if self.source is None:
            return None
        try:
            plain = self.source.matrix(self.lean.start + layer, LEAN_PROJECTIONS[name])
        except Exception as error:  # a file gone or changed since the load: unpack by products from now on
            log.warning("cannot read the weights again (%s); unpacking by products", error)
            plain = None
        if plain is not None and plain.shape == (packed.in_features, packed.out_features):
            probe = torch.randn(2, packed.in_features, generator=torch.Generator().manual_seed(0))
            expected = packed.product(probe)
            if torch.allclose(probe @ plain, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())):
                return plain
            log.warning("the weights read again differ from the packed ones; unpacking by products")
        self.source = None
        return None

    def _matrices(self):
        for layer in self.lean.layers:
            for name in LEAN_MATRICES:
                yield layer, name
