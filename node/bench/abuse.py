"""`potluck bench-abuse`: an honest client's latency through a 3-node chain with and without strangers attacking it.

The attacks are the public swarm's (issue 25, docs/reliability.md), run together from another address of this
machine (127.0.0.2, through node/bench/masquerade.py) so that the nodes' per-peer limits see a separate peer:

- cache hogs: on every node, sessions that declare the whole cache (batch 64 x 512 tokens) and never step;
- session flood: on every node, as many sessions as the node lets one peer open, each holding a short prefill;
- junk records: 300 valid records signed by fresh keys (TTL one hour) sent to the first node's Gossip.

In rounds, the honest client (127.0.0.1) generates the same greedy answer without attackers, then with them
running; the table gives its time to the first token and its decode tokens/s in each phase, whether every
answer equals the one without attackers (the nodes are exact, so it must), and what the attackers got."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client import DistributedModelForCausalLM
from common.swarm.records import NodeState, PeerRecord, node_id_of, renewed, sign_record, verify_record
from common.weights.files import ModelFiles
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.bench.basic import add_output_args, local_model_folder, machine_info, prompt_ids, publish, timed_generate
from node.bench.masquerade import Masquerade
from node.launcher import start_chain

MARK_START = "<!-- bench:abuse:start -->"
MARK_END = "<!-- bench:abuse:end -->"
ATTACKER = "127.0.0.2"


@dataclass
class Phase:
    label: str
    first_token_s: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)


@dataclass
class AttackTally:
    hogs_opened: int = 0          # cache-hog sessions a node accepted (they reserve nothing until they step)
    flood_opened: int = 0         # flood sessions a node accepted before its per-peer quota
    refused: int = 0              # opens or steps a node refused
    junk_kept: int = 0            # junk records the first node holds (unproven: never passed on, never routed to)
    junk_routable: int = 0        # junk records among the live ones clients route to
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # streams open at once

    def count(self, counter: str) -> None:
        with self.lock:
            setattr(self, counter, getattr(self, counter) + 1)


class LoopThread:
    """An asyncio loop in a thread, for the masquerades."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _open(session: str, start: int, end: int, batch: int, length: int, hidden: int) -> pb.SessionRequest:
    return pb.SessionRequest(open=pb.OpenSession(session_id=session, start=start, end=end, max_length=length,
                                                 batch_size=batch, wire_dtype="float32"))


def _prefill(batch: int, tokens: int, hidden: int) -> pb.SessionRequest:
    return pb.SessionRequest(step=pb.Step(hidden=codec.encode_tensor(torch.zeros(batch, tokens, hidden)),
                                          position=0))


@contextmanager
def _held(address: str, requests: list, release: threading.Event, tally: AttackTally, counter: str):
    """One attacker stream through `address`: `requests`, then held open until `release`."""

    def feed():
        yield from requests
        release.wait(600)

    channel = grpc.insecure_channel(address)
    call = pb_grpc.PotluckStub(channel).Inference(feed(), timeout=600)
    try:
        for _ in requests:
            next(call)
        tally.count(counter)
    except grpc.RpcError:
        tally.count("refused")
    try:
        yield
    finally:
        call.cancel()
        channel.close()


def junk_records(template: PeerRecord, count: int) -> list:
    signed = []
    for index in range(count):
        key = Ed25519PrivateKey.generate()
        record = renewed(PeerRecord(node_id=node_id_of(key.public_key().public_bytes_raw()),
                                    addresses=(f"{ATTACKER}:{20000 + index}",), model_id=template.model_id,
                                    config_hash=template.config_hash, num_layers=template.num_layers, start=0,
                                    end=template.num_layers, throughput=1e6, state=NodeState.ONLINE), ttl=3599)
        signed.append(sign_record(record, key))
    return signed


@contextmanager
def attacks(nodes, disguised: list[str], hidden: int, num_layers: int, tally: AttackTally, hogs: int, flood: int):
    """Every attack running until the block ends."""
    release = threading.Event()
    hogging, flooding = [], []
    for node, address in zip(nodes, disguised):
        span = (node.start_layer, node.end_layer)
        for index in range(hogs):
            hogging.append(_held(address, [_open(f"hog-{span[0]}-{index}", *span, 64, 512, hidden)], release, tally,
                                 "hogs_opened"))
        for index in range(flood):
            requests = [_open(f"flood-{span[0]}-{index}", *span, 1, 64, hidden), _prefill(1, 16, hidden)]
            flooding.append(_held(address, requests, release, tally, "flood_opened"))
    with ExitStack() as stack:
        stack.callback(release.set)
        _open_together(stack, hogging)  # the hogs first, then the flood: each attack takes what the node lets it
        _open_together(stack, flooding)
        yield


def _open_together(stack: ExitStack, streams: list) -> None:
    """Enter every stream at once, as a flood comes (each open past a node's quota waits out its admission wait,
    2 s by default: one after the other, 24 of them took 48 s), each exited with `stack`."""
    if not streams:
        return
    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        entered = [pool.submit(stream.__enter__) for stream in streams]
    for stream, future in zip(streams, entered):
        if future.exception() is None:
            stack.push(stream)
    for future in entered:
        future.result()  # the first stream that failed other than by a refusal (counted) fails the attack


def _gossip_junk(node_address: str, disguised: str, count: int, tally: AttackTally) -> None:
    with grpc.insecure_channel(node_address) as channel:
        reply = pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(), timeout=10)
    template = next(verify_record(r) for r in codec.decode_records(reply.records))
    junk = junk_records(template, count)
    with grpc.insecure_channel(disguised) as channel:
        for page in range(0, len(junk), 200):  # as many calls as the node's per-request limit needs
            pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(records=codec.encode_records(
                junk[page: page + 200])), timeout=30)
        reply = pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(), timeout=30)
    live = [verify_record(r) for r in codec.decode_records(reply.records)]
    tally.junk_routable = sum(1 for r in live if r.addresses[0].startswith(ATTACKER))


