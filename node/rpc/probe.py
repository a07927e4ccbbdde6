"""Probe: a node checks, for `potluck doctor`, whether an address answers the standard gRPC health check.

A probe can be asked for by anyone who can call the node, so it must not make the node a scanner: the
address must be HOST:PORT, the only call made is `grpc.health.v1.Health/Check` with a short deadline,
each caller gets one probe a second, a few run at once, and the target passes the node's dial policy
(node/rpc/dialing.py: resolved, every alternate spelling caught, dialed as resolved). In a public swarm that
refuses loopback, private, link-local and special addresses for every caller (a caller that reaches the node
through a relay looks local); in a lab swarm loopback and link-local targets are still probed only for
callers on the same machine (the node's own services are not for outsiders to map). A refusal and a failed
probe say nothing of the node's network: a fixed message, or the status name and a fixed description."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.wire.security import PLAINTEXT, Security
from node.rpc.checks import check_address
from node.rpc.dialing import DialPolicy, DialRefused, name_options
from node.rpc.ratelimit import RateLimiter
from node.runtime.errors import Exhausted

PROBE_TIMEOUT = 3.0      # seconds the health check may take
PROBE_RATE = 1.0         # probes per second per caller (bursts of one)
MAX_CONCURRENT = 4       # probes in flight at once on one node
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 4096), ("grpc.enable_retries", 0)]


FAILURES = {  # what a failed probe is told, by status: never the transport's own text
    "UNAVAILABLE": "nothing answered there (no listener, a firewall, or not gRPC)",
    "DEADLINE_EXCEEDED": "no answer in time",
    "UNAUTHENTICATED": "it refused this node's call",
    "PERMISSION_DENIED": "it refused this node's call",
}


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip  # ::ffff:127.0.0.1 is 127.0.0.1


def _is_local(ip) -> bool:
    """This machine's own networks: loopback, link-local or unspecified."""
    return ip is not None and (ip.is_loopback or ip.is_link_local or ip.is_unspecified)


async def check_probe_target(address: str, caller: str, policy: DialPolicy = DialPolicy()) -> str:
    """The address to dial for a probe of `address` asked by `caller` (an address without port), or
    InvalidRequest: HOST:PORT that the dial policy allows; the node's own loopback and link-local networks only
    in a lab swarm, and only for callers on this machine."""
    check_address(address, "address")
    dialed = await policy.resolve(address)
    if _is_local(_ip(dialed.rpartition(":")[0].strip("[]"))) and not (policy.local and _is_local(_ip(caller))):
        raise DialRefused()
    return dialed


@dataclass
class Prober:
    """Runs probes through the node's own Security (its TLS and swarm key), within the limits above."""

    security: Security = PLAINTEXT
    policy: DialPolicy = field(default_factory=DialPolicy)  # start_node: the node's own (tests: a lab swarm)
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(PROBE_RATE, burst=1.0))
    timeout: float = PROBE_TIMEOUT
    running: int = 0  # probes in flight

    async def probe(self, address: str, caller: str) -> tuple[bool, str]:
        """(reachable, detail) for `address`; InvalidRequest or Exhausted (the caller's fault) before dialing."""
        check_address(address, "address")
        self.limiter.charge(caller, "Probe")
        if self.running >= MAX_CONCURRENT:
            raise Exhausted(f"this node is already running {MAX_CONCURRENT} probes; try again in a few seconds")
        self.running += 1
        try:
            dialed = await check_probe_target(address, caller, self.policy)
            return await asyncio.wait_for(self._check(address, dialed), self.timeout + 1.0)
        except asyncio.TimeoutError:
            return False, f"no answer within {self.timeout:.0f}s"
        finally:
            self.running -= 1

    async def _check(self, address: str, dialed: str) -> tuple[bool, str]:
        security = replace(self.security, _pins={})  # auto TLS: never pin what a probed address presents
        await security.prefetch(dialed)
        channel = security.channel(dialed, options=CHANNEL_OPTIONS + name_options(address, dialed, security))
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                    timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False, "it answers gRPC but serves no health service (not a Potluck node?)"
            return False, f"{error.code().name}: {FAILURES.get(error.code().name, 'the health check failed')}"
        finally:
            await channel.close()
        return True, "health: " + health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
