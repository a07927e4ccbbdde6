"""The dashboard: a static page at `/` and GET /v1/swarm, the live state of each served model's swarm.

With explicit peers, each is asked for its Info on every poll (over channels of our own, on the
server's loop); with discovery, the swarm client's membership registry is read. The summary
(`model_state`) is a pure function of those node dicts."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

from client.routing import PeerInfo, missing_spans
from client.transport import Peer, PeerError
from common.swarm.records import PeerRecord

STATIC = Path(__file__).with_name("static")
INFO_TIMEOUT = 2.0  # seconds per Info call: a poll every ~2 s must not pile up behind a dead peer
# a node's colour on the page: picked by a hash of its id, so it stays the same when other nodes come and go
PALETTE = ("#3b7dd8", "#d8643b", "#2e9e6a", "#9b59b6", "#c9a227", "#d84a7a", "#1f9fb0", "#7a8b2e",
           "#b5542d", "#5566d4", "#3aa33a", "#a0568f")


def node_color(key: str) -> str:
    """The palette colour of the node with this id (or address, when its id is unknown): stable across polls,
    server restarts and other nodes leaving."""
    return PALETTE[int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % len(PALETTE)]


def stored_form(dtype: str, quant: str, exact: tuple[tuple[str, int], ...] = ()) -> str:
    """How a node holds its weights, for people: quantised (int8, nf4), exact narrow forms with how many matrices
    each (q4, q8, bf16: the same values in fewer bytes), or plainly its dtype."""
    if quant and quant != "none":
        return f"{quant} (quantised)" + (f", computes in {dtype}" if dtype else "")
    if exact:
        forms = ", ".join(f"{form} ×{count}" for form, count in sorted(exact, key=lambda item: -item[1]))
        return f"{forms} (exact)" + (f", rest and compute {dtype}" if dtype else "")
    return dtype


def node_from_info(info: PeerInfo, rtt: float | None) -> dict:
    return {
        "address": info.address, "node_id": info.node_id, "name": "", "start": info.start, "end": info.end,
        "device": info.device, "dtype": info.dtype, "throughput": info.throughput,
        "prefill_throughput": info.prefill_throughput, "load": info.load, "free_cache_tokens": info.free_cache_tokens,
        "max_length": info.max_length, "state": info.state, "config_hash": info.config_hash,
        "rtt_ms": None if rtt is None else round(rtt * 1000, 1), "announced_s_ago": None, "error": None,
        "uptime_s": _uptime(info.started_at, time.time()), "quant": info.quant,
        "stored": stored_form(info.dtype, info.quant, info.exact), "memory": dict(info.memory),
    }


def _uptime(started_at: float, now: float) -> float | None:
    return round(max(now - started_at, 0.0), 1) if started_at > 0 else None


def node_from_record(record: PeerRecord, now: float) -> dict:
    return {
        "address": record.address, "node_id": record.node_id, "name": record.name, "start": record.start,
        "end": record.end, "device": record.device, "dtype": record.dtype, "throughput": record.throughput,
        "prefill_throughput": record.prefill_throughput, "load": record.load,
        "free_cache_tokens": record.free_cache_tokens, "max_length": record.max_length, "state": record.state.value,
        "config_hash": record.config_hash, "rtt_ms": None, "announced_s_ago": round(max(now - record.issued_at, 0), 1),
        "error": None, "uptime_s": _uptime(record.started_at, now), "quant": record.quant,
        "stored": stored_form(record.dtype, record.quant),
    }


def unreachable_node(address: str, error: str) -> dict:
    return {"address": address, "node_id": "", "name": "", "start": None, "end": None, "device": "", "dtype": "",
            "throughput": 0.0, "prefill_throughput": 0.0, "load": 0.0, "free_cache_tokens": 0, "max_length": 0,
            "state": "UNREACHABLE", "config_hash": "", "rtt_ms": None, "announced_s_ago": None, "error": error,
            "uptime_s": None, "quant": "", "stored": ""}


def model_state(name: str, num_layers: int, config_hash: str, nodes: list[dict], discovery: bool) -> dict:
    """One model's entry in /v1/swarm: its nodes, the layers nobody serves, and warnings."""
    warnings: list[dict] = []
    serving = [n for n in nodes if n["state"] == "ONLINE" and n["config_hash"] == config_hash]
    for node in nodes:
        if node["state"] == "UNREACHABLE":
            warnings.append({"level": "error", "text": f"{node['address']} does not answer"})
        elif node["config_hash"] != config_hash:
            warnings.append({"level": "error", "text": f"{node['address']} serves another model"})
        elif node["state"] != "ONLINE":
            text = f"{node['address']} is {node['state']}: it takes no new sessions"
            warnings.append({"level": "warn", "text": text})
    infos = [PeerInfo(n["address"], n["start"], n["end"]) for n in serving]
    missing = missing_spans(infos, num_layers)
    if missing:
        spans = ", ".join(f"{a}:{b}" for a, b in missing)
        warnings.insert(0, {"level": "error", "text": f"no node serves layers {spans}: this model cannot generate now"})
    single = _single_spans(infos, num_layers)
    if single and not missing:
        spans = ", ".join(f"{a}:{b}" for a, b in single)
        warnings.append({"level": "info", "text": f"layers {spans} have one node only: no failover if it leaves"})
    nodes = [{**n, "color": node_color(n.get("node_id") or n["address"])} for n in nodes]
    nodes = sorted(nodes, key=lambda n: (n["start"] is None, n["start"] or 0, n["end"] or 0, n["address"]))
    return {"name": name, "status": "ready" if not missing else "incomplete", "num_layers": num_layers,
            "config_hash": config_hash, "discovery": "swarm" if discovery else "peers", "nodes": nodes,
            "missing_layers": [list(span) for span in missing], "warnings": warnings}


