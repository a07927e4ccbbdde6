"""Per-peer rate limits: a token bucket for each calling address (`potluck join --rate-limit`), and one for each
client identity at that address (node/runtime/quota.py: an identity may use half its address's rate; all of an
address's callers together, its whole rate).

Every request costs one token: a unary call (Info, Forward, Push, Gossip), an `open` or a `step` on an
Inference stream. A pushed step is charged to the client that opened the session, not to the node that
handed it over, so a chain's first hop does not use up the next hop's allowance. A refused call gets
RESOURCE_EXHAUSTED; a refused `step` only its own refusal (the servicer answers it, the session lives on)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from node.runtime.errors import Exhausted
from node.runtime.quota import IDENTITY_SHARE, address_of


class RateLimited(Exhausted):
    """A request over its peer's rate limit; `retry_after`: seconds until the peer's bucket holds a token again."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


MAX_PEERS = 4096  # buckets kept (least recently seen dropped first: a dropped peer starts with a full bucket)


def peer_host(peer: str) -> str:
    """grpc's `context.peer()` ("ipv4:127.0.0.1:5123", "ipv6:[::1]:5123") -> the address without its port."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return peer  # unix sockets and the like: the whole string
    host = rest.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class RateLimiter:
    """`rate` requests a second per peer, in bursts of up to `burst` (default: two seconds' worth)."""

    def __init__(self, rate: float, burst: float | None = None, max_peers: int = MAX_PEERS,
                 clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)
        self.max_peers = max_peers
        self.clock = clock
        self.refused = 0  # requests refused so far (for tests and logs)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # host -> (tokens, last refill)
        self._identities: OrderedDict[str, tuple[float, float]] = OrderedDict()  # host#identity -> the same

    def charge(self, key: str, what: str = "request") -> None:
        """Take one token from the bucket of the caller `key` (an address, or an identity at an address:
        node/runtime/quota.py) and one from its address's; RateLimited (RESOURCE_EXHAUSTED) if either has none."""
        now = self.clock()
        host = address_of(key)
        tokens, last = self._buckets.pop(host, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        own = None
        if key != host:  # an identity's own bucket, inside its address's
            rate, burst = self.rate * IDENTITY_SHARE, max(1.0, self.burst * IDENTITY_SHARE)
            own, stamp = self._identities.pop(key, (burst, now))
            own = min(burst, own + (now - stamp) * rate)
        if tokens < 1 or (own is not None and own < 1):
            self._buckets[host] = (tokens, now)
            if own is not None:
                self._identities[key] = (own, now)
            self.refused += 1
            wait = max((1 - tokens) / self.rate, 0.0 if own is None else (1 - own) / (self.rate * IDENTITY_SHARE))
            who = host if tokens < 1 else f"this identity at {host}"
            raise RateLimited(f"{what} refused: {who} is over this node's rate limit of {self.rate:g} requests/s "
                              f"(--rate-limit) per address, {IDENTITY_SHARE:g} of it per identity; slow down", wait)
        self._buckets[host] = (tokens - 1, now)  # most recently seen last
        if own is not None:
            self._identities[key] = (own - 1, now)
        for buckets in (self._buckets, self._identities):
            while len(buckets) > self.max_peers:
                buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
