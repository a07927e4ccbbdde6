"""`potluck status`: the swarm as a table (or JSON): nodes, spans, coverage, warnings; exit 1 while a layer is
missing."""

from __future__ import annotations

import argparse
import asyncio
import json

from node.cli.args import (
    add_logging,
    add_swarm_args,
    add_trust_args,
    bootstrap_list,
    discovery_options,
    trust_options,
)
from node.config import ConfigError


def add_status_parser(commands) -> None:
    status = commands.add_parser("status", help="show the swarm: nodes, spans, coverage, warnings")
    add_swarm_args(status)
    add_trust_args(status)
    status.add_argument("--wait", type=float, default=2.0, help="at most this many seconds to listen for nodes; "
                        "stops as soon as every model's layers are served and the known nodes know no others "
                        "(default 2)")
    status.add_argument("--json", action="store_true", help="print the swarm as JSON")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                        help="redraw the table every SECONDS (default 2) until Ctrl-C")
    add_logging(status)


async def _views(config, wait: float, security, dht=None) -> list:
    """The swarm's models and nodes, with each node's memory from its Info (docs/memory.md)."""
    from client.status import ask_memory, collect, group_by_model

    views = group_by_model(await collect(config, wait, security, dht))
    await ask_memory(views, security)
    return views


def run_status(args: argparse.Namespace) -> None:
    from client.config import ClientConfig
    from client.status import as_json, render, status_console, watch
    from common.swarm.membership import SwarmConfig
    from common.wire.security import load_security

    bootstrap = bootstrap_list(args.bootstrap)
    dht = None
    if args.discovery == "dht" or (args.discovery == "auto" and args.initial_peers):
        dht = ClientConfig(mdns=False, **discovery_options(args)).dht_config()
    if args.no_mdns and not bootstrap and dht is None:
        raise ConfigError("--no-mdns needs at least one --bootstrap address (or DHT --initial-peers)")
    config = SwarmConfig(bootstrap=bootstrap, mdns=not args.no_mdns, mdns_interface=args.mdns_interface)
    security = load_security(**trust_options(args))
    if args.watch is not None:
        if args.json:
            raise ConfigError("--watch redraws a table: it does not go with --json")
        if args.watch <= 0:
            raise ConfigError("--watch takes a positive number of seconds")
        try:
            asyncio.run(watch(config, args.wait, args.watch, status_console(), security, dht))
        except KeyboardInterrupt:
            pass
        return
    views = asyncio.run(_views(config, args.wait, security, dht))
    if args.json:
        print(json.dumps(as_json(views), indent=1))
    else:
        render(views, status_console())
    if not views or any(view.missing() for view in views):
        raise SystemExit(1)
