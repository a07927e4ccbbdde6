"""Convoys: the steps of several sessions that travel the chain together, one pass per node.

Steps that ran in one pass leave it together and go on in one PushMany call (node/rpc/push.py),
but the next node queues them one by one, and the client's generate threads send their next steps
one by one after their shared LM-head product. A node that starts its pass at the first arrival splits them again,
and every
split costs a read of all its weights. So each step may say which convoy it belongs to and how
many steps the convoy has (`Step.convoy`, `Step.convoy_size`): a node holds its next pass, for at
most CONVOY_WAIT seconds, until every convoy in its queue is complete. After the pass, its outputs
leave as a new convoy per destination (the next node, or the client, which then holds its head
product until the convoy's results are all in)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

CONVOY_WAIT = 0.02  # seconds a node's pass may wait for the rest of a convoy (its steps arrive within ~1-3 ms)


def new_convoy_id() -> int:
    """A fresh, non-zero convoy id (ids are only told apart, never trusted)."""
    return random.getrandbits(63) + 1


@dataclass
class Convoy:
    """A step's convoy: the one it came in (`arrived`: id and size, or None) and, once its pass ran, the one its
    output leaves in (`leaves`), among the pass's outputs that go to the same `destination`."""

    arrived: tuple[int, int] | None = None
    destination: str = ""
    leaves: tuple[int, int] | None = None

    @classmethod
    def of(cls, convoy: int, size: int, destination: str) -> "Convoy":
        """From a Step's fields (0 = none; a size below 2 needs no waiting)."""
        return cls((convoy, size) if convoy and size > 1 else None, destination)


def incomplete(convoys: Iterable[Convoy | None]) -> bool:
    """Whether some convoy among these steps still misses steps."""
    counts: Counter[int] = Counter()
    sizes: dict[int, int] = {}
    for convoy in convoys:
        if convoy is not None and convoy.arrived is not None:
            counts[convoy.arrived[0]] += 1
            sizes[convoy.arrived[0]] = convoy.arrived[1]
    return any(counts[ident] < sizes[ident] for ident in counts)


def send_off(convoys: list[Convoy | None]) -> None:
    """After a pass over these steps: their outputs leave as one new convoy per destination."""
    ident = new_convoy_id()
    sizes = Counter(convoy.destination for convoy in convoys if convoy is not None)
    for convoy in convoys:
        if convoy is not None:
            convoy.leaves = (ident, sizes[convoy.destination])
