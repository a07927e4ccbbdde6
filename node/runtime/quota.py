"""Whose quota a request counts against: a caller's key, and the ceiling of its address.

A caller is its address ("203.0.113.7"), or, when its request proves a client identity (common/wire/caller.py),
that identity at that address ("203.0.113.7#<node id>"). The per-peer limits a node is given (`--rate-limit`,
`--max-peer-sessions`, `--max-peer-tokens`) are each address's ceiling: what all callers from one address hold
together, whatever identities they show, so fresh identities cannot multiply it. An anonymous caller may use all of
its address's; an identity at most IDENTITY_SHARE of it, so two honest clients behind one NAT each keep their own
share however much the other takes."""

from __future__ import annotations

IDENTITY_SHARE = 0.5  # of its address's ceiling, what one identity from that address may hold


def caller_key(host: str, identity: str = "") -> str:
    """The quota key of a caller at `host` (its address), proving `identity` ("" for none)."""
    return f"{host}#{identity}" if identity else host


def address_of(key: str) -> str:
    """The address a quota key belongs to."""
    return key.partition("#")[0]


def limit_of(key: str, ceiling: float) -> float:
    """What the caller `key` may hold of its address's `ceiling`."""
    return ceiling * IDENTITY_SHARE if "#" in key else ceiling
