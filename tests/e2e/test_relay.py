"""Relays (docs/relay.md): a node served through a relay gives the exact answer.

- loopback, in-process nodes: a relayed node (relay_via) in a chain with its relay; the relay's limits;
- namespaces, node processes: client, relays and node in three network namespaces, the client unable to
  reach the node, the node finding out by itself (Probe) that nobody can reach it; then the node's relay
  is SIGKILLed mid-generation, the node re-attaches to the other relay, and the answer is the same."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from client import DistributedModelForCausalLM
from common.swarm.records import NodeState, PeerRecord
from common.wire.security import PLAINTEXT
from node.launcher import NodeProcess
from node.relay.join import relay_candidates
from node.relay.relay import ByteBucket
from tests.support.swarm_fixtures import attach_or_refusal

ROOT = Path(__file__).resolve().parents[2]
FAST = ("--heartbeat", "1", "--ttl", "4", "--threads", "1", "--no-mdns", "--throughput", "100",
        "--log-level", "INFO")
PROMPT = [[1, 5, 9, 13, 17, 21, 25]]
NEW_TOKENS = 24


def greedy(model, ids: torch.Tensor, streamer=None) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, streamer=streamer)
    return out[0].tolist()


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    return greedy(reference, torch.tensor(PROMPT))


# -- loopback: in-process nodes ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain(bg_loop, tiny_model_dir):
    """A relay (llama 0:3, one node at most) and a node (3:6) serving through it."""
    llama = tiny_model_dir("llama")
    relay = bg_loop.start_node(llama, 0, 3, relay=True, relay_max_nodes=1, throughput=100.0)
    relayed = bg_loop.start_node(llama, 3, 6, relay_via=relay.address, bootstrap=(relay.address,), throughput=100.0)
    yield relay, relayed
    bg_loop.stop_node(relayed)
    bg_loop.stop_node(relay)


def test_generation_through_a_relay_equals_transformers(chain, tiny_model_dir, expected):
    relay, relayed = chain
    assert relayed.address.rpartition(":")[0] == relay.address.rpartition(":")[0]  # the relay's host, its port
    assert relayed.address != relay.address and relayed.record.addresses == (relayed.address,)
    assert relayed.record.relay_via == relay.identity.node_id and relay.record.relay_slots == 1
    model = DistributedModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")),
                                                        peers=[relay.address, relayed.address])
    try:
        assert greedy(model, torch.tensor(PROMPT)) == expected
    finally:
        model.close()


def _attach(address: str):
    from common.wire.generated import relay_pb2 as rpb
    from common.wire.generated import relay_pb2_grpc as rpb_grpc

    with grpc.insecure_channel(address) as channel:
        replies = rpb_grpc.RelayStub(channel).Attach(iter([rpb.Frame()]), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            for frame in replies:  # a challenge first (a stranger's frame proves nothing), then the refusal
                assert len(frame.challenge) == 32
    return refused.value


def member_proof(sign_with=None, ttl: float = 15.0):
    """A relayed node's answer to a relay's challenge: a fresh identity's signed record, the proof signed by
    `sign_with` (default: the same key)."""
    from common.swarm.identity import ephemeral_identity
    from common.swarm.records import renewed, sign_record
    from node.relay.relay import attach_proof

    identity = ephemeral_identity()
    record = renewed(PeerRecord(node_id=identity.node_id, addresses=("127.0.0.1:1",), model_id="m", config_hash="h",
                                num_layers=2, start=0, end=1), ttl)
    signed = sign_record(record, identity.key)
    return lambda challenge: attach_proof(sign_with or identity.key, signed, challenge)


def test_attach_needs_proof_of_membership_and_is_rate_limited_per_address(bg_loop, tiny_model_dir):
    """Issue 25: anyone could Attach to a public relay and get a port that tunnels any TCP. Now the attaching node
    proves it holds the key of a valid signed record, and each address gets a few attaches in a burst."""
    from common.swarm.identity import ephemeral_identity
    from node.relay.gate import ATTACH_REFUSED
    from node.relay.link import RelayLink, RelayRefused
    from node.relay.relay import ProofError, check_proof

    relay = bg_loop.start_node(tiny_model_dir("llama"), 0, 3, relay=True, throughput=100.0)

    async def attach(prove):
        return await attach_or_refusal(RelayLink(relay.address, "127.0.0.1:1", PLAINTEXT, prove))

    try:
        assert isinstance(bg_loop.run(attach(member_proof())), str)  # a member: an address
        for prove in (None, member_proof(sign_with=ephemeral_identity().key)):  # why is logged, not told
            refused = bg_loop.run(attach(prove))
            assert isinstance(refused, RelayRefused) and refused.code == grpc.StatusCode.UNAUTHENTICATED, refused
            assert str(refused).endswith(f"UNAUTHENTICATED: {ATTACH_REFUSED}")
        refused = bg_loop.run(attach(member_proof()))  # a 4th attach from 127.0.0.1 at once
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "attaches to a relay" in str(refused)
    finally:
        bg_loop.stop_node(relay)
    from common.wire.generated import relay_pb2 as rpb

    expired = member_proof(ttl=-1.0)(b"c")
    with pytest.raises(ProofError, match="expired record"):
        check_proof(expired, b"c")
    with pytest.raises(ProofError, match="not the record's key's signature"):
        check_proof(member_proof()(b"c"), b"another challenge")
    with pytest.raises(ProofError, match="only swarm members"):
        check_proof(rpb.Frame(), b"c")


def test_a_caller_behind_a_relay_is_charged_as_itself(bg_loop, tiny_model_dir, expected):
    """Issue 25: a relayed node dialed its own server on 127.0.0.1, so every caller through the relay shared one
    rate-limit bucket (and looked local to Probe). An attacker from 127.0.0.2 empties its own bucket through the
    relay; an honest client through the same relay still gets transformers' tokens, in bounded time."""
    import time

    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc
    from node.bench.masquerade import Masquerade

    llama = tiny_model_dir("llama")
    relay = bg_loop.start_node(llama, 0, 3, relay=True, throughput=100.0)
    relayed = bg_loop.start_node(llama, 3, 6, relay_via=relay.address, bootstrap=(relay.address,), throughput=100.0,
                                 rate_limit=20.0)  # bursts of 40
    masquerade = Masquerade(relayed.address, "127.0.0.2")  # the attacker dials the relay's port for the node
    bg_loop.run(masquerade.start())
    try:
        codes = []
        with grpc.insecure_channel(masquerade.address) as channel:
            stub = pb_grpc.PotluckStub(channel)
            for _ in range(60):
                try:
                    stub.Info(pb.InfoRequest(), timeout=10)
                    codes.append("OK")
                except grpc.RpcError as error:
                    codes.append(error.code().name)
        assert "RESOURCE_EXHAUSTED" in codes and codes.count("OK") >= 40, codes
        assert "127.0.0.2" in relayed.servicer.limiter._buckets, "the relayed node never saw the real caller"
        started = time.monotonic()
        model = DistributedModelForCausalLM.from_pretrained(str(llama), peers=[relay.address, relayed.address])
        try:
            assert greedy(model, torch.tensor(PROMPT)) == expected
        finally:
            model.close()
        assert time.monotonic() - started < 30
        assert not relayed.servicer.tunneled or all(v.startswith("ipv4:127.0.0.1:")
                                                    for v in relayed.servicer.tunneled.values())
    finally:
        bg_loop.run(masquerade.close())
        bg_loop.stop_node(relayed)
        bg_loop.stop_node(relay)


