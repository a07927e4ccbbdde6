"""LAN discovery with zeroconf: announce `_potluck._tcp.local.` and browse for others.

mDNS carries only where a node is (address, port, node id); the signed records are then
pulled from it over gRPC, so zeroconf and gossip feed the same registry. A node of a private swarm
announces its swarm's tag instead of its id and model, and nodes only contact services of their own
swarm (the public swarm's have no tag)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_potluck._tcp.local."


def _zeroconf(interface: str | None) -> AsyncZeroconf:
    if interface:
        version = ipaddress.ip_address(interface).version
        return AsyncZeroconf(interfaces=[interface], ip_version=IPVersion.V4Only if version == 4 else IPVersion.V6Only)
    return AsyncZeroconf()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class MdnsDiscovery:
    """One zeroconf instance: optionally announces this node, and reports every node it sees."""

    def __init__(self, interface: str | None, on_found: Callable[[str, str], None], swarm_tag: str | None = None):
        self.interface = interface
        self.swarm_tag = swarm_tag  # a private swarm's public tag (SwarmKey.tag); None in the public swarm
        self.on_found = on_found  # (node_id, "host:port"), called on the event loop
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._zc = _zeroconf(self.interface)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    async def announce(self, node_id: str, address: str, config_hash: str) -> None:
        """Register this node's service (once; later calls change nothing)."""
        if self._info is not None:
            return
        host, port = _split(address)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"potluck-{node_id[:12]}-{port}.{SERVICE_TYPE}",
            addresses=[socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)],
            port=port,
            properties={"swarm": self.swarm_tag} if self.swarm_tag else {"id": node_id, "model": config_hash},
        )
        await self._zc.async_register_service(self._info, allow_name_change=True)

    def _on_change(self, zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            task = asyncio.ensure_future(self._resolve(service_type, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        tag = (info.properties.get(b"swarm") or b"").decode(errors="replace") or None
        if tag != self.swarm_tag:
            return  # another swarm's node: not ours to gossip with
        node_id = (info.properties.get(b"id") or b"").decode(errors="replace")
        for host in info.parsed_addresses():
            address = f"[{host}]:{info.port}" if ":" in host else f"{host}:{info.port}"
            try:
                self.on_found(node_id, address)
            except Exception:  # a faulty callback must not stop discovery
                log.exception("mDNS discovery callback failed")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._zc is None:
            return
        if self._info is not None:
            try:
                await self._zc.async_unregister_service(self._info)
            except Exception as error:  # shutting down: log and go on
                log.debug("mDNS unregister failed: %s", error)
        if self._browser is not None:
            await self._browser.async_cancel()
        await self._zc.async_close()
        self._zc = None
