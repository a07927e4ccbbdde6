"""Where a node may dial on someone else's behalf: one policy for push targets, probes and relays.

A step's push list, a Probe request and a gossiped record all name addresses that a stranger chose. The node
dials them with its own key and TLS, from inside its own network, so each one passes `DialPolicy.resolve`
first: the name is resolved (every address it has, alternate spellings such as `127.1`, `2130706433`,
`0x7f000001` or `0177.0.0.1` included, as the system resolver reads them), and the node refuses the whole
name if any of its addresses is one it must not dial. It then dials the resolved address itself, so a name
that resolves differently a moment later (DNS rebinding) changes nothing.

- A public swarm (the default for a node whose own address or bootstrap nodes are public, or
  `potluck join --public-swarm`) dials only global unicast addresses: never loopback, private (RFC 1918,
  ULA, CGNAT), link-local, unspecified, multicast or reserved ones, nor IPv6 forms that embed them.
- A lab swarm (a node whose own address and bootstrap nodes are all loopback or private, or
  `--local-swarm`) also dials loopback, private and link-local addresses: that is where its peers are.
  Unspecified, multicast and reserved addresses are refused there too.

What a refused caller is told is fixed (`REFUSED`): it names no resolved address and no reason the caller
could map the node's network with."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from node.runtime.errors import InvalidRequest

RESOLVE_TIMEOUT = 2.0  # seconds a name may take to resolve before it is refused
REFUSED = "address refused: this node dials only swarm members at addresses it may reach on a caller's behalf"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class DialRefused(InvalidRequest):
    """An address the node will not dial for a caller (INVALID_ARGUMENT, with the fixed message)."""

    def __init__(self) -> None:
        super().__init__(REFUSED)


def split(address: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT -> (host without brackets, port); DialRefused if it is neither."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DialRefused()
    return host, int(port)


def canonical(address: str) -> str:
    """One spelling per address, to compare a push target with the addresses records give: a literal IP in its
    standard form, a name in lower case without a trailing dot. Alternate IPv4 spellings are not literals here,
    so they match no record."""
    try:
        host, port = split(address)
    except DialRefused:
        return address
    try:
        ip = ipaddress.ip_address(host)
        return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    except ValueError:
        return f"{host.lower().rstrip('.')}:{port}"


def _embedded(ip: Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address stands for (mapped, 6to4, Teredo, NAT64)."""
    if ip.version == 4:
        return []
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found += list(ip.teredo)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def allowed(ip: Address, local: bool) -> bool:
    """Whether a node may dial `ip` for a caller: global unicast, or (`local`, a lab swarm) also loopback,
    private and link-local ones; never unspecified, multicast or reserved."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return False
    if ip.version == 6 and (ip.scope_id or ip.sixtofour or ip.teredo or ip in _NAT64):
        # what these reach depends on routes and relays: lab swarms use plain addresses, public ones too
        return local and all(allowed(inner, local) for inner in _embedded(ip))
    if ip.is_global:
        return True
    return local and (ip.is_loopback or ip.is_private or ip.is_link_local or ip in _SHARED)


_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: neither global nor private to Python


def is_lab_host(host: str) -> bool:
    """A host that only a lab swarm would advertise: loopback, private or link-local (a literal, or localhost)."""
    host = host.strip("[]").lower().rstrip(".")
    if host in ("localhost", "localhost.localdomain") or host.endswith(".local"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_unspecified or ip in _SHARED


def lab_swarm(own_address: str, bootstrap: Iterable[str], scope: str = "auto") -> bool:
    """`scope` "local" or "public" as given (--local-swarm, --public-swarm); "auto": a lab swarm when this node's
    own address and every bootstrap node's are loopback or private (a node that joins through a public node is in
    a public swarm, even behind a NAT)."""
    if scope != "auto":
        return scope == "local"
    return all(is_lab_host(address.rpartition(":")[0]) for address in (own_address, *bootstrap))


@dataclass(frozen=True)
class DialPolicy:
    """Resolves and vets an address a caller asks this node to dial."""

    local: bool = True                 # a lab swarm: loopback and private addresses may be dialed too
    timeout: float = RESOLVE_TIMEOUT   # seconds a name may take to resolve

    async def resolve(self, address: str) -> str:
        """HOST:PORT to dial for `address` (its first resolved address), or DialRefused."""
        host, port = split(address)
        loop = asyncio.get_running_loop()
        try:
            found = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.timeout)
            ips = [ipaddress.ip_address(info[4][0]) for info in found]
        except (OSError, ValueError, UnicodeError, asyncio.TimeoutError):
            raise DialRefused() from None
        if not ips or not all(allowed(ip, self.local) for ip in ips):
            raise DialRefused()
        first = ips[0]
        return f"[{first}]:{port}" if first.version == 6 else f"{first}:{port}"


def name_options(address: str, dialed: str, security) -> list[tuple[str, str]]:
    """Channel options that keep a TLS certificate checked for the name the caller gave when the node dials the
    resolved address instead (tls "ca" without a fixed server name; "auto" checks a fixed name anyway)."""
    host = split(address)[0]
    if address == dialed or security.tls != "ca" or security.server_name:
        return []
    try:
        ipaddress.ip_address(host)
        return []
    except ValueError:
        return [("grpc.ssl_target_name_override", host)]


def members_of(membership) -> Callable[[str], bool]:
    """Whether an address is one a live record of `membership`'s registry gives (a swarm member's)."""

    def known(address: str) -> bool:
        want = canonical(address)
        return any(canonical(given) == want for record in membership.live() for given in record.addresses)

    return known