def test_relay_refuses_a_node_past_its_limit(chain, bg_loop):
    """relay_max_nodes 1 and one node attached: the next member's Attach gets RESOURCE_EXHAUSTED naming the flag
    (a stranger learns nothing of the limit: it gets the fixed refusal)."""
    from node.relay.gate import ATTACH_REFUSED
    from node.relay.link import RelayLink

    async def attach():
        return await attach_or_refusal(RelayLink(chain[0].address, "127.0.0.1:1", PLAINTEXT, member_proof()))

    refused = bg_loop.run(attach())
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--relay-max-nodes 1" in str(refused), refused
    stranger = _attach(chain[0].address)
    assert (stranger.code(), stranger.details()) == (grpc.StatusCode.UNAUTHENTICATED, ATTACH_REFUSED)


def test_a_stranger_cannot_tell_whether_a_node_runs_a_relay(bg_loop, tiny_model_dir, expected):
    """Issue 25: a node without --relay answered Attach UNIMPLEMENTED, a relay otherwise. Now both send a challenge
    and refuse a stranger with the same status and message, and limit its attaches alike; an honest client through
    both still gets transformers' tokens."""
    from node.relay.gate import ATTACH_LIMITED, ATTACH_REFUSED

    llama = tiny_model_dir("llama")
    relay = bg_loop.start_node(llama, 0, 3, relay=True, throughput=100.0)
    plain = bg_loop.start_node(llama, 3, 6, throughput=100.0)
    try:
        answers = {}
        for node in (relay, plain):
            answers[node.address] = [(e.code(), e.details()) for e in (_attach(node.address) for _ in range(4))]
        said = list(answers.values())
        assert said[0] == said[1], answers
        refused, limited = (grpc.StatusCode.UNAUTHENTICATED, ATTACH_REFUSED), (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                               ATTACH_LIMITED)
        assert said[0] == [refused] * 3 + [limited]
        model = DistributedModelForCausalLM.from_pretrained(str(llama), peers=[relay.address, plain.address])
        try:
            assert greedy(model, torch.tensor(PROMPT)) == expected
        finally:
            model.close()
    finally:
        bg_loop.stop_node(plain)
        bg_loop.stop_node(relay)


