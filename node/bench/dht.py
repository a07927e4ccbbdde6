"""`potluck bench-dht`: what the DHT backend (common/swarm/dht.py) costs each node, with real hivemind DHT peers
on loopback (each a process plus its p2pd process), and an extrapolation to 10,000 nodes.

Every peer plays a node: it stores a real signed record under its span's block keys (and the models key) every
`refresh` seconds, as DhtDiscovery does. Measured over `duration` seconds: CPU seconds of each peer's two
processes, bytes its p2pd wrote (network and its local control socket: an upper bound of what it sent), the
latency of one client-mode peer's batched read of the whole model's keys, and memory."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

MARK_START = "<!-- bench:dht:start -->"
MARK_END = "<!-- bench:dht:end -->"
NUM_LAYERS = 32  # the model whose keys the peers store (a 32-layer model: 32 block keys)
SPAN = 8  # layers each node serves


@dataclass
class DhtBench:
    peers: int
    duration: float
    refresh: float
    start_seconds: float
    stores_per_peer: float
    cpu_seconds_per_minute_per_peer: float
    p2pd_bytes_written_per_minute_per_peer: float
    record_bytes: int
    lookup_keys: int
    lookup_records: int
    lookup_ms_median: float
    lookup_ms_p90: float
    rss_mib_per_peer: float
    extrapolation: dict


def _proc_times(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _written(pid: int) -> int:
    try:
        return int(dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())["wchar"])
    except (OSError, KeyError, ValueError):
        return 0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _sample(dhts) -> tuple[float, int, int]:
    """(CPU seconds, p2pd bytes written, RSS bytes) of all peers' processes now."""
    cpu = written = rss = 0
    for dht in dhts:
        pids = [dht.pid, *_children(dht.pid)]
        for pid in pids:
            try:
                cpu += _proc_times(pid)
                rss += _rss(pid)
                if pid != dht.pid:
                    written += _written(pid)
            except OSError:
                continue
    return cpu, written, rss


