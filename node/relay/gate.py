"""Who may Attach: the checks a relay makes before it carries anything, shared with nodes that are no relay.

A stranger calling `rpc Attach` gets, from a relay and from a node that runs none alike: the same per-address rate
limit (RESOURCE_EXHAUSTED, one fixed message), then a challenge, then, without a valid proof of swarm membership in
time, UNAUTHENTICATED with one fixed message (`ATTACH_REFUSED`). So an outsider cannot tell whether a node runs a
relay (issue 25: an unknown service answered UNIMPLEMENTED). Only a proven member learns more: a relay's address
or its limit, or that this node is not a relay (its record says so anyway: relay_slots)."""

from __future__ import annotations

import asyncio
import logging
import os

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.swarm.records import RecordError, SignedRecord, verify_record
from common.wire.generated import relay_pb2 as rpb
from node.rpc.ratelimit import RateLimited, RateLimiter, peer_host

log = logging.getLogger(__name__)

ATTACH_RATE = 0.1          # attaches a second per address (one every 10 s), in bursts of ATTACH_BURST
ATTACH_BURST = 3
PROOF_WAIT = 5.0           # seconds for a node's proof of membership after the challenge
ATTACH_CONTEXT = b"potluck-relay-attach"  # what the proof signs, before the challenge
ATTACH_REFUSED = ("Attach needs the node's valid signed peer record and its key's signature over this relay's "
                  "challenge, in time (only swarm members attach)")
ATTACH_LIMITED = f"too many attaches from this address (attaches to a relay: {ATTACH_RATE:g}/s per address)"
NOT_A_RELAY = "this node is not a relay (its record offers no relay slots); attach to another node"


class ProofError(ValueError):
    """An Attach without a valid proof of swarm membership; the message says what is wrong (logged, not told)."""


def attach_proof(key, signed: SignedRecord, challenge: bytes) -> rpb.Frame:
    """The relayed node's answer to a challenge: its signed record and its key's signature over the challenge."""
    frame = rpb.Frame(proof=key.sign(ATTACH_CONTEXT + challenge))
    frame.record.payload, frame.record.public_key, frame.record.signature = (signed.payload, signed.public_key,
                                                                             signed.signature)
    return frame


def check_proof(frame: rpb.Frame, challenge: bytes) -> str:
    """The node id a first frame proves (a valid, unexpired signed record, and the same key's signature over the
    challenge); ProofError otherwise."""
    if not frame.HasField("record") or not frame.proof:
        raise ProofError("Attach needs the node's signed peer record and its signature over the challenge "
                         "(only swarm members attach)")
    signed = SignedRecord(frame.record.payload, frame.record.public_key, frame.record.signature)
    try:
        record = verify_record(signed)
        Ed25519PublicKey.from_public_bytes(signed.public_key).verify(frame.proof, ATTACH_CONTEXT + challenge)
    except RecordError as error:
        raise ProofError(f"Attach: {error}") from None
    except (InvalidSignature, ValueError):
        raise ProofError("Attach: the proof is not the record's key's signature over this relay's challenge") from None
    return record.node_id


class AttachGate:
    """The per-address attach limit and the membership challenge, as every node answers them."""

    def __init__(self) -> None:
        self.attaches = RateLimiter(ATTACH_RATE, ATTACH_BURST)  # per address

    async def admit(self, context: grpc.aio.ServicerContext) -> bytes:
        """Charge the caller's address; the challenge to send it (RESOURCE_EXHAUSTED past the limit)."""
        try:
            self.attaches.charge(peer_host(context.peer()), "Attach")
        except RateLimited:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, ATTACH_LIMITED)
        return os.urandom(32)

    async def proven(self, iterator, challenge: bytes, context: grpc.aio.ServicerContext) -> str:
        """The node id the caller's first frame proves; UNAUTHENTICATED with `ATTACH_REFUSED` otherwise."""
        try:
            return check_proof(await asyncio.wait_for(iterator.__anext__(), PROOF_WAIT), challenge)
        except (StopAsyncIteration, asyncio.TimeoutError):
            reason = f"no proof of swarm membership within {PROOF_WAIT:g}s of the challenge"
        except ProofError as error:
            reason = str(error)
        log.info("refused an Attach from %s: %s", context.peer(), reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, ATTACH_REFUSED)


class NotARelay:
    """`rpc Attach` on a node that does not volunteer as a relay: strangers get exactly a relay's answers."""

    def __init__(self) -> None:
        self.gate = AttachGate()

    async def Attach(self, requests, context: grpc.aio.ServicerContext):
        challenge = await self.gate.admit(context)
        yield rpb.Frame(challenge=challenge)
        await self.gate.proven(requests.__aiter__(), challenge, context)
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_A_RELAY)