def test_relay_with_a_swarm_key_refuses_strangers(bg_loop, tiny_model_dir, tmp_path):
    from common.wire.security import SwarmKey

    key = tmp_path / "swarm.key"
    SwarmKey.generate().write(key)
    relay = bg_loop.start_node(tiny_model_dir("llama"), 0, 3, relay=True, swarm_key=str(key), throughput=100.0)
    try:
        assert _attach(relay.address).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        bg_loop.stop_node(relay)


def test_private_swarm_with_tls_through_a_relay(bg_loop, tiny_model_dir, tmp_path, expected):
    """Swarm key and automatic TLS on every node and the client: the relay carries TLS end to end."""
    from common.wire.security import SwarmKey

    key = tmp_path / "swarm.key"
    SwarmKey.generate().write(key)
    llama, trust = tiny_model_dir("llama"), {"swarm_key": str(key), "tls": "auto", "throughput": 100.0}
    relay = bg_loop.start_node(llama, 0, 3, relay=True, **trust)
    try:
        relayed = bg_loop.start_node(llama, 3, 6, relay_via=relay.address, **trust)
        try:
            model = DistributedModelForCausalLM.from_pretrained(
                str(llama), peers=[relay.address, relayed.address], swarm_key=str(key), tls="auto")
            try:
                assert greedy(model, torch.tensor(PROMPT)) == expected
                # the certificate read through the relay is the relayed node's own (endorsed by its identity)
                assert model.swarm.security.pinned_node(relayed.address) == relayed.identity.node_id
            finally:
                model.close()
        finally:
            bg_loop.stop_node(relayed)
    finally:
        bg_loop.stop_node(relay)