def not_loaded_state(name: str) -> dict:
    text = "not loaded yet (the swarm may not cover it); it is loaded again on the next request"
    return {"name": name, "status": "loading", "num_layers": 0, "config_hash": "", "discovery": "", "nodes": [],
            "missing_layers": [], "warnings": [{"level": "warn", "text": text}]}


def _single_spans(infos: list[PeerInfo], num_layers: int) -> list[tuple[int, int]]:
    """Maximal spans of layers served by exactly one node."""
    counts = [0] * num_layers
    for info in infos:
        for layer in range(max(info.start, 0), min(info.end, num_layers)):
            counts[layer] += 1
    spans: list[tuple[int, int]] = []
    for layer, count in enumerate(counts):
        if count != 1:
            continue
        if spans and spans[-1][1] == layer:
            spans[-1] = (spans[-1][0], layer + 1)
        else:
            spans.append((layer, layer + 1))
    return spans


class SwarmWatch:
    """Reads the swarm for the dashboard. Use and close it on the server's event loop."""

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}

    async def state(self, name: str, model) -> dict:
        """`model` is a loaded DistributedModelForCausalLM, or None."""
        if model is None:
            return not_loaded_state(name)
        swarm = model.swarm
        if swarm.membership is None:
            nodes = await asyncio.gather(*(self._ask(address, swarm.security) for address in swarm.config.peers))
        else:
            nodes = await self._records(swarm)
        return model_state(name, swarm.num_layers, swarm.config_hash, list(nodes), swarm.membership is not None)

    async def _ask(self, address: str, security) -> dict:
        if address not in self._peers:
            await security.prefetch(address)
            self._peers[address] = Peer(address, security)
        peer = self._peers[address]
        started = time.perf_counter()
        try:
            info = await peer.info(INFO_TIMEOUT)
        except PeerError as error:
            return unreachable_node(address, str(error))
        return node_from_info(info, time.perf_counter() - started)

    @staticmethod
    async def _records(swarm) -> list[dict]:
        async def live() -> list[PeerRecord]:  # the registry lives on the swarm client's loop: read it there
            return swarm.membership.live(swarm.config_hash)

        records = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(live(), swarm._loop.loop))
        now = time.time()
        return [node_from_record(r, now) for r in records]

    async def close(self) -> None:
        await asyncio.gather(*(peer.close() for peer in self._peers.values()), return_exceptions=True)
        self._peers.clear()
