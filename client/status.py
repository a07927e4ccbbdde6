"""`potluck status`: the swarm as records, coverage bars and warnings."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from client.routing import PeerInfo, missing_spans
from common.swarm.membership import Membership, SwarmConfig
from common.swarm.placement import Server, layer_throughput
from common.swarm.records import NodeState, PeerRecord

log = logging.getLogger(__name__)
BAR_CHARS = " ▁▂▃▄▅▆▇█"


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


async def collect(config: SwarmConfig, wait: float, security=None) -> list[PeerRecord]:
    membership = Membership(config, security=security) if security is not None else Membership(config)
    try:
        await membership.start()
        await asyncio.sleep(wait)  # mDNS answers and their pulls
        await membership.pull_all()
        records = membership.live()
        if not records and membership.refused:
            raise PermissionError(
                f"{', '.join(sorted(membership.refused))} refused the call (UNAUTHENTICATED): a private swarm; "
                "give its key with --swarm-key (and the same --tls as its nodes)")
        return records
    finally:
        await membership.close()


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


def render(views: list[ModelView], console: Console) -> None:
    if not views:
        console.print("[bold red]No nodes found.[/] Check --bootstrap addresses, or that mDNS reaches this network.")
        return
    for view in views:
        table = Table(
            title=f"{view.model_id}  (config {view.config_hash}, {view.num_layers} layers)", title_justify="left"
        )
        for column in ("node", "name", "address", "span", "device", "dtype", "quant", "adapters", "tok/s", "load",
                       "free cache", "memory", "state"):
            table.add_column(column, no_wrap=column in ("node", "address", "span", "state"))
        for n in view.nodes:
            style = {"ONLINE": "green", "JOINING": "yellow", "DRAINING": "yellow", "OFFLINE": "red"}[n.state.value]
            table.add_row(n.short_id, n.name, n.address, f"{n.start}:{n.end}", n.device, n.dtype, n.quant,
                          ",".join(n.adapters) or "-", f"{n.throughput:.1f}",
                          f"{n.load:.0f}", str(n.free_cache_tokens), memory_cell(view.memory.get(n.node_id)),
                          f"[{style}]{n.state.value}[/]")
        console.print(table)
        console.print(f"coverage [{coverage_bar(view)}] 0..{view.num_layers}")
        missing = view.missing()
        if missing:
            spans = ", ".join(f"{a}:{b}" for a, b in missing)
            console.print(f"[bold red]WARNING: no node serves layers {spans}: this model cannot generate now.[/]")
        console.print()
