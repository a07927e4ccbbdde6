"""`potluck status`: the swarm as records, coverage bars and warnings."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from client.routing import PeerInfo, missing_spans
from common.swarm.membership import Membership, SwarmConfig
from common.swarm.placement import Server, layer_throughput
from common.swarm.records import NodeState, PeerRecord

log = logging.getLogger(__name__)
BAR_CHARS = " ▁▂▃▄▅▆▇█"
PIPE_WIDTH = 400  # the console width when stdout is not a terminal: every column, every value whole


@dataclass
class ModelView:
    config_hash: str
    model_id: str
    num_layers: int
    nodes: list[PeerRecord]
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # node_id -> bytes by part (`ask_memory`)

    @property
    def serving(self) -> list[PeerRecord]:
        return [n for n in self.nodes if n.state == NodeState.ONLINE]

    def layer_throughput(self) -> list[float]:
        servers = [Server(n.node_id, n.start, n.end, n.throughput) for n in self.serving]
        return layer_throughput(servers, self.num_layers)

    def missing(self) -> list[tuple[int, int]]:
        return missing_spans([PeerInfo(n.address, n.start, n.end) for n in self.serving], self.num_layers)


def group_by_model(records: list[PeerRecord]) -> list[ModelView]:
    views: dict[str, ModelView] = {}
    for record in records:
        view = views.setdefault(
            record.config_hash, ModelView(record.config_hash, record.model_id, record.num_layers, [])
        )
        view.nodes.append(record)
    for view in views.values():
        view.nodes.sort(key=lambda r: (r.start, r.end, r.node_id))
    return sorted(views.values(), key=lambda v: v.model_id)


def coverage_bar(view: ModelView) -> str:
    """One character per layer: blank = uncovered, higher blocks = more throughput."""
    totals = view.layer_throughput()
    top = max(totals) or 1.0
    return "".join(BAR_CHARS[0] if t <= 0 else BAR_CHARS[max(1, round(t / top * (len(BAR_CHARS) - 1)))] for t in totals)


def complete(records: list[PeerRecord]) -> bool:
    """Whether what we heard could be the whole swarm: some records, and every model's layers all served."""
    return bool(records) and not any(view.missing() for view in group_by_model(records))


async def listen(membership, wait: float) -> None:
    """Listen for nodes (mDNS answers, gossip pulls) until the records are `complete` and one more pull from
    every known node brings nothing new, or at most `wait` seconds (a swarm with a gap waits them all)."""
    deadline = time.monotonic() + wait
    while True:
        records = membership.live()
        if complete(records):
            before = {(r.node_id, r.seq) for r in records}
            await asyncio.gather(*(membership.exchange(r.address, push=False) for r in records))
            if {(r.node_id, r.seq) for r in membership.live()} <= before:
                return
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return
        membership.changed.clear()
        try:
            await asyncio.wait_for(membership.changed.wait(), min(left, 0.5))
        except asyncio.TimeoutError:
            await membership.pull_all()


def open_membership(config: SwarmConfig, security=None, dht=None):
    """A membership that only listens: gossip and mDNS, or (`dht`: a common.swarm.dht.DhtConfig) the DHT."""
    if dht is not None:
        from common.swarm.dht import DhtDiscovery

        return DhtDiscovery(dht, security=security) if security is not None else DhtDiscovery(dht)
    return Membership(config, security=security) if security is not None else Membership(config)


def _records(membership) -> list[PeerRecord]:
    records = membership.live()
    if not records and membership.refused:
        raise PermissionError(
            f"{', '.join(sorted(membership.refused))} refused the call (UNAUTHENTICATED): a private swarm; "
            "give its key with --swarm-key (and the same --tls as its nodes)")
    return records


