"""Probe: a node checks, for `potluck doctor`, whether an address answers the standard gRPC health check.

A probe can be asked for by anyone who can call the node, so it must not make the node a scanner: the
address must be HOST:PORT, the only call made is `grpc.health.v1.Health/Check` with a short deadline,
each caller gets one probe a second, a few run at once, and loopback or link-local targets are probed
only for callers on the same machine (the node's own services are not for outsiders to map)."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.wire.security import PLAINTEXT, Security
from node.rpc.checks import MAX_DETAILS_CHARS, check_address
from node.rpc.ratelimit import RateLimiter
from node.runtime.errors import Exhausted, InvalidRequest

PROBE_TIMEOUT = 3.0      # seconds the health check may take
PROBE_RATE = 1.0         # probes per second per caller (bursts of one)
MAX_CONCURRENT = 4       # probes in flight at once on one node
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 4096), ("grpc.enable_retries", 0)]


def _is_local(host: str) -> bool:
    """Loopback, link-local or unspecified (a literal address; names other than localhost count as remote)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None) is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_loopback or ip.is_link_local or ip.is_unspecified


def check_probe_target(address: str, caller: str) -> None:
    """InvalidRequest unless `address` is HOST:PORT that `caller` (an address without port) may have probed."""
    check_address(address, "address")
    host = address.rpartition(":")[0].strip("[]")
    if _is_local(host) and not _is_local(caller):
        raise InvalidRequest(f"address {address!r} is this node's own loopback or link-local network; "
                             "give the address other machines dial")


@dataclass
class Prober:
    """Runs probes through the node's own Security (its TLS and swarm key), within the limits above."""

    security: Security = PLAINTEXT
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(PROBE_RATE, burst=1.0))
    timeout: float = PROBE_TIMEOUT
    running: int = 0  # probes in flight

    async def probe(self, address: str, caller: str) -> tuple[bool, str]:
        """(reachable, detail) for `address`; InvalidRequest or Exhausted (the caller's fault) before dialing."""
        check_probe_target(address, caller)
        self.limiter.charge(caller, "Probe")
        if self.running >= MAX_CONCURRENT:
            raise Exhausted(f"this node is already running {MAX_CONCURRENT} probes; try again in a few seconds")
        self.running += 1
        try:
            return await asyncio.wait_for(self._check(address), self.timeout + 1.0)
        except asyncio.TimeoutError:
            return False, f"no answer within {self.timeout:.0f}s"
        finally:
            self.running -= 1

    async def _check(self, address: str) -> tuple[bool, str]:
        security = replace(self.security, _pins={})  # auto TLS: never pin what a probed address presents
        await security.prefetch(address)
        channel = security.channel(address, options=CHANNEL_OPTIONS)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                    timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False, "it answers gRPC but serves no health service (not a Potluck node?)"
            return False, f"{error.code().name}: {error.details() or error.code().name}"[:MAX_DETAILS_CHARS]
        finally:
            await channel.close()
        return True, "health: " + health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
