"""The signed, expiring peer record: what a node tells the swarm about itself.

A record is a msgpack map signed with the node's ed25519 key. Anyone can verify it;
nobody but the node can make one in its name. Everything read from the network is
validated here: unsigned, forged, expired, malformed or wrong-version records raise
`RecordError`; unknown fields are ignored (forward compatibility)."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.wire.contract import PROTOCOL_VERSION

MAX_PAYLOAD_BYTES = 4096
MAX_CLOCK_SKEW = 60.0  # seconds a record may claim to come from the future
MAX_TTL = 3600.0
TTL_CAP = 180.0  # seconds a swarm member keeps a record at most (honest nodes announce 90 by default)
MAX_ADAPTERS = 32  # LoRA adapter names one record may list (node/model/lora.py)


class RecordError(ValueError):
    """A record that must be dropped; the message says why."""


class NodeState(str, Enum):
    JOINING = "JOINING"
    ONLINE = "ONLINE"
    DRAINING = "DRAINING"
    OFFLINE = "OFFLINE"


def node_id_of(public_key: bytes) -> str:
    """A node's id: the first 20 bytes of sha256(public key), hex."""
    return hashlib.sha256(public_key).digest()[:20].hex()


@dataclass(frozen=True)
class PeerRecord:
    node_id: str
    addresses: tuple[str, ...]
    model_id: str
    config_hash: str
    num_layers: int
    start: int
    end: int
    dtype: str = "float32"
    device: str = "cpu"
    quant: str = "none"              # weight quantisation: none | int8 | nf4 (older records: none)
    numerics: str = "exact"          # exact | fast: llama.cpp's numerics (docs/performance.md); older records: exact
    throughput: float = 0.0          # decode tokens/s through the whole span, measured by the node
    prefill_throughput: float = 0.0  # prefill tokens/s through the whole span
    free_cache_tokens: int = 0
    max_length: int = 0
    load: float = 0.0                # open sessions
    state: NodeState = NodeState.ONLINE
    name: str = ""
    issued_at: float = 0.0
    expires_at: float = 0.0
    seq: int = 0                     # grows with every re-announcement; the newest wins
    started_at: float = 0.0          # when the node process started (uptime); 0 = unknown
    adapters: tuple[str, ...] = ()   # LoRA adapters the node serves, by name (older records: none)
    relay_slots: int = 0             # > 0: volunteers as a relay for this many nodes (docs/relay.md); older: 0
    relay_via: str = ""              # relayed node: the node id of the relay its address goes through
    weights: str = ""                # the model's weights fingerprint (common/weights/fingerprint.py); "" = unknown
    protocol_version: int = PROTOCOL_VERSION

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def short_id(self) -> str:
        return self.node_id[:8]

    def to_payload(self) -> dict:
        data = asdict(self)
        data["state"] = self.state.value
        data["addresses"] = list(self.addresses)
        data["adapters"] = list(self.adapters)
        return data


_SCHEMA: dict[str, tuple[type, ...]] = {
    "node_id": (str,), "addresses": (list, tuple), "model_id": (str,), "config_hash": (str,),
    "num_layers": (int,), "start": (int,), "end": (int,), "dtype": (str,), "device": (str,), "quant": (str,),
    "numerics": (str,),
    "adapters": (list, tuple),
    "throughput": (int, float), "prefill_throughput": (int, float), "free_cache_tokens": (int,),
    "max_length": (int,), "load": (int, float), "state": (str,), "name": (str,), "issued_at": (int, float),
    "expires_at": (int, float), "seq": (int,), "protocol_version": (int,), "started_at": (int, float),
    "relay_slots": (int,), "relay_via": (str,), "weights": (str,),
}
_REQUIRED = ("node_id", "addresses", "model_id", "config_hash", "num_layers", "start", "end", "issued_at",
             "expires_at", "seq", "protocol_version", "state")


@dataclass(frozen=True)
class SignedRecord:
    """The form records travel in (and are stored in, to pass on unchanged)."""

    payload: bytes
    public_key: bytes
    signature: bytes


def sign_record(record: PeerRecord, key: Ed25519PrivateKey) -> SignedRecord:
    payload = msgpack.packb(record.to_payload(), use_bin_type=True)
    public = key.public_key().public_bytes_raw()
    if node_id_of(public) != record.node_id:
        raise ValueError("the record's node_id is not this key's")
    return SignedRecord(payload=payload, public_key=public, signature=key.sign(payload))