def run_abuse_bench(model: Path, rounds: int, new_tokens: int, hogs: int, flood: int, junk: int,
                    threads: int) -> tuple[list[Phase], AttackTally, dict]:
    config = ModelFiles.open(str(model)).config()
    ids = prompt_ids(config, 16, seed=0)
    nodes = start_chain(model, config.num_hidden_layers, 3, threads=threads)
    loop = LoopThread()
    masquerades = []
    client = None
    tally = AttackTally()
    quiet, attacked = Phase("no attackers"), Phase("with attackers")
    try:
        for node in nodes:
            masquerade = Masquerade(node.address, ATTACKER)
            loop.run(masquerade.start())
            masquerades.append(masquerade)
        disguised = [m.address for m in masquerades]
        client = DistributedModelForCausalLM.from_pretrained(str(model), peers=[n.address for n in nodes])
        reference = timed_generate(client, ids, new_tokens).tokens  # warm-up, and the answer to match
        _gossip_junk(nodes[0].address, disguised[0], junk, tally)
        for _ in range(rounds):
            for phase, attacking in ((quiet, False), (attacked, True)):
                with attacks(nodes, disguised, config.hidden_size, config.num_hidden_layers, tally,
                             hogs if attacking else 0, flood if attacking else 0):
                    run = timed_generate(client, ids, new_tokens)
                phase.first_token_s.append(run.prefill_s)
                phase.decode_tps.append(run.decode_tps)
                phase.exact.append(run.tokens == reference)
        tally.hogs_opened //= rounds
        tally.flood_opened //= rounds
        tally.refused //= rounds
        tally.junk_kept = junk  # sent; what the nodes did with them is junk_routable
    finally:
        if client is not None:
            client.close()
        for masquerade in masquerades:
            loop.run(masquerade.close())
        loop.close()
        for node in nodes:
            node.stop()
    return [quiet, attacked], tally, machine_info(threads or 0)


def render(phases: list[Phase], tally: AttackTally, machine: dict, command: str, new_tokens: int, hogs: int,
           flood: int, junk: int) -> str:
    quiet = phases[0]
    lines = [
        "## Strangers: an honest client's latency with and without attackers",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {machine['cpu']}",
        f"- command: `{command}`",
        f"- a 3-node chain on loopback; the honest client on 127.0.0.1, greedy, {new_tokens} new tokens, the same "
        f"prompt each round; the attackers from {ATTACKER}, on every node at once: {hogs} cache hogs (batch 64 x "
        f"512, never stepping), {flood} flood sessions (a 16-token prefill each, held open), and {junk} junk "
        "records (fresh keys, TTL 1 h) gossiped to the first node. Phases alternate in each round.",
        "",
        "| phase | time to first token, s (median) | decode tok/s (median) | vs no attackers | answers equal |",
        "|---|---:|---:|---:|---|",
    ]
    base = statistics.median(quiet.decode_tps)
    for phase in phases:
        tps = statistics.median(phase.decode_tps)
        lines.append(f"| {phase.label} | {statistics.median(phase.first_token_s):.3f} | {tps:.1f} | "
                     f"{tps / base:.2f}x | {sum(phase.exact)}/{len(phase.exact)} |")
    lines += [
        "",
        f"Each round the attackers got {tally.hogs_opened} cache-hog sessions open over the three nodes (reserving "
        f"nothing until they step; closed by --session-open-timeout) and {tally.flood_opened} flood sessions (the "
        f"per-peer session quota refused the rest: {tally.refused} refusals a round); of the {junk} junk "
        f"records, {tally.junk_routable} were passed on (a record's address must answer with its node id first).",
    ]
    return "\n".join(lines)


def add_abuse_bench_parser(commands) -> None:
    bench = commands.add_parser("bench-abuse", help="an honest client's latency with and without strangers attacking")
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--rounds", type=int, default=3, help="rounds of (no attackers, attackers) (default 3)")
    bench.add_argument("--new-tokens", type=int, default=16, help="tokens per answer (default 16)")
    bench.add_argument("--hogs", type=int, default=2, help="cache-hog sessions per node (default 2)")
    bench.add_argument("--flood", type=int, default=40, help="flood sessions tried per node (default 40)")
    bench.add_argument("--junk", type=int, default=300, help="junk records gossiped (default 300)")
    bench.add_argument("--threads", type=int, default=0, help="torch threads per node (default: all cores)")
    add_output_args(bench)


def run_abuse_bench_cli(args: argparse.Namespace) -> None:
    import shlex
    import sys

    model = local_model_folder(args.model, "bench-abuse")
    if args.rounds < 1 or args.new_tokens < 2 or min(args.hogs, args.flood, args.junk) < 0:
        raise ValueError("need --rounds >= 1, --new-tokens >= 2 and non-negative attack sizes")
    started = time.perf_counter()
    phases, tally, machine = run_abuse_bench(model, args.rounds, args.new_tokens, args.hogs, args.flood, args.junk,
                                             args.threads)
    command = shlex.join(["potluck", *sys.argv[1:]])
    section = render(phases, tally, machine, command, args.new_tokens, args.hogs, args.flood, args.junk)
    section += f"\n\nThe whole bench took {time.perf_counter() - started:.0f} s."
    publish(section, args.out, MARK_START, MARK_END)
