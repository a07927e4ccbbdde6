"""Listening ports: a port another process already listens on is refused, in one line, before anything is loaded.

gRPC servers set SO_REUSEPORT by default, so a second node on a taken port would bind it too and share its
connections with the first; nodes turn that off (node/server.py) and check here first, which also spares the
user gRPC's own log line about the failed bind."""

from __future__ import annotations

import errno
import socket


class PortInUseError(OSError):
    """Another process listens on the port; the message names it and what to do."""

    def __init__(self, host: str, port: int, flag: str = "--port"):
        super().__init__(f"port {port} on {host} is in use (another node or program listens there); "
                         f"choose another {flag}, or {flag} 0 for a free one")


def ensure_free(host: str, port: int, flag: str = "--port") -> None:
    """Raise PortInUseError if something listens on host:port (port 0 is always free).

    The check binds a throw-away socket with SO_REUSEADDR, as servers do: that fails only while another
    socket listens there (connections in TIME_WAIT do not count). Other failures (an address not on this
    machine) are left to the real bind to report."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise PortInUseError(host, port, flag) from None
