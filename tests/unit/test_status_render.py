"""`potluck status` output: columns dropped (never "…"-truncated) at 80 columns, everything when piped, the
--watch frames, and listening that stops once the swarm is complete."""

import asyncio
import hashlib
import io
import re
import time

from rich.console import Console

from client.status import (
    COLUMNS,
    ModelView,
    complete,
    fit_columns,
    group_by_model,
    listen,
    render,
    status_console,
    watch_frame,
    watch_frames,
)
from common.swarm.records import NodeState, PeerRecord


def _record(i, model, start, end, num_layers, **fields):
    now = time.time()
    return PeerRecord(node_id=f"{i:02x}" * 32, addresses=(f"192.168.100.{100 + i}:31337",), model_id=model,
                      config_hash=hashlib.sha256(model.encode()).hexdigest()[:12], num_layers=num_layers,
                      start=start, end=end, issued_at=now, expires_at=now + 60, seq=1, **fields)


def _swarm():
    big = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    small = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return [
        _record(1, big, 0, 12, 24, name="alices-gaming-laptop", device="cuda:0", dtype="bfloat16", quant="nf4",
                adapters=("pirate-speak", "legal-summaries"), throughput=123.4, free_cache_tokens=1048576),
        _record(2, big, 12, 20, 24, name="bobs-workstation-under-the-desk", dtype="float32", quant="int8",
                throughput=17.25, load=3, free_cache_tokens=65536, state=NodeState.JOINING),
        _record(3, small, 0, 30, 30, name="carol", throughput=88.0, free_cache_tokens=32768),
        _record(4, small, 10, 30, 30, name="dave-raspberry-pi-cluster-node-7", device="cpu", quant="q4",
                throughput=2.5, state=NodeState.DRAINING),
    ]


def _render(width, file=None):
    file = file or io.StringIO()
    console = Console(file=file, width=width) if width else status_console(file)
    render(group_by_model(_swarm()), console)
    return file.getvalue()


def _cells(record):
    view = ModelView(record.config_hash, record.model_id, record.num_layers, [record])
    return {column.name: column.cell(view, record) for column in COLUMNS}


def test_at_80_columns_columns_are_dropped_and_every_shown_value_is_whole():
    out = _render(80)
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    shown = fit_columns(group_by_model(_swarm()), 80)
    assert [c.name for c in shown][:2] == ["node", "address"] and len(shown) < len(COLUMNS)
    for record in _swarm():
        for name in ("node", "address", "span", "state"):
            assert _cells(record)[name] in out, name
    assert "hidden at 80 columns: " in out and "adapters" in out.split("hidden at")[1]
    assert "WARNING: no node serves layers 12:24" in " ".join(out.split())


def test_at_200_columns_and_piped_every_column_and_value_shows():
    for out in (_render(200), _render(None, io.StringIO())):  # a StringIO is not a terminal: the pipe width
        assert "…" not in out and "hidden at" not in out
        for record in _swarm():
            for name, value in _cells(record).items():
                assert value in out, (name, value)
        header = next(line for line in out.splitlines() if "free cache" in line)
        assert all(column.name in header for column in COLUMNS)


def test_a_narrow_terminal_keeps_the_columns_that_cannot_go():
    shown = [c.name for c in fit_columns(group_by_model(_swarm()), 20)]
    assert shown == [c.name for c in COLUMNS if c.priority == 0]


def test_a_watch_frame_has_the_time_and_the_tables():
    console = Console(file=io.StringIO(), width=120)
    console.print(watch_frame(group_by_model(_swarm()), 120, 1.5, now=time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))))
    out = console.file.getvalue()
    assert "03:04:05" in out and "every 1.5 s" in out and "carol" in out


class _FakeMembership:
    """What the watch loop and `listen` use of a Membership; each pull reveals the next node."""

    def __init__(self, records, reveal_per_pull=1):
        self.pending = list(records)
        self.known = []
        self.refused = set()
        self.reveal = reveal_per_pull
        self.changed = asyncio.Event()
        self.pulls = 0

    async def pull_all(self):
        self.pulls += 1
        self.known += self.pending[: self.reveal]
        del self.pending[: self.reveal]

    async def exchange(self, address, push=True):
        return True

    def live(self):
        return list(self.known)


def test_watch_redraws_each_round_and_stops_by_itself():
    membership = _FakeMembership(_swarm())
    file = io.StringIO()
    console = Console(file=file, width=200, force_terminal=True)
    started = time.monotonic()
    asyncio.run(watch_frames(membership, 0.05, console, rounds=3))
    assert time.monotonic() - started < 5 and membership.pulls == 3
    raw = file.getvalue()
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert out.count("potluck status ") >= 3 and "\x1b[1A" in raw  # frames drawn over each other (cursor up)
    assert "carol" in out and "dave-raspberry-pi-cluster-node-7" not in out  # the 4th node came after 3 pulls


def test_listen_stops_as_soon_as_every_models_layers_are_served():
    records = [_record(1, "m", 0, 4, 8), _record(2, "m", 4, 8, 8)]
    assert not complete(records[:1]) and complete(records) and not complete([])
    membership = _FakeMembership(records)
    started = time.monotonic()
    asyncio.run(listen(membership, 30))
    assert time.monotonic() - started < 5 and len(membership.live()) == 2
    gap = _FakeMembership([_record(1, "m", 0, 4, 8)])  # a gap: listens the whole (short) wait
    started = time.monotonic()
    asyncio.run(listen(gap, 0.6))
    assert time.monotonic() - started >= 0.6
