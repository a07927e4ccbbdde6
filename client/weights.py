"""Which nodes' weights a client accepts: each record's weights fingerprint against the model's (docs/swarm.md).

Pure functions over peer records: the config hash says two nodes run the same architecture, the fingerprint
(common/weights/fingerprint.py) that they run the same weights."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from common.swarm.records import PeerRecord


def majority_fingerprint(records: Iterable[PeerRecord]) -> str:
    """The fingerprint announced by the most nodes (one vote a node id); "" if none announces one or two tie."""
    votes = Counter(record.weights for record in {r.node_id: r for r in records}.values() if record.weights)
    ranked = votes.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return ""
    return ranked[0][0]


def same_weights(records: list[PeerRecord], expected: str, unfingerprinted: bool) -> tuple[list[PeerRecord], str]:
    """The records whose weights are `expected` (the model's fingerprint; "" = the majority's), and a line about
    the ones refused ("" if none). Records without a fingerprint (older nodes) pass only if `unfingerprinted`."""
    expected = expected or majority_fingerprint(records)
    kept = [r for r in records if (r.weights == expected if r.weights else unfingerprinted)]
    other = sum(1 for r in records if r.weights and r.weights != expected)
    unknown = sum(1 for r in records if not r.weights) if not unfingerprinted else 0
    notes = []
    if other:
        notes.append(f"{other} node(s) serve other weights of this config (fingerprint is not "
                     f"{expected or 'agreed: no majority'})")
    if unknown:
        notes.append(f"{unknown} node(s) announce no weights fingerprint (older nodes: allow them with "
                     "unfingerprinted=True, --allow-unfingerprinted)")
    return kept, "; ".join(notes)
