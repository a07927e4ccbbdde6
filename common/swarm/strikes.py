"""Strikes: a client's signed report that a node returned wrong activations.

A strike is a msgpack map signed with the reporter's ed25519 key (a client signs with a throwaway
key); it names the accused node by id and address and the layers it got wrong. Nodes keep the strikes
they hear of and pass them on with their gossip; clients add a routing cost for each one
(client/routing.py). Anyone can make a key, so a strike is a claim, not proof: it counts once per
reporter and accused node, it expires, a book holds a bounded number, and it only raises a node's
routing cost; it never bans a node for clients that did not catch it themselves."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.swarm.records import MAX_CLOCK_SKEW, RecordError, SignedRecord, node_id_of, open_signed
from common.wire.contract import PROTOCOL_VERSION

STRIKE_TTL = 3600.0       # seconds a strike counts
MAX_STRIKE_BYTES = 1024   # a strike's payload, at most
MAX_STRIKES = 256         # a book keeps at most this many (the newest); gossip carries them all


class StrikeError(RecordError):
    """A strike that must be dropped; the message says why."""


@dataclass(frozen=True)
class Strike:
    node_id: str          # the accused node
    address: str          # where the reporter reached it
    config_hash: str      # the model it was serving
    start: int            # the layers it got wrong, [start, end)
    end: int
    reason: str           # what the reporter saw ("relative error 0.61 at token 7, tolerance 0.001")
    issued_at: float
    expires_at: float
    protocol_version: int = PROTOCOL_VERSION

    def to_payload(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Accusation:
    """A verified strike and who made it."""

    strike: Strike
    reporter: str  # node_id_of(the signing key)


_SCHEMA: dict[str, tuple[type, ...]] = {
    "node_id": (str,), "address": (str,), "config_hash": (str,), "start": (int,), "end": (int,), "reason": (str,),
    "issued_at": (int, float), "expires_at": (int, float), "protocol_version": (int,),
}


def make_strike(node_id: str, address: str, config_hash: str, start: int, end: int, reason: str,
                now: float | None = None, ttl: float = STRIKE_TTL) -> Strike:
    now = time.time() if now is None else now
    return Strike(node_id=node_id, address=address[:255], config_hash=config_hash, start=start, end=end,
                  reason=reason[:300], issued_at=now, expires_at=now + ttl)


def sign_strike(strike: Strike, key: Ed25519PrivateKey) -> SignedRecord:
    payload = msgpack.packb(strike.to_payload(), use_bin_type=True)
    return SignedRecord(payload=payload, public_key=key.public_key().public_bytes_raw(), signature=key.sign(payload))


def verify_strike(signed: SignedRecord, now: float | None = None) -> Accusation:
    """The strike inside `signed` and its reporter, or StrikeError saying why it must be dropped."""
    now = time.time() if now is None else now
    data = open_signed(signed, MAX_STRIKE_BYTES, "strike", StrikeError)
    known = {}
    for name, types in _SCHEMA.items():
        value = data.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, types):
            raise StrikeError(f"malformed strike: {name} is missing or has the wrong type")
        if isinstance(value, float) and not math.isfinite(value):
            raise StrikeError(f"malformed strike: {name} is not finite")
        known[name] = value  # unknown fields are ignored
    strike = Strike(**known)
    if not 0 <= strike.start < strike.end:
        raise StrikeError(f"malformed strike: layers {strike.start}:{strike.end}")
    if strike.expires_at <= now:
        raise StrikeError("expired strike")
    if strike.issued_at > now + MAX_CLOCK_SKEW or strike.expires_at - strike.issued_at > STRIKE_TTL:
        raise StrikeError("strike has implausible times (issued in the future or lasting too long)")
    reporter = node_id_of(signed.public_key)
    if reporter == strike.node_id:
        raise StrikeError("a node cannot strike itself")
    return Accusation(strike, reporter)


@dataclass
class StrikeBook:
    """Verified strikes, one per (reporter, accused node): the newest wins; at most `limit` kept."""

    limit: int = MAX_STRIKES
    entries: dict[tuple[str, str], tuple[Strike, SignedRecord]] = field(default_factory=dict)
    rejected: int = 0

    def offer(self, signed: SignedRecord, now: float | None = None) -> bool:
        """Verify and keep `signed`; True if it is new. StrikeError if it is invalid."""
        try:
            accusation = verify_strike(signed, now)
        except StrikeError:
            self.rejected += 1
            raise
        key = (accusation.reporter, accusation.strike.node_id)
        held = self.entries.get(key)
        if held is not None and held[0].issued_at >= accusation.strike.issued_at:
            return False
        self.entries[key] = (accusation.strike, signed)
        if len(self.entries) > self.limit:
            self.expire(now)
            while len(self.entries) > self.limit:  # drop the oldest
                del self.entries[min(self.entries, key=lambda k: self.entries[k][0].issued_at)]
        return key in self.entries

    def offer_many(self, batch, now: float | None = None) -> tuple[int, list[str]]:
        """Offer each strike; returns (number accepted as new, reasons for the ones dropped)."""
        accepted, problems = 0, []
        for signed in batch:
            try:
                accepted += self.offer(signed, now)
            except StrikeError as error:
                problems.append(str(error))
        return accepted, problems

    def expire(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for key in [k for k, (strike, _) in self.entries.items() if strike.expires_at <= now]:
            del self.entries[key]

    def signed(self, now: float | None = None) -> list[SignedRecord]:
        now = time.time() if now is None else now
        return [signed for strike, signed in self.entries.values() if strike.expires_at > now]

    def counts(self, now: float | None = None, config_hash: str | None = None) -> dict[str, int]:
        """node id -> how many reporters struck it (unexpired; about that model, if given)."""
        now = time.time() if now is None else now
        out: dict[str, int] = {}
        for strike, _ in self.entries.values():
            if strike.expires_at > now and (config_hash is None or strike.config_hash == config_hash):
                out[strike.node_id] = out.get(strike.node_id, 0) + 1
        return out
