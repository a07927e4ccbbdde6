"""On joining: can the swarm reach this node? If not, serve through a relay and stay attached to one.

`reachability` asks a few peers to call the advertised address back (rpc Probe, as `potluck doctor`
does). A node nobody can reach (or one told `--relay-via`) attaches to a relay (`RelayLink`), announces
the address the relay gives it, and, when the relay goes away, attaches to another relay and announces
the new address; clients fail over by replay, as for any lost node."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import grpc

from common.swarm.records import NodeState, PeerRecord, renewed, sign_record
from common.wire.security import Security
from node.relay.link import RelayLink, RelayRefused
from node.relay.relay import attach_proof
from node.rpc.dialing import DialPolicy, DialRefused

log = logging.getLogger(__name__)

PROBE_PEERS = 3         # peers asked to call us back
PROBE_DEADLINE = 8.0    # seconds for one peer's answer (its own probe takes up to ~4)
RETRY = 1.0             # seconds between rounds of attach attempts after losing a relay
VIA_WAIT = 30.0         # --relay-via: seconds to keep trying a relay that does not answer yet (starting up)


async def reachability(address: str, peers: list[str], security: Security) -> tuple[bool | None, list[str]]:
    """(verdict, what each peer said): True if a peer reached `address`, False if peers answered and none
    did, None if no peer answered at all (nothing known: an old swarm, or no peers)."""
    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc

    async def ask(peer: str) -> tuple[bool | None, str]:
        try:
            await security.prefetch(peer)
        except Exception as error:  # auto TLS: the peer's certificate could not be read
            return None, f"{peer}: {error}"
        channel = security.channel(peer)
        try:
            reply = await pb_grpc.PotluckStub(channel).Probe(pb.ProbeRequest(address=address), timeout=PROBE_DEADLINE)
            return reply.reachable, f"{peer}: {reply.detail}"
        except grpc.aio.AioRpcError as error:
            return None, f"{peer}: {error.code().name}: {error.details()}"
        finally:
            await channel.close()

    answers = await asyncio.gather(*(ask(peer) for peer in peers[:PROBE_PEERS]))
    verdicts = [v for v, _ in answers if v is not None]
    verdict = (True in verdicts) if verdicts else None
    return verdict, [detail for _, detail in answers]


def relay_candidates(records: list[PeerRecord], own_id: str, avoid: set[str], rng: random.Random) -> list[str]:
    """Addresses of live peers that volunteer as relays (and are not relayed themselves), shuffled."""
    found = [r.address for r in records
             if r.relay_slots > 0 and not r.relay_via and r.node_id != own_id and r.address not in avoid
             and r.state in (NodeState.ONLINE, NodeState.JOINING)]
    rng.shuffle(found)
    return found


def prover(membership, record: Callable[[], PeerRecord]):
    """Answers a relay's challenge: our current record, freshly signed, and our key's signature (relay.py)."""

    def prove(challenge: bytes):
        key = membership.identity.key
        return attach_proof(key, sign_record(renewed(record(), membership.config.ttl), key), challenge)

    return prove


async def _dialable(policy: DialPolicy, address: str) -> bool:
    try:
        await policy.resolve(address)
    except DialRefused:
        return False
    return True


class Relayed:
    """Keeps this node attached to some relay; `on_moved(address, relay_node_id)` announces each new address.

    `record()`: this node's record (signed as proof of membership on each attach); `callers`: the servicer's
    map of tunneled connections to their real callers (RelayLink)."""

    def __init__(self, membership, security: Security, local: str, via: str | None,
                 on_moved: Callable[[str, str], Awaitable[None]], rng: random.Random | None = None,
                 record: Callable[[], PeerRecord] | None = None, callers: dict[str, str] | None = None,
                 policy: DialPolicy = DialPolicy()):
        self.policy = policy  # where gossiped relays may be (node/rpc/dialing.py; --relay-via is the operator's)
        self.prove = prover(membership, record) if record is not None else None
        self.callers = callers
        self.membership = membership
        self.security = security
        self.local = local          # our own server, as the link dials it
        self.via = via              # --relay-via: tried first (after losing it: after the others)
        self.on_moved = on_moved
        self.link: RelayLink | None = None
        self.moves = 0              # re-attachments after a lost relay
        self.refused = 0            # gossiped relay addresses the dial policy refused
        self._rng = rng or random.Random()
        self._task: asyncio.Task | None = None

    def _relay_id(self, address: str) -> str:
        return next((r.node_id for r in self.membership.live() if address in r.addresses), "")

    async def attach(self, avoid: set[str] = frozenset()) -> str:
        """Attach to the first relay that takes us (--relay-via first, then advertised relays)."""
        own = self.membership.identity.node_id if self.membership.identity is not None else ""
        candidates = [self.via] if self.via and self.via not in avoid else []
        candidates += [a for a in relay_candidates(self.membership.live(), own, set(avoid), self._rng)
                       if a not in candidates]
        problems, codes = [], set()
        for relay in candidates:
            dial = relay
            if relay != self.via:  # a stranger's record named it: resolved and vetted first, never dialed if refused
                try:
                    dial = await self.policy.resolve(relay)
                except DialRefused:
                    self.refused += 1
                    problems.append(f"relay {relay}: not an address this node dials (its dial policy)")
                    continue
            link = RelayLink(relay, self.local, self.security, self.prove, self.callers, dial)
            try:
                address = await link.attach()
            except RelayRefused as error:
                problems.append(str(error))
                codes.add(error.code)
                continue
            self.link = link
            return address
        raise RelayRefused(
            "no relay took this node: "
            + ("; ".join(problems) if problems else "none is known (start a node with --relay, or give --relay-via)"),
            codes.pop() if len(codes) == 1 else None,
        )

    def start(self) -> None:
        """Watch the link from now on (after the first `attach`)."""
        self._task = asyncio.ensure_future(self._keep())

    async def _keep(self) -> None:
        while True:
            try:
                reason = await self.link.run()
            except Exception as error:  # a bug in carrying must not leave the node unreachable for good
                log.exception("relay link failed")
                reason = f"{type(error).__name__}: {error}"
            lost = self.link.relay
            log.warning("lost relay %s (%s); attaching to another", lost, reason)
            avoid = {lost}
            while True:
                try:
                    address = await self.attach(avoid)
                    break
                except RelayRefused as error:
                    log.warning("%s; retrying in %.0fs", error, RETRY)
                    avoid = set()  # the lost relay may be back
                    await asyncio.sleep(RETRY)
            self.moves += 1
            log.warning("serving through relay %s at %s", self.link.relay, address)
            try:
                await self.on_moved(address, self._relay_id(self.link.relay))
            except Exception:  # the next heartbeat announces it anyway
                log.exception("could not announce the new relayed address")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.link is not None:
            await self.link.close()


async def relay_if_needed(config, membership, security: Security, address: str, local: str,
                          on_moved: Callable[[str, str], Awaitable[None]],
                          record: Callable[[], PeerRecord] | None = None,
                          callers: dict[str, str] | None = None,
                          policy: DialPolicy = DialPolicy()) -> Relayed | None:
    """A `Relayed` (attached, its address announced through `on_moved`) when this node must serve through
    a relay: --relay-via, or peers answered that they cannot reach `address` (unless --no-relay). Peers and
    relays that records name pass `policy` first (bootstrap nodes and --relay-via are the operator's)."""
    if not config.relay_via:
        if config.relay or not config.relay_fallback:
            return None
        gossiped = [r.address for r in membership.live() if r.address != address]
        peers = list(dict.fromkeys([*config.bootstrap, *[a for a in gossiped if await _dialable(policy, a)]]))
        if not peers:
            return None
        verdict, said = await reachability(address, peers, security)
        if verdict is not False:
            if verdict is None:
                log.info("could not check whether the swarm reaches %s: %s", address, "; ".join(said))
            return None
        log.warning("not reachable at %s from the swarm (%s)", address, "; ".join(said))
    relayed = Relayed(membership, security, local, config.relay_via, on_moved, record=record, callers=callers,
                      policy=policy)
    give_up = asyncio.get_running_loop().time() + (VIA_WAIT if config.relay_via else 0.0)
    while True:
        try:
            given = await relayed.attach()
            break
        except RelayRefused as error:
            if error.code == grpc.StatusCode.UNAVAILABLE and asyncio.get_running_loop().time() < give_up:
                await asyncio.sleep(0.5)  # --relay-via names a relay that is not up yet
                continue
            if config.relay_via:
                raise
            log.warning("%s; serving on %s anyway (clients that cannot reach it will fail over)", error, address)
            return None
    log.warning("serving through relay %s at %s", relayed.link.relay, given)
    await on_moved(given, relayed._relay_id(relayed.link.relay))
    relayed.start()
    return relayed
