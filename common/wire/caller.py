"""A caller's identity on the wire: which client (not only which address) a request comes from.

A client may add `potluck-caller: <public key hex>.<unix seconds>.<signature hex>` to its calls' metadata: its
ed25519 key's signature over CALLER_CONTEXT and the stamp. A node keys its per-peer quotas by the identity this
proves (node/runtime/quota.py), so honest clients behind one NAT address each get their own share; without it (or
with one that does not verify, or is stale) the caller is its address. Identities are free: a node also caps what
all identities from one address hold together, so fresh keys cannot multiply an address's quota."""

from __future__ import annotations

import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.swarm.records import node_id_of

CALLER_METADATA = "potluck-caller"
CALLER_CONTEXT = b"potluck-caller:"
CALLER_WINDOW = 120.0  # seconds a stamp stays valid
CALLER_FUTURE = 30.0   # seconds a stamp may be ahead of the node's clock


def caller_token(key: Ed25519PrivateKey, now: float | None = None) -> str:
    """The metadata value that proves `key`'s identity now."""
    stamp = str(int(time.time() if now is None else now))
    public = key.public_key().public_bytes_raw().hex()
    return f"{public}.{stamp}.{key.sign(CALLER_CONTEXT + stamp.encode()).hex()}"


def caller_identity(value: str | None, now: float | None = None) -> str:
    """The identity (node id form) a `potluck-caller` value proves, or "" if it proves none."""
    if not value or len(value) > 256:
        return ""
    public_hex, _, rest = value.partition(".")
    stamp, _, signature_hex = rest.partition(".")
    if not stamp.isdigit() or len(stamp) > 12:
        return ""
    age = (time.time() if now is None else now) - int(stamp)
    if not -CALLER_FUTURE <= age <= CALLER_WINDOW:
        return ""
    try:
        public = bytes.fromhex(public_hex)
        Ed25519PublicKey.from_public_bytes(public).verify(bytes.fromhex(signature_hex), CALLER_CONTEXT + stamp.encode())
    except (ValueError, InvalidSignature):
        return ""
    return node_id_of(public)


def identity_of(metadata) -> str:
    """The identity a call's invocation metadata proves ("" for none)."""
    for key, value in metadata or ():
        if key == CALLER_METADATA:
            return caller_identity(value if isinstance(value, str) else None)
    return ""