def test_byte_limit_paces_a_tunnel():
    """A tunnel of 100 kB/s carries 100 kB to an echo server and back in about (200 - 100 burst) / 100 s."""
    import asyncio
    import time

    from common.wire.generated import relay_pb2
    from node.relay.link import RelayLink
    from node.relay.relay import RelayLimits, RelayServicer
    from node.rpc.handlers import add_service

    async def run() -> tuple[float, bytes]:
        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        server = grpc.aio.server()
        add_service(server, relay_pb2.DESCRIPTOR.services_by_name["Relay"],
                    RelayServicer(RelayLimits(max_nodes=2, max_bytes=100_000), "127.0.0.1", "127.0.0.1"))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        link = RelayLink(f"127.0.0.1:{port}", f"127.0.0.1:{target.sockets[0].getsockname()[1]}", PLAINTEXT,
                         member_proof())
        host, _, tunnel_port = (await link.attach()).rpartition(":")
        carrying = asyncio.ensure_future(link.run())
        began = time.monotonic()
        reader, writer = await asyncio.open_connection(host, int(tunnel_port))
        payload = bytes(range(256)) * 400  # 100 kB
        writer.write(payload)
        received = await reader.readexactly(len(payload))
        elapsed = time.monotonic() - began
        writer.close()
        await link.close()
        carrying.cancel()
        await server.stop(0)
        target.close()
        return elapsed, received == payload

    elapsed, same = asyncio.run(run())
    assert same
    assert 0.8 < elapsed < 3.5, elapsed


