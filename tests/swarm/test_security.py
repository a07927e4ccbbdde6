"""Private swarms and TLS: real grpc.aio nodes on 127.0.0.1, real tokens, real certificates, real bytes."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM

from client.model import DistributedModelForCausalLM
from client.transport import PeerError
from common.swarm.identity import load_identity
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from common.wire.security import (
    AUTH_METADATA,
    Security,
    SecurityError,
    SwarmKey,
    TokenChecker,
    endorsed_certificate,
    endorser,
)
from node.cli.proxy import LatencyProxy

INFO = "/potluck.v1.Potluck/Info"


# -- tokens, sealing, certificates (no network) -----------------------------------------------------
def test_token_checker_accepts_once_and_rejects_the_rest():
    key, other = SwarmKey.generate(), SwarmKey.generate()
    checker = TokenChecker(key)
    token = key.token(INFO)
    assert checker.check(INFO, token) is None
    assert checker.check(INFO, token) == "replayed swarm token"
    assert checker.check(INFO, None) == "no swarm token"
    assert checker.check(INFO, other.token(INFO)) == "wrong swarm key"
    assert checker.check("/potluck.v1.Potluck/Gossip", key.token(INFO)) == "wrong swarm key"  # bound to the method
    assert checker.check(INFO, key.token(INFO, now=time.time() - 600)).startswith("stale")
    assert checker.check(INFO, "v1.12.abc") == "malformed swarm token"


def test_seal_opens_only_with_the_same_key(tmp_path):
    key = SwarmKey.generate()
    sealed = key.seal(b"record bytes")
    assert b"record bytes" not in sealed
    assert key.unseal(sealed) == b"record bytes"
    assert SwarmKey.generate().unseal(sealed) is None
    path = tmp_path / "swarm.key"
    key.write(path)
    assert SwarmKey.load(path) == key and (path.stat().st_mode & 0o777) == 0o600
    (tmp_path / "bad.key").write_text("hello")
    with pytest.raises(SecurityError, match="not a Potluck swarm key"):
        SwarmKey.load(tmp_path / "bad.key")


def test_automatic_certificate_is_endorsed_by_the_identity(tmp_path):
    identity = load_identity(str(tmp_path / "id.pem"))
    try:
        first, again = endorsed_certificate(identity.key), endorsed_certificate(identity.key)
        assert endorser(first.cert_pem) == identity.node_id
        assert first.key_pem == again.key_pem  # the TLS key is derived: pins survive restarts
        stranger = load_identity(str(tmp_path / "other.pem"))
        assert endorser(endorsed_certificate(stranger.key).cert_pem) != identity.node_id
        stranger.release()
        forged = bytearray(first.cert_pem)
        with pytest.raises(SecurityError):
            endorser(bytes(forged).replace(b"MI", b"MA", 1))
    finally:
        identity.release()


# -- a private, encrypted swarm of two real nodes ---------------------------------------------------
@pytest.fixture(scope="module")
def private_swarm(bg_loop, tiny_model_dir, tmp_path_factory):
    folder = tiny_model_dir("llama")
    key_file = tmp_path_factory.mktemp("keys") / "swarm.key"
    SwarmKey.generate().write(key_file)
    nodes = [bg_loop.start_node(folder, a, b, swarm_key=str(key_file), tls="auto") for a, b in ((0, 3), (3, 6))]
    yield folder, str(key_file), nodes
    for node in nodes:
        bg_loop.stop_node(node)


def _sync_channel(node, security: Security) -> grpc.Channel:
    return security.sync_channel(node.address)


def _info(node, security: Security, metadata=()):
    with _sync_channel(node, security) as channel:
        return pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=5, metadata=metadata)


def test_calls_without_the_key_learn_nothing(private_swarm):
    folder, key_file, nodes = private_swarm
    tls_only = Security(tls="auto")
    for metadata in ((), ((AUTH_METADATA, SwarmKey.generate().token(INFO)),),  # none; another swarm's key
                     ((AUTH_METADATA, "v1.1.0123456789abcdef.00"),)):          # garbage
        with pytest.raises(grpc.RpcError) as caught:
            _info(nodes[0], tls_only, metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        details = caught.value.details()
        assert "swarm" in details and nodes[0].identity.node_id[:8] not in details and "llama" not in details.lower()
    with pytest.raises(grpc.RpcError) as caught, _sync_channel(nodes[0], tls_only) as channel:
        pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _sync_channel(nodes[0], tls_only) as channel:  # health probes (k8s, docker) need no key
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_status_says_a_key_is_needed_and_lists_the_swarm_with_it(private_swarm):
    from client.status import collect
    from common.swarm.membership import SwarmConfig

    folder, key_file, nodes = private_swarm
    config = SwarmConfig(bootstrap=(nodes[0].address,), mdns=False)
    with pytest.raises(PermissionError, match="UNAUTHENTICATED.*--swarm-key"):
        asyncio.run(collect(config, 0.1, Security(tls="auto")))
    records = asyncio.run(collect(config, 0.1, Security(swarm_key=SwarmKey.load(key_file), tls="auto")))
    assert nodes[0].identity.node_id in {r.node_id for r in records}


def test_a_member_token_works_once(private_swarm):
    folder, key_file, nodes = private_swarm
    member = Security(swarm_key=SwarmKey.load(key_file), tls="auto")
    metadata = member.call_metadata(INFO)
    assert _info(nodes[0], member, metadata).node_id == nodes[0].identity.node_id
    with pytest.raises(grpc.RpcError) as caught:  # the same token again: a replay
        _info(nodes[0], member, metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stale = ((AUTH_METADATA, member.swarm_key.token(INFO, now=time.time() - 3600)),)
    with pytest.raises(grpc.RpcError) as caught:
        _info(nodes[0], member, stale)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_without_the_key_gets_a_clear_error(private_swarm):
    folder, key_file, nodes = private_swarm
    with pytest.raises(PeerError, match="UNAUTHENTICATED.*swarm's key"):
        DistributedModelForCausalLM.from_pretrained(str(folder), [n.address for n in nodes], tls="auto")


class CapturingProxy(LatencyProxy):
    """A loopback proxy that keeps every byte it forwards (what someone on the path would see)."""

    def __init__(self, target: str):
        super().__init__(target, 0.0)
        self.seen = bytearray()

    async def _receive(self, reader, queue):
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(65536)
            self.seen += data
            queue.put_nowait((loop.time(), data))
            if not data:
                return


def _generate_through_proxies(bg_loop, folder, nodes, **options):
    proxies = [bg_loop.run(CapturingProxy(n.address).start()) for n in nodes]
    try:
        model = DistributedModelForCausalLM.from_pretrained(str(folder), [p.address for p in proxies], **options)
        try:
            ids = torch.tensor([[3, 17, 29, 41, 53, 67]])
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
            hidden = model.embed_tokens(ids).detach().to(torch.float32)
            assert model.last_session.pushed_steps == 6  # nodes handed steps to each other (over TLS, with tokens)
        finally:
            model.close()
    finally:
        for proxy in proxies:
            bg_loop.run(proxy.stop())
    return ids, out, hidden, bytes(proxies[0].seen)


def test_private_encrypted_swarm_generates_exactly_and_the_path_sees_no_activations(bg_loop, private_swarm,
                                                                                       tiny_swarm):
    folder, key_file, nodes = private_swarm
    ids, out, hidden, seen = _generate_through_proxies(bg_loop, folder, nodes, swarm_key=key_file, tls="auto")
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)
    marker = hidden[0, 1, :16].numpy().tobytes()  # 64 bytes of the prompt's embeddings, as sent on a float32 wire
    assert len(seen) > 10_000 and marker not in seen
    # the check can fail: the same prompt through plaintext nodes shows these bytes on the path
    plain = tiny_swarm("llama")
    _, plain_out, plain_hidden, plain_seen = _generate_through_proxies(bg_loop, folder, plain)
    assert torch.equal(plain_out, expected)
    assert plain_hidden[0, 1, :16].numpy().tobytes() in plain_seen


def test_pinning_rejects_a_node_presenting_another_identity(private_swarm):
    folder, key_file, nodes = private_swarm
    security = Security(swarm_key=SwarmKey.load(key_file), tls="auto")
    security._pinned(nodes[0].address)
    assert security.pinned_node(nodes[0].address) == nodes[0].identity.node_id
    # someone at node 1's address presenting another node's certificate: the TLS handshake fails
    security._pins[nodes[1].address] = security._pins[nodes[0].address]
    from client.transport import Peer

    async def ask():
        peer = Peer(nodes[1].address, security)
        try:
            return await peer.info(5)
        finally:
            await peer.close()

    with pytest.raises(PeerError):
        asyncio.run(ask())


def test_gossip_never_crosses_swarms(bg_loop, tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    keys = []
    for name in ("a.key", "b.key"):
        SwarmKey.generate().write(tmp_path / name)
        keys.append(str(tmp_path / name))
    public = bg_loop.start_node(folder, 0, 6)
    private_a = bg_loop.start_node(folder, 0, 6, swarm_key=keys[0], bootstrap=(public.address,))
    private_b = bg_loop.start_node(folder, 0, 6, swarm_key=keys[1], bootstrap=(private_a.address, public.address))
    mate = bg_loop.start_node(folder, 0, 6, swarm_key=keys[0], bootstrap=(private_a.address, public.address))
    try:
        for node in (public, private_a, private_b, mate):
            bg_loop.run(node.membership.pull_all())
        ids = {name: {r.node_id for r in node.membership.live()}
               for name, node in (("public", public), ("a", private_a), ("b", private_b), ("mate", mate))}
        a_id, b_id, mate_id, public_id = (n.identity.node_id for n in (private_a, private_b, mate, public))
        assert ids["public"] == {public_id}
        assert ids["b"] == {b_id}
        assert ids["a"] == ids["mate"] == {a_id, mate_id}  # members find each other
    finally:
        for node in (mate, private_b, private_a, public):
            bg_loop.stop_node(node)