def _record(key, index: int, now: float):
    from common.swarm.records import NodeState, PeerRecord, node_id_of, sign_record

    start = (index * SPAN // 2) % (NUM_LAYERS - SPAN + 1)
    node_id = node_id_of(key.public_key().public_bytes_raw())
    record = PeerRecord(node_id=node_id, addresses=(f"203.0.113.{index}:31330",),
                        model_id="bench/model-32-layers", config_hash="b" * 16, num_layers=NUM_LAYERS, start=start,
                        end=start + SPAN, throughput=12.5, prefill_throughput=100.0, max_length=8192,
                        free_cache_tokens=65536, name=f"bench-{index}", issued_at=now, expires_at=now + 90,
                        seq=int(now * 1000), state=NodeState.ONLINE)
    return record, sign_record(record, key)


async def _run(peers: int, duration: float, refresh: float, lookups: int) -> DhtBench:
    import hivemind
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.swarm.dht import MODELS_KEY, DhtConfig, DhtDiscovery, _store_many, block_key
    from common.wire import codec

    started = time.perf_counter()
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    initial = [str(m) for m in first.get_visible_maddrs()]
    dhts = [first] + [hivemind.DHT(start=True, await_ready=False, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                   initial_peers=initial) for _ in range(peers - 1)]
    for dht in dhts:
        dht.wait_until_ready(120)
    start_seconds = time.perf_counter() - started
    keys = [Ed25519PrivateKey.generate() for _ in range(peers)]
    stores = 0
    record_bytes = 0

    async def store_round() -> None:
        nonlocal stores, record_bytes
        now = time.time()
        futures = []
        for index, (dht, key) in enumerate(zip(dhts, keys)):
            record, signed = _record(key, index, now)
            value = codec.encode_records([signed])[0].SerializeToString()
            record_bytes = len(value)
            block_keys = [block_key(record.config_hash, b) for b in range(record.start, record.end)]
            futures.append(dht.run_coroutine(partial(
                _store_many, keys=[*block_keys, MODELS_KEY], subkeys=[record.node_id] * len(block_keys) + ["b" * 16],
                value=value, expiration=record.expires_at), return_future=True))
        for future in futures:
            await future
        stores += 1

    await store_round()  # everyone announced; then measure steady state
    reader = DhtDiscovery(DhtConfig(initial_peers=tuple(initial), host_maddrs=("/ip4/127.0.0.1/tcp/0",),
                                    client_mode=True), watch={"b" * 16: NUM_LAYERS})
    await reader.start()
    cpu0, written0, _ = _sample(dhts)
    t0 = time.monotonic()
    latencies = []
    next_store = t0 + refresh
    lookup_every = duration / max(lookups, 1)
    next_lookup = t0
    while time.monotonic() - t0 < duration:
        now = time.monotonic()
        if now >= next_store:
            await store_round()
            next_store += refresh
        if now >= next_lookup and len(latencies) < lookups:
            begun = time.perf_counter()
            await reader.pull_all()
            latencies.append((time.perf_counter() - begun) * 1000)
            next_lookup += lookup_every
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - t0
    cpu1, written1, rss = _sample(dhts)
    found = len(reader.live())
    await reader.close()
    for dht in dhts:
        dht.shutdown()
    minutes = elapsed / 60
    cpu = (cpu1 - cpu0) / peers / minutes
    written = (written1 - written0) / peers / minutes
    return DhtBench(
        peers=peers, duration=round(elapsed, 1), refresh=refresh, start_seconds=round(start_seconds, 2),
        stores_per_peer=stores - 1, cpu_seconds_per_minute_per_peer=round(cpu, 3),
        p2pd_bytes_written_per_minute_per_peer=round(written), record_bytes=record_bytes, lookup_keys=NUM_LAYERS,
        lookup_records=found, lookup_ms_median=round(statistics.median(latencies), 1),
        lookup_ms_p90=round(sorted(latencies)[int(0.9 * (len(latencies) - 1))], 1),
        rss_mib_per_peer=round(rss / peers / 2**20, 1),
        extrapolation=extrapolate(peers, cpu, written, statistics.median(latencies)),
    )


def extrapolate(peers: int, cpu: float, written: float, lookup_ms: float, target: int = 10_000) -> dict:
    """Kademlia's costs grow with log2(N): a lookup visits O(log N) peers (one round trip each, in parallel
    beams), a store first looks up the key's k nearest peers, and a peer keeps and refreshes O(log N) k-buckets.
    So per-node CPU and traffic, and the lookup's hop count, scale by log2(target) / log2(peers); on loopback a
    hop costs ~nothing, so the internet lookup is hops x an RTT (100 ms assumed) rather than the ratio."""
    ratio = math.log2(target) / math.log2(peers)
    hops = math.ceil(math.log2(target) / 4)  # hivemind's beam search: ~log_{2^b}(N) rounds, b ~ 4 (depth_modulo 5)
    return {
        "nodes": target, "log_ratio": round(ratio, 2),
        "cpu_seconds_per_minute_per_node": round(cpu * ratio, 3),
        "bytes_per_minute_per_node": round(written * ratio),
        "lookup_rounds": hops, "lookup_ms_at_100ms_rtt": hops * 100 + round(lookup_ms),
    }


def section(result: DhtBench, command: str) -> str:
    x = result.extrapolation
    return "\n".join([
        "## DHT discovery: cost per node (hivemind DHT on loopback)",
        "",
        f"- command: `{command}`",
        f"- {result.peers} DHT peers (each a process plus its p2pd), started in {result.start_seconds:.1f} s; each "
        f"re-stored a real signed record ({result.record_bytes} bytes) under its {SPAN} block keys and the models "
        f"key every {result.refresh:g} s for {result.duration:g} s; a client-mode peer read all {result.lookup_keys} "
        f"block keys of the model in one batch, {result.lookup_records} records found",
        "",
        "| per peer | measured |",
        "|---|---|",
        f"| CPU seconds per minute (peer + p2pd) | {result.cpu_seconds_per_minute_per_peer:.3f} |",
        f"| bytes written per minute by p2pd (network + local socket: an upper bound) | "
        f"{result.p2pd_bytes_written_per_minute_per_peer:,.0f} |",
        f"| memory (RSS, peer + p2pd) | {result.rss_mib_per_peer:.0f} MiB |",
        f"| batched read of a model's keys: median / p90 | {result.lookup_ms_median:.0f} / "
        f"{result.lookup_ms_p90:.0f} ms |",
        "",
        f"Extrapolated to {x['nodes']:,} nodes (not measured): Kademlia's per-node work grows with log2(N) "
        f"(lookups visit O(log N) peers, a store first looks up the key's k nearest peers, each peer refreshes "
        f"O(log N) k-buckets), so the per-node costs above scale by log2({x['nodes']}) / log2({result.peers}) = "
        f"{x['log_ratio']}: about {x['cpu_seconds_per_minute_per_node']:.2f} CPU seconds and "
        f"{x['bytes_per_minute_per_node'] / 1e6:.2f} MB per node per minute at this refresh period. A read takes "
        f"~{x['lookup_rounds']} sequential rounds (hivemind's beam search, ~log16 N), so about "
        f"{x['lookup_ms_at_100ms_rtt']} ms at a 100 ms round trip; the loopback latency here is mostly the "
        "processes' own work (here all peers share the machine's cores). A longer refresh period divides the store "
        "part of the traffic accordingly.",
    ])


def add_dht_bench_parser(commands) -> None:
    bench = commands.add_parser("bench-dht", help="benchmark the DHT backend's cost per node with real DHT peers")
    bench.add_argument("--peers", type=int, default=20, help="DHT peers, each a process + p2pd (default 20)")
    bench.add_argument("--duration", type=float, default=60.0, help="seconds measured (default 60)")
    bench.add_argument("--refresh", type=float, default=30.0, help="seconds between a peer's re-stores (default 30)")
    bench.add_argument("--lookups", type=int, default=20, help="batched reads of the model's keys (default 20)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.add_argument("--out", default=None, help="markdown file to write the section into (default: print only)")
    bench.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_dht_bench_cli(args: argparse.Namespace) -> None:
    from common.swarm.dht import _load_hivemind

    if not 2 <= args.peers <= 64:
        raise ValueError("--peers must be within 2..64 (each peer is two processes and ~250 MB)")
    if args.duration <= 0 or args.refresh <= 0 or args.lookups < 1:
        raise ValueError("--duration and --refresh must be positive and --lookups at least 1")
    _load_hivemind()
    result = asyncio.run(_run(args.peers, args.duration, args.refresh, args.lookups))
    command = (f"potluck bench-dht --peers {args.peers} --duration {args.duration:g} --refresh {args.refresh:g} "
               f"--lookups {args.lookups}" + (f" --out {args.out}" if args.out else ""))
    if args.json:
        print(json.dumps(asdict(result), indent=1))
    else:
        print(section(result, command))
    if args.out:
        from node.bench.basic import write_section

        write_section(Path(args.out), section(result, command), MARK_START, MARK_END)
