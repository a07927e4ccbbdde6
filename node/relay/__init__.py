"""Relays: nodes that cannot be reached serve through a reachable peer (docs/relay.md).

relay.py   the relay's side: rpc Attach, a TCP port per attached node, limits
link.py    the relayed node's side: one outbound Attach stream, connections to its own port
join.py    on joining: am I reachable (Probe)? if not, which relay; stay attached, re-attach on loss
"""