# -- three network namespaces: node processes ------------------------------------------------------------
class Processes:
    """Node processes started by a test; every one is killed at the end."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.all: list[NodeProcess] = []

    def start(self, model, start: int, end: int, *args: str, prefix: tuple[str, ...] = ()) -> NodeProcess:
        identity = ("--identity", str(self.tmp / f"node-{len(self.all)}.pem"))
        node = NodeProcess(model, start, end, extra_args=(*FAST, *identity, *args), prefix=prefix).start()
        self.all.append(node)
        return node

    @staticmethod
    def ready(*nodes: NodeProcess) -> None:
        for node in nodes:
            node.wait_ready(120)

    def kill_all(self) -> None:
        for node in self.all:
            node.kill()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Namespaces:
    """client <-> relay <-> node on two links; the relay does not forward, so the client cannot reach the node.

    node 10.77.1.2/24 --- 10.77.1.1 relay 10.77.2.1 --- 10.77.2.2/24 client (each with a default route to
    the relay, which accepts packets for both its addresses on either link)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.client, self.relay, self.node = f"plc-{tag}", f"plr-{tag}", f"pln-{tag}"
        self.made: list[str] = []

    def create(self) -> None:
        for name in (self.client, self.relay, self.node):
            _ip("netns", "add", name)
            self.made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        links = ((self.node, "10.77.1.2", self.relay, "10.77.1.1"), (self.client, "10.77.2.2", self.relay, "10.77.2.1"))
        for i, (end, end_ip, hub, hub_ip) in enumerate(links):
            a, b = f"v{i}a-{self.relay[-6:]}", f"v{i}b-{self.relay[-6:]}"
            _ip("link", "add", a, "netns", end, "type", "veth", "peer", "name", b, "netns", hub)
            _ip("-n", end, "addr", "add", f"{end_ip}/24", "dev", a)
            _ip("-n", hub, "addr", "add", f"{hub_ip}/24", "dev", b)
            _ip("-n", end, "link", "set", a, "up")
            _ip("-n", hub, "link", "set", b, "up")
            _ip("-n", end, "route", "add", "default", "via", hub_ip)
        subprocess.run(["ip", "netns", "exec", self.relay, "sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True)

    def delete(self) -> None:
        for name in self.made:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)

    def exec(self, name: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", name)


def _connects(ns: Namespaces, name: str, address: str) -> bool:
    host, _, port = address.rpartition(":")
    code = (f"import socket; s = socket.create_connection(({host!r}, {port}), timeout=2); print('connected')")
    run = subprocess.run([*ns.exec(name), sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    return "connected" in run.stdout


LISTENER = """
import socket, time
server = socket.create_server(("0.0.0.0", 40003))
while True:
    server.accept()[0].close()
"""


def _wait_connects(ns: Namespaces, name: str, address: str, tries: int = 20) -> bool:
    import time

    for _ in range(tries):
        if _connects(ns, name, address):
            return True
        time.sleep(0.2)
    return False


def make_namespaces() -> tuple[Namespaces | None, str]:
    """Three fresh namespaces, or None and why they cannot be made here."""
    if shutil.which("ip") is None:
        return None, "no `ip` command: network namespaces cannot be made here"
    ns = Namespaces()
    try:
        ns.create()
    except subprocess.CalledProcessError as error:
        ns.delete()
        return (
            None,
            f"cannot create network namespaces (`{' '.join(error.cmd)}` failed: {error.stderr.strip()}); run as root",
        )
    return ns, ""


RELAYS = ("10.77.2.1:40001", "10.77.2.1:40004")


class AtToken(BaseStreamer):
    """Calls `action()` once, after the n-th new token."""

    def __init__(self, n: int, action):
        self.n, self.action, self.count, self.prompt_seen = n, action, 0, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.count += 1
        if self.count == self.n:
            self.action()

    def end(self):
        pass


# The client, in its namespace: one generation; then, told a relay's pid on stdin, one more during which
# it SIGKILLs that relay after 5 tokens. One JSON line per generation.
CLIENT_SCRIPT = """
import json, os, signal, sys, torch
from client import ClientConfig, DistributedModelForCausalLM
from tests.e2e.test_relay import AtToken
model_dir, bootstrap, prompt, new = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3]), int(sys.argv[4])
config = ClientConfig(bootstrap=tuple(bootstrap), mdns=False, discovery_timeout=120)
model = DistributedModelForCausalLM.from_pretrained(model_dir, config=config)
ids = torch.tensor(prompt)
def run(streamer=None):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new, streamer=streamer)
    events = [e.at_position for e in model.last_session.events]
    print(json.dumps({"tokens": out[0].tolist(), "route": [h.peer.address for h in model.last_session.route],
                      "failed_at": events}), flush=True)
run()
pid = int(sys.stdin.readline())
run(AtToken(5, lambda: os.kill(pid, signal.SIGKILL)))
model.close()
"""


@pytest.fixture(scope="module")
def namespaced(tiny_model_dir, tmp_path_factory):
    """Relays a and b (serving another model) in the relay namespace, the client process started with
    them (it waits for the swarm), then the node (llama 0:6) in its namespace once the relays are up."""
    ns, problem = make_namespaces()
    if ns is None:
        pytest.skip(problem)
    llama, other = tiny_model_dir("llama"), tiny_model_dir("qwen2")
    procs = Processes(tmp_path_factory.mktemp("relay-ids"))
    client = None
    try:
        relays = [procs.start(other, 0, 6, "--relay", "--host", "0.0.0.0", "--port", address.rpartition(":")[2],
                              "--announce", address, prefix=ns.exec(ns.relay)) for address in RELAYS]
        client = subprocess.Popen(
            [*ns.exec(ns.client), sys.executable, "-c", CLIENT_SCRIPT, str(llama), ",".join(RELAYS),
             json.dumps(PROMPT), str(NEW_TOKENS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        procs.ready(*relays)  # the node asks them to call it back: they must be up
        node = procs.start(llama, 0, 6, "--host", "127.0.0.1", "--port", "40002", "--announce", "10.77.1.2:40002",
                           *[arg for address in RELAYS for arg in ("--bootstrap", address)], prefix=ns.exec(ns.node))
        procs.ready(node)
        yield ns, relays, node, client
    finally:
        if client is not None:
            client.kill()
            client.communicate()
        procs.kill_all()
        ns.delete()


def _json_line(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    assert line, "the client process ended early:\n" + process.stderr.read()[-3000:]
    return json.loads(line)


def test_client_generates_through_a_relayed_node_in_namespaces(namespaced, expected):
    """The node binds its own namespace's loopback and announces 10.77.1.2:40002, where nothing answers
    (a port not forwarded): the relays' Probes fail, the node relays by itself, the client gets the answer."""
    ns, relays, node, client = namespaced
    assert "not reachable at 10.77.1.2:40002 from the swarm" in node.log()
    assert node.address.startswith("10.77.2.1:") and node.address not in RELAYS
    # something listening on every address of the node's namespace: a relay reaches it, the client cannot
    listener = subprocess.Popen([*ns.exec(ns.node), sys.executable, "-c", LISTENER])
    try:
        assert _wait_connects(ns, ns.relay, "10.77.1.2:40003")
        assert not _connects(ns, ns.client, "10.77.1.2:40003")
    finally:
        listener.kill()
        listener.wait()
    result = _json_line(client)
    assert result["route"] == [node.address]
    assert result["tokens"] == expected


def test_relay_killed_mid_generation_node_reattaches(namespaced, expected):
    ns, relays, node, client = namespaced
    match = re.search(r"serving through relay (\S+) at (\S+)", node.log())
    assert match and match.group(2) == node.address, node.log()
    [used] = [r for r in relays if r.address == match.group(1)]
    [other] = [r for r in relays if r is not used]
    client.stdin.write(f"{used.process.pid}\n")
    client.stdin.flush()
    result = _json_line(client)
    assert result["tokens"] == expected
    assert result["failed_at"] and result["failed_at"][0] > len(PROMPT[0])  # it failed over mid-generation
    assert "lost relay " + used.address in node.log()
    assert f"serving through relay {other.address}" in node.log()
    assert result["route"] != [node.address]  # the node's new address, through the other relay


# -- pure parts ----------------------------------------------------------------------------------------
def _record(node_id: str, address: str, **changes) -> PeerRecord:
    return PeerRecord(node_id=node_id, addresses=(address,), model_id="m", config_hash="h", num_layers=6, start=0,
                      end=6, **changes)


def test_relay_candidates_are_volunteers_that_are_not_relayed_themselves():
    records = [_record("a", "a:1", relay_slots=4), _record("b", "b:1"), _record("c", "c:1", relay_slots=1,
               relay_via="a"), _record("d", "d:1", relay_slots=2, state=NodeState.DRAINING),
               _record("e", "e:1", relay_slots=2), _record("me", "me:1", relay_slots=2)]
    found = relay_candidates(records, "me", avoid={"e:1"}, rng=random.Random(0))
    assert found == ["a:1"]


def test_records_without_relay_fields_still_parse():
    from common.swarm.identity import ephemeral_identity
    from common.swarm.records import renewed, sign_record, verify_record

    identity = ephemeral_identity()
    record = renewed(_record(identity.node_id, "x:1"), 10)
    old = record.to_payload()
    del old["relay_slots"], old["relay_via"]
    import msgpack

    from common.swarm.records import SignedRecord

    payload = msgpack.packb(old, use_bin_type=True)
    signed = SignedRecord(payload, identity.key.public_key().public_bytes_raw(), identity.key.sign(payload))
    parsed = verify_record(signed)
    assert parsed.relay_slots == 0 and parsed.relay_via == ""
    assert verify_record(sign_record(renewed(record, 10, relay_slots=3, relay_via="ab"), identity.key)).relay_slots == 3


def test_byte_bucket_paces_to_its_rate():
    import asyncio
    import time

    async def move() -> float:
        bucket, began = ByteBucket(100_000), time.monotonic()
        for _ in range(20):
            await bucket.take(10_000)  # 200 kB at 100 kB/s, the first 100 kB from the initial burst
        return time.monotonic() - began

    assert 0.8 < asyncio.run(move()) < 1.6


def test_relay_stubs_are_reproducible(tmp_path):
    """The committed relay stubs are what protos/generate.sh makes from protos/relay.proto."""
    subprocess.run(["bash", "protos/generate.sh", str(tmp_path)], cwd=ROOT, check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    generated = ROOT / "common" / "wire" / "generated"
    for name in ("relay_pb2.py", "relay_pb2.pyi", "relay_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (generated / name).read_text(), f"{name} is stale: run `make protos`"