def open_signed(signed: SignedRecord, max_bytes: int, kind: str = "record", error: type = RecordError) -> dict:
    """The msgpack map inside a signed envelope (a record, a strike): signed, at most `max_bytes`, the
    signature made by `signed.public_key`, a map of this protocol version; `error` says why not."""
    if not signed.signature or not signed.public_key:
        raise error(f"unsigned {kind}")
    if len(signed.payload) > max_bytes:
        raise error(f"{kind} of {len(signed.payload)} bytes exceeds {max_bytes}")
    try:
        Ed25519PublicKey.from_public_bytes(signed.public_key).verify(signed.signature, signed.payload)
    except (InvalidSignature, ValueError):
        raise error(f"forged {kind}: the signature does not match") from None
    try:
        data = msgpack.unpackb(signed.payload, raw=False, strict_map_key=True)
    except Exception as failure:  # msgpack raises several unrelated types on garbage
        raise error(f"malformed {kind}: {failure}") from None
    if not isinstance(data, dict):
        raise error(f"malformed {kind}: not a map")
    version = data.get("protocol_version")
    if version != PROTOCOL_VERSION:
        raise error(f"{kind} speaks protocol version {version}, this node speaks {PROTOCOL_VERSION}")
    return data


def _validate(data: dict) -> PeerRecord:
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise RecordError(f"malformed record: missing {', '.join(missing)}")
    known = {}
    for name, types in _SCHEMA.items():
        if name not in data:
            continue
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise RecordError(f"malformed record: {name} has type {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"malformed record: {name} is not finite")
        known[name] = value  # unknown fields are ignored
    addresses = tuple(known["addresses"])
    if not addresses or not all(isinstance(a, str) and 0 < len(a) <= 255 for a in addresses) or len(addresses) > 8:
        raise RecordError("malformed record: addresses must be 1..8 non-empty strings")
    known["addresses"] = addresses
    adapters = tuple(known.get("adapters", ()))
    if len(adapters) > MAX_ADAPTERS or not all(isinstance(a, str) and 0 < len(a) <= 64 for a in adapters):
        raise RecordError(f"malformed record: adapters must be at most {MAX_ADAPTERS} names of 1..64 characters")
    known["adapters"] = adapters
    if len(known.get("relay_via", "")) > 64:
        raise RecordError("malformed record: relay_via is longer than a node id")
    if len(known.get("weights", "")) > 64:
        raise RecordError("malformed record: weights is longer than a fingerprint")
    if not 0 <= known["start"] < known["end"] <= known["num_layers"]:
        raise RecordError(f"malformed record: span {known['start']}:{known['end']} of {known['num_layers']} layers")
    try:
        known["state"] = NodeState(known["state"])
    except ValueError:
        raise RecordError(f"malformed record: unknown state {known['state']!r}") from None
    for name in ("throughput", "prefill_throughput", "load", "free_cache_tokens", "max_length", "seq",
                 "relay_slots"):
        if name in known and known[name] < 0:
            raise RecordError(f"malformed record: {name} is negative")
    return PeerRecord(**known)


def verify_record(signed: SignedRecord, now: float | None = None) -> PeerRecord:
    """The record inside `signed`, or RecordError saying why it must be dropped."""
    now = time.time() if now is None else now
    record = _validate(open_signed(signed, MAX_PAYLOAD_BYTES))
    if record.node_id != node_id_of(signed.public_key):
        raise RecordError("forged record: node_id does not belong to the signing key")
    if record.expires_at <= now:
        raise RecordError(f"expired record from {record.short_id} ({now - record.expires_at:.1f}s ago)")
    if record.issued_at > now + MAX_CLOCK_SKEW or record.expires_at - record.issued_at > MAX_TTL:
        raise RecordError(f"record from {record.short_id} has implausible times (issued in the future or TTL too long)")
    return record


def renewed(record: PeerRecord, ttl: float, now: float | None = None, **changes) -> PeerRecord:
    """The next announcement of `record`: a higher seq, fresh times, and any changed fields."""
    now = time.time() if now is None else now
    # seq follows the clock (ms) so a restarted node's records outrank those of its previous run
    return replace(record, issued_at=now, expires_at=now + ttl, seq=max(record.seq + 1, int(now * 1000)), **changes)


class CapError(RecordError):
    """A valid record refused because a registry cap is reached (common/swarm/records.py Limits)."""


@dataclass(frozen=True)
class Limits:
    """What a registry holds at most: strangers' records must not grow a node's state without bound."""

    per_model: int = 16384   # records of one config hash
    total: int = 32768       # records of all models
    pending: int = 512       # records not yet proven (their address has not answered with their node id)
    per_source: int = 120    # new identities one source (the gRPC peer host that pushed them) may add per minute
    max_ttl: float = MAX_TTL  # a record's lifetime is cut to this (honest nodes use less)


def _listed_as(record: PeerRecord) -> tuple:
    """What a list of peers to call keys on: a renewal that keeps these leaves such a list as it was."""
    return record.config_hash, record.addresses[:1], record.state == NodeState.OFFLINE


@dataclass
class Registry:
    """Records by node id; the newest (highest seq) of each node wins; OFFLINE ones are tombstones.

    Bounded (`limits`): a new identity past a cap is refused (CapError), TTLs are cut to `limits.max_ttl`.
    `proven` holds the node ids whose advertised address answered with their id: only those are passed
    on and routed through."""

    records: dict[str, tuple[PeerRecord, SignedRecord]] = field(default_factory=dict)
    rejected: int = 0
    limits: Limits = field(default_factory=Limits)
    proven: set[str] = field(default_factory=set)
    refused: int = 0   # valid records refused for a cap
    version: int = 0   # grows with every change (caches of digests key on it)
    members: int = 0   # grows when who is listed may have changed (caches of peer lists key on it): a renewal
    #                    that keeps a node's model, first address and state leaves it as it is
    _soonest: float = -math.inf  # no held record expires before this (a lower bound: `expire` scans past it)
    _models: dict[str, int] = field(default_factory=dict)  # config hash -> records held
    _sources: dict[str, list[float]] = field(default_factory=dict)  # source -> when it added new identities

    def _verify(self, signed: SignedRecord, now: float | None) -> PeerRecord:
        return verify_record(signed, now)

    def offer(self, signed: SignedRecord, now: float | None = None, source: str | None = None,
              asked: bool = False) -> bool:
        """Verify and keep `signed` if it is newer than what we have; True if it changed the registry.
        `source`: who pushed it to us (None: we pulled it), for the per-source limit on new identities;
        `asked`: we asked `source` for it and counted it then (`reserve`), so it is not counted again."""
        now = time.time() if now is None else now
        held = self.records.get(node_id_of(signed.public_key)) if signed.public_key else None
        if held is not None and held[1] == signed and held[0].expires_at > now:
            return False  # the very bytes we already verified: no need to check the signature again
        try:
            record = self._verify(signed, now)
        except RecordError:
            self.rejected += 1
            raise
        if record.expires_at - record.issued_at > self.limits.max_ttl:
            record = replace(record, expires_at=record.issued_at + self.limits.max_ttl)
            if record.expires_at <= now:
                self.rejected += 1
                raise RecordError(f"record from {record.short_id} outlived the TTL cap of {self.limits.max_ttl:g}s")
        held = self.records.get(record.node_id)
        if held is not None and held[0].seq >= record.seq:
            return False
        if held is None:
            self._admit(record, now, None if asked else source)
            self.members += 1
        else:
            self._count(held[0].config_hash, -1)
            if held[0].addresses[:1] != record.addresses[:1]:
                self.proven.discard(record.node_id)  # a new address must answer for the node again
            if _listed_as(held[0]) != _listed_as(record):
                self.members += 1
        self._count(record.config_hash, 1)
        self.records[record.node_id] = (record, signed)
        self._soonest = min(self._soonest, record.expires_at)
        self.version += 1
        return True

    def _admit(self, record: PeerRecord, now: float, source: str | None) -> None:
        """A new identity: refused (CapError) past a cap."""
        limits = self.limits
        if len(self.records) >= limits.total or self._models.get(record.config_hash, 0) >= limits.per_model \
                or len(self.records) - len(self.proven) >= limits.pending:
            self.expire(now)
        problem = None
        if len(self.records) >= limits.total:
            problem = f"the registry holds its cap of {limits.total} records"
        elif self._models.get(record.config_hash, 0) >= limits.per_model:
            problem = f"the registry holds its cap of {limits.per_model} records for model {record.config_hash[:12]}"
        elif len(self.records) - len(self.proven) >= limits.pending:
            problem = f"the registry holds its cap of {limits.pending} unproven records"
        elif source is not None:
            times = [t for t in self._sources.get(source, ()) if t > now - 60.0]
            if len(times) >= limits.per_source:
                problem = f"{source} announced more than {limits.per_source} new nodes in a minute"
            else:
                times.append(now)
            self._sources[source] = times
            if len(self._sources) > 4 * limits.pending:  # forget quiet sources
                self._sources = {s: t for s, t in self._sources.items() if t and t[-1] > now - 60.0}
        if problem is not None:
            self.refused += 1
            raise CapError(f"record from {record.short_id} refused: {problem}")

    def _count(self, model: str, delta: int) -> None:
        left = self._models.get(model, 0) + delta
        if left > 0:
            self._models[model] = left
        else:
            self._models.pop(model, None)

    def prove(self, node_id: str) -> bool:
        """Mark `node_id` proven (its address answered with its id); False if we hold no record of it."""
        if node_id not in self.records or node_id in self.proven:
            return False
        self.proven.add(node_id)
        self.version += 1
        self.members += 1
        return True

    def is_proven(self, node_id: str) -> bool:
        return node_id in self.proven

    def source_room(self, source: str | None, now: float | None = None) -> int:
        """How many more new identities `source` may push now (`limits.per_source` a minute); None (records we
        pull, never counted against a source): the whole minute's allowance."""
        if source is None:
            return self.limits.per_source
        now = time.time() if now is None else now
        return max(0, self.limits.per_source - sum(1 for t in self._sources.get(source, ()) if t > now - 60.0))

    def reserve(self, source: str, count: int, now: float | None = None) -> None:
        """Count `count` new identities against `source`'s minute now: we asked it for them, and their push,
        offered `asked`, then cannot be refused for pushes of its own that arrived in between."""
        now = time.time() if now is None else now
        times = [t for t in self._sources.get(source, ()) if t > now - 60.0]
        self._sources[source] = times + [now] * count

    def pending_room(self, now: float | None = None) -> int:
        """How many more unproven identities the registry takes now (`limits.pending` less those it holds)."""
        if len(self.records) - len(self.proven) >= self.limits.pending:
            self.expire(time.time() if now is None else now)
        return max(0, self.limits.pending - (len(self.records) - len(self.proven)))

    def offer_many(self, batch, now: float | None = None, source: str | None = None) -> tuple[int, list[str]]:
        """Offer each record; returns (number accepted as new, reasons for the ones dropped)."""
        accepted, problems = 0, []
        for signed in batch:
            try:
                accepted += self.offer(signed, now, source)
            except RecordError as error:
                problems.append(str(error))
        return accepted, problems

    def expire(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        if now < self._soonest:  # nothing can have expired yet: no scan (a node calls this every round)
            return []
        gone = [node_id for node_id, (record, _) in self.records.items() if record.expires_at <= now]
        self._soonest = min((record.expires_at for record, _ in self.records.values() if record.expires_at > now),
                            default=math.inf)
        for node_id in gone:
            self._count(self.records.pop(node_id)[0].config_hash, -1)
            self.proven.discard(node_id)
        if gone:
            self.version += 1
            self.members += 1
        return gone

    def live(self, now: float | None = None, model: str | None = None, proven: bool = False) -> list[PeerRecord]:
        """Unexpired records that are not OFFLINE (of one config hash, if given; only proven ones, if asked),
        ordered by node id."""
        now = time.time() if now is None else now
        out = [
            record
            for record, _ in self.records.values()
            if record.expires_at > now and record.state != NodeState.OFFLINE
            and (model is None or record.config_hash == model) and (not proven or record.node_id in self.proven)
        ]
        return sorted(out, key=lambda r: r.node_id)

    def signed(self, now: float | None = None, model: str | None = None,
               proven: bool = False) -> list[SignedRecord]:
        now = time.time() if now is None else now
        return [signed for record, signed in self.records.values() if record.expires_at > now
                and (model is None or record.config_hash == model) and (not proven or record.node_id in self.proven)]
