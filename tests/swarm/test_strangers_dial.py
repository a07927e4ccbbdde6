"""Strangers in the public swarm: what a node dials on someone else's behalf (docs/reliability.md, "Public swarm:
what a node dials"). Each attack runs against real in-process nodes on 127.0.0.1; an honest client through the same
nodes still gets exactly transformers' tokens."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.config import ClientConfig
from common.swarm.records import NodeState, PeerRecord, node_id_of, renewed, sign_record
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from common.wire.security import AUTH_METADATA, SwarmKey
from node.rpc.dialing import REFUSED
from node.rpc.push import REFUSED_TARGET
from node.rpc.ratelimit import RateLimiter
from tests.swarm.test_push import HandStream, a_step

HIDDEN = 64  # the tiny llama
IDS = torch.tensor([[3, 17, 29, 41, 53, 67]])
NEW_TOKENS = 6
# every spelling of this machine's loopback that a resolver accepts, and special or private addresses
LOOPBACK_SPELLINGS = ["127.0.0.1", "127.1", "0", "2130706433", "0x7f000001", "0177.0.0.1", "localhost", "localhost.",
                      "[::1]", "[::127.0.0.1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]"]
OTHER_INTERNAL = ["10.0.0.1:80", "192.168.1.1:80", "172.16.0.1:80", "169.254.169.254:80", "100.64.0.1:80",
                  "[fd00::1]:80", "224.0.0.1:80", "255.255.255.255:80", "no-such-host.internal:80"]
RAW_TEXT = ("Connection refused", "failed to connect", "HTTP/2", "ipv4:", "ipv6:", "private swarm", "--swarm-key",
            "Socket closed", "parsing")


class Listener:
    """A TCP service on loopback that counts the connections made to it (an internal service a stranger would aim
    a node at). `http1`: it answers every connection with an HTTP/1.1 error, as a web server would."""

    def __init__(self, http1: bool = False):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.connections = 0
        self.http1 = http1
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                if self.http1:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def expected(folder):
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return reference.generate(IDS, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def lab(bg_loop, folder):
    """B (3:6) in no swarm; A (0:3) joined to B: A pushes only to members' addresses."""
    b = bg_loop.start_node(folder, 3, 6)
    a = bg_loop.start_node(folder, 0, 3, bootstrap=(b.address,))
    yield a, b
    for node in (a, b):
        bg_loop.stop_node(node)


@pytest.fixture(scope="module")
def public(bg_loop, folder):
    """Two nodes told they are in a public swarm (--public-swarm), on loopback: they dial no loopback address."""
    nodes = [bg_loop.start_node(folder, a, b, swarm_scope="public") for a, b in ((0, 3), (3, 6))]
    yield nodes
    for node in nodes:
        bg_loop.stop_node(node)


def honest_generate(nodes, expected, **options):
    model = DistributedModelForCausalLM.from_pretrained(
        str(nodes[0].files.root), config=ClientConfig(peers=tuple(n.address for n in nodes), **options))
    try:
        started = time.monotonic()
        out = model.generate(IDS, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out, expected)
        assert time.monotonic() - started < 30
        return model.last_session
    finally:
        model.close()


def pushes(node, span: tuple[int, int], targets: list[str], name: str) -> list[pb.StepResult]:
    """Open a session on `node` and send one step per target with that target as the next hop; the failure notice
    of each (the second result of its step), in order."""
    notices = []
    torch.manual_seed(0)
    with grpc.insecure_channel(node.address) as channel:
        stream = HandStream(pb_grpc.PotluckStub(channel), name, *span)
        for index, target in enumerate(targets):
            stream.send(pb.SessionRequest(step=a_step(torch.randn(1, 1, HIDDEN), index, index + 1, address=target,
                                                      session_id="elsewhere", timeout=2.0)))
            result, notice = stream.result(), stream.result()
            assert result.HasField("hidden") and notice.step_id == index + 1 and not notice.HasField("hidden")
            notices.append(notice)
        stream.finish()
    return notices


def test_a_push_list_cannot_aim_a_node_at_a_non_member(lab, expected):
    a, b = lab
    internal = Listener()
    try:
        targets = [internal.address, f"localhost:{internal.port}", f"127.1:{internal.port}"]
        started = time.monotonic()
        notices = pushes(a, (0, 3), targets, "aimed")
        assert time.monotonic() - started < 2.0  # refused before any dial: no reconnecting for seconds
        assert [n.push_error for n in notices] == [REFUSED_TARGET] * len(targets)
        assert internal.connections == 0
    finally:
        internal.close()
    session = honest_generate(lab, expected)  # B is a member: the honest client's steps are handed on
    assert session.pushed_steps == NEW_TOKENS


def test_a_public_node_dials_no_loopback_private_or_special_address(public, expected):
    first = public[0]
    internal = Listener()
    try:
        targets = [f"{host}:{internal.port}" for host in LOOPBACK_SPELLINGS] + OTHER_INTERNAL
        started = time.monotonic()
        notices = pushes(first, (0, 3), targets, "public-aimed")
        assert [n.push_error for n in notices] == [REFUSED_TARGET] * len(targets)
        with grpc.insecure_channel(first.address) as channel:
            stub = pb_grpc.PotluckStub(channel)
            for target in targets:
                first.servicer.prober.limiter = RateLimiter(1000.0)  # one probe a second per caller: not tested here
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Probe(pb.ProbeRequest(address=target), timeout=10)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, target
                assert caught.value.details() == REFUSED, target
        assert time.monotonic() - started < 15.0
        assert internal.connections == 0
        assert first.servicer.pusher.calls == 0
    finally:
        internal.close()
    # the honest client: its push to the next loopback node is refused too, so it drives the hops itself, exactly
    session = honest_generate(public, expected)
    assert session.pushed_steps < NEW_TOKENS