async def collect(config: SwarmConfig, wait: float, security=None, dht=None) -> list[PeerRecord]:
    """Every live record, from gossip and mDNS, or (`dht`) from the DHT's keys."""
    membership = open_membership(config, security, dht)
    try:
        await membership.start()
        if dht is None:
            await listen(membership, wait)
        await membership.pull_all()
        return _records(membership)
    finally:
        await membership.close()


async def watch(config: SwarmConfig, wait: float, interval: float, console: Console, security=None, dht=None,
                rounds: int | None = None) -> None:
    """Redraw the swarm every `interval` seconds until cancelled (Ctrl-C), or after `rounds` frames."""
    membership = open_membership(config, security, dht)
    try:
        await membership.start()
        if dht is None:
            await listen(membership, wait)
        await watch_frames(membership, interval, console, rounds)
    finally:
        await membership.close()


async def watch_frames(membership, interval: float, console: Console, rounds: int | None = None) -> None:
    """The --watch loop over an open membership: pull, redraw in place (rich Live), sleep."""
    from rich.live import Live

    shown = 0
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while rounds is None or shown < rounds:
            await membership.pull_all()
            live.update(watch_frame(group_by_model(_records(membership)), console.width, interval), refresh=True)
            shown += 1
            if rounds is None or shown < rounds:
                await asyncio.sleep(interval)


def watch_frame(views: list[ModelView], width: int, interval: float, now: float | None = None) -> RenderableType:
    """One --watch frame: a header line with the time, then the same tables as `potluck status`."""
    stamp = time.strftime("%H:%M:%S", time.localtime(time.time() if now is None else now))
    header = Text(f"potluck status  {stamp}  (every {interval:g} s; Ctrl-C to stop)", style="dim")
    return Group(header, frame(views, width))


async def ask_memory(views: list[ModelView], security=None, timeout: float = 3.0) -> None:
    """Fill each view's `memory` from its nodes' Info (a node that does not answer has none)."""
    from client.transport import Peer

    async def one(view: ModelView, record: PeerRecord) -> None:
        peer = Peer(record.address, security) if security is not None else Peer(record.address)
        try:
            info = await peer.info(timeout)
            if info.memory:
                view.memory[record.node_id] = dict(info.memory)
        except Exception as error:  # status shows what it can: an unreachable node has no memory column
            log.debug("no memory from %s: %s", record.address, error)
        finally:
            await peer.close()

    await asyncio.gather(*(one(view, record) for view in views for record in view.nodes))


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f}"


def memory_cell(memory: dict[str, int] | None) -> str:
    """resident MiB (peak), then weights + cache + runtime baseline."""
    if not memory:
        return "-"
    return (f"{_mib(memory.get('resident', 0))} MiB (peak {_mib(memory.get('peak', 0))}): "
            f"{_mib(memory.get('weights', 0))} weights + {_mib(memory.get('kv_cache', 0))} cache + "
            f"{_mib(memory.get('baseline', 0))} runtime")


def as_json(views: list[ModelView]) -> dict:
    now = time.time()
    return {
        "models": [
            {
                "model_id": v.model_id,
                "config_hash": v.config_hash,
                "num_layers": v.num_layers,
                "missing_layers": [list(span) for span in v.missing()],
                "layer_throughput": v.layer_throughput(),
                "nodes": [
                    {
                        "node_id": n.node_id, "name": n.name, "address": n.address, "start": n.start, "end": n.end,
                        "device": n.device, "dtype": n.dtype, "quant": n.quant, "adapters": list(n.adapters),
                        "throughput": n.throughput, "load": n.load,
                        "free_cache_tokens": n.free_cache_tokens, "state": n.state.value,
                        "expires_in": round(n.expires_at - now, 1), "memory": v.memory.get(n.node_id, {}),
                    }
                    for n in v.nodes
                ],
            }
            for v in views
        ]
    }


@dataclass(frozen=True)
class Column:
    name: str
    priority: int          # 0 = always shown; at a narrow width the highest numbers are dropped first
    cell: Callable[[ModelView, PeerRecord], str]  # (the node's model view, the node) -> the cell's text