def test_failed_dials_tell_the_caller_no_transport_text(bg_loop, lab, folder, tmp_path):
    _, b = lab  # in no swarm, a lab: it dials loopback addresses, and says only the status of what failed
    key = tmp_path / "swarm.key"
    SwarmKey.generate().write(key)
    private = bg_loop.start_node(folder, 0, 6, swarm_key=str(key))
    web = Listener(http1=True)
    closed = socket.create_server(("127.0.0.1", 0))
    closed_address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    try:
        notices = pushes(b, (3, 6), [closed_address, web.address, private.address], "told")
        codes = [n.push_error.split("[")[1].split("]")[0] for n in notices]
        assert codes[0] == "UNAVAILABLE" and codes[2] == "UNAUTHENTICATED", notices
        with grpc.insecure_channel(b.address) as channel:
            stub = pb_grpc.PotluckStub(channel)
            details = []
            for target in (closed_address, web.address):
                b.servicer.prober.limiter = RateLimiter(1000.0)
                reply = stub.Probe(pb.ProbeRequest(address=target), timeout=10)
                assert not reply.reachable
                details.append(reply.detail)
        assert web.connections >= 1  # the lab node did dial them: the check below can fail
        for told in [n.push_error for n in notices] + details:
            assert not any(text.lower() in told.lower() for text in RAW_TEXT), told
    finally:
        web.close()
        bg_loop.stop_node(private)


def test_a_token_stamped_far_in_the_future_is_refused(bg_loop, folder, tmp_path):
    key_file = tmp_path / "swarm.key"
    key = SwarmKey.generate()
    key.write(key_file)
    node = bg_loop.start_node(folder, 0, 6, swarm_key=str(key_file))
    method = "/potluck.v1.Potluck/Info"
    try:
        with grpc.insecure_channel(node.address) as channel:
            stub = pb_grpc.PotluckStub(channel)
            ahead = ((AUTH_METADATA, key.token(method, now=time.time() + 5)),)  # clocks a few seconds apart
            assert stub.Info(pb.InfoRequest(), metadata=ahead, timeout=10).node_id == node.identity.node_id
            for seconds in (60, 119):
                future = ((AUTH_METADATA, key.token(method, now=time.time() + seconds)),)
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Info(pb.InfoRequest(), metadata=future, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, seconds
    finally:
        bg_loop.stop_node(node)


def test_a_gossiped_model_id_cannot_lead_the_api_out_of_its_models_folder(bg_loop, lab, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from client.api.catalog import SwarmCatalog, covered_models
    from common.swarm.records import verify_record

    a, _ = lab
    models_dir, outside = tmp_path / "models", tmp_path / "outside"
    models_dir.mkdir()
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    bad_ids = ["../outside", str(outside), "a/../../outside", "..", "org/name/../../../outside", "x\\..\\outside"]
    records = []
    for index, model_id in enumerate(bad_ids):  # a stranger announces nodes that cover every layer of these
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        record = renewed(PeerRecord(node_id=node_id_of(public), addresses=(f"203.0.113.{index + 1}:7000",),
                                    model_id=model_id, config_hash=f"h{index}", num_layers=2, start=0, end=2,
                                    state=NodeState.ONLINE), ttl=60)
        records.append(sign_record(record, key))
    with grpc.insecure_channel(a.address) as channel:  # gossiped to an honest node, which passes them on
        pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(records=codec.encode_records(records)), timeout=10)

    async def listed():
        catalog = SwarmCatalog(ClientConfig(bootstrap=(a.address,), mdns=False), models_dir)
        try:
            seen = [m.model_id for m in await catalog.models()]
            live = {r.model_id for r in catalog.membership.live()}
            sources = {}
            for model_id in bad_ids:
                try:
                    sources[model_id] = await catalog.source(model_id)
                except LookupError:
                    sources[model_id] = None
            return seen, live, sources
        finally:
            await catalog.close()

    seen, live, sources = asyncio.run(listed())
    held = {verify_record(signed).model_id for signed in a.membership.registry.signed()}
    assert set(bad_ids) <= held  # the node took the records (unproven: their addresses never answered)
    assert not set(bad_ids) & (set(seen) | live)
    # were they proven (a stranger who does answer at those addresses), listing would still refuse the ids
    assert covered_models([verify_record(signed) for signed in records]) == []
    assert all(source is None for source in sources.values()), sources


def test_the_api_refuses_a_huge_body_before_tokenizing_it():
    from fastapi.testclient import TestClient

    from client.api.app import create_app
    from client.api.settings import MAX_BODY_BYTES

    class Tokenizer:
        used = 0

        def __getattr__(self, name):
            Tokenizer.used += 1
            raise AttributeError(name)

    app = create_app({"m": lambda: None}, {"m": Tokenizer()})
    client = TestClient(app)
    huge = {"model": "m", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    for send in ({"json": huge}, {"content": iter([json.dumps(huge).encode()])}):  # with Content-Length, chunked
        reply = client.post("/v1/chat/completions", **send)
        assert reply.status_code == 413
        error = reply.json()["error"]
        assert error["code"] == "request_too_large" and str(MAX_BODY_BYTES) in error["message"]
    assert Tokenizer.used == 0
    small = {"model": "other", "messages": [{"role": "user", "content": "hi"}]}
    small = client.post("/v1/chat/completions", json=small)
    assert small.status_code == 404  # bodies under the limit reach the app as they were