_STATE_STYLE = {"ONLINE": "green", "JOINING": "yellow", "DRAINING": "yellow", "OFFLINE": "red"}

COLUMNS = (  # in display order; `priority` says which to drop first when the terminal is narrow
    Column("node", 0, lambda v, n: n.short_id),
    Column("name", 5, lambda v, n: n.name),
    Column("address", 1, lambda v, n: n.address),
    Column("span", 0, lambda v, n: f"{n.start}:{n.end}"),
    Column("device", 6, lambda v, n: n.device),
    Column("dtype", 8, lambda v, n: n.dtype),
    Column("quant", 7, lambda v, n: n.quant),
    Column("adapters", 9, lambda v, n: ",".join(n.adapters) or "-"),
    Column("tok/s", 2, lambda v, n: f"{n.throughput:.1f}"),
    Column("load", 3, lambda v, n: f"{n.load:.0f}"),
    Column("free cache", 4, lambda v, n: str(n.free_cache_tokens)),
    Column("memory", 10, lambda v, n: memory_cell(v.memory.get(n.node_id))),
    Column("state", 0, lambda v, n: n.state.value),
)


def fit_columns(views: list[ModelView], width: int, columns=COLUMNS) -> list[Column]:
    """The columns to show at `width` characters: every one that fits with every value whole, dropping the
    least important (highest priority number) first; priority-0 columns always stay."""
    nodes = [(view, n) for view in views for n in view.nodes]
    natural = {c.name: max([len(c.name), *(len(c.cell(v, n)) for v, n in nodes)]) for c in columns}
    shown = list(columns)
    # rich's default box: a border before each column and after the last, one space of padding each side
    while sum(natural[c.name] + 3 for c in shown) + 1 > width:
        droppable = [c for c in shown if c.priority > 0]
        if not droppable:
            break
        shown.remove(max(droppable, key=lambda c: c.priority))
    return shown


def _table(view: ModelView, columns: list[Column]) -> Table:
    table = Table(
        title=f"{view.model_id}  (config {view.config_hash}, {view.num_layers} layers)", title_justify="left"
    )
    for column in columns:
        table.add_column(column.name, no_wrap=True)
    for n in view.nodes:
        style = _STATE_STYLE[n.state.value]
        table.add_row(*(Text(c.cell(view, n), style=style if c.name == "state" else "") for c in columns))
    return table


def frame(views: list[ModelView], width: int) -> RenderableType:
    """Everything `potluck status` prints, as one renderable for a console `width` characters wide."""
    if not views:
        return Text.from_markup(
            "[bold red]No nodes found.[/] Check --bootstrap addresses, or that mDNS reaches this network.")
    columns = fit_columns(views, width)
    parts: list[RenderableType] = []
    for view in views:
        parts.append(_table(view, columns))
        parts.append(Text(f"coverage [{coverage_bar(view)}] 0..{view.num_layers}"))
        missing = view.missing()
        if missing:
            spans = ", ".join(f"{a}:{b}" for a, b in missing)
            parts.append(Text(f"WARNING: no node serves layers {spans}: this model cannot generate now.",
                              style="bold red"))
        parts.append(Text(""))
    hidden = [c.name for c in COLUMNS if c not in columns]
    if hidden:
        parts.append(Text(f"hidden at {width} columns: {', '.join(hidden)} (widen the terminal, or pipe the "
                          "output, to see them)", style="dim"))
    return Group(*parts)


def render(views: list[ModelView], console: Console) -> None:
    console.print(frame(views, console.width))


def status_console(file=None) -> Console:
    """The terminal's width on a terminal; PIPE_WIDTH (every column, values whole) when piped to a file."""
    import sys

    file = file or sys.stdout
    return Console(file=file) if file.isatty() else Console(file=file, width=PIPE_WIDTH)
