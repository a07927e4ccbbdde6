"""`potluck status`: the swarm as a table (or JSON): nodes, spans, coverage, warnings; exit 1 while a layer is
missing."""

from __future__ import annotations

import argparse
import asyncio
import json

from rich.console import Console

from client.status import as_json, ask_memory, collect, group_by_model, render
from common.swarm.membership import SwarmConfig
from common.wire.security import load_security
from node.cli.args import add_logging, add_swarm_args, add_trust_args, bootstrap_list, trust_options
from node.config import ConfigError


def add_status_parser(commands) -> None:
    status = commands.add_parser("status", help="show the swarm: nodes, spans, coverage, warnings")
    add_swarm_args(status)
    add_trust_args(status)
    status.add_argument("--wait", type=float, default=2.0, help="seconds to listen for nodes (default 2)")
    status.add_argument("--json", action="store_true", help="print the swarm as JSON")
    add_logging(status)


async def _views(config: SwarmConfig, wait: float, security) -> list:
    """The swarm's models and nodes, with each node's memory from its Info (docs/memory.md)."""
    views = group_by_model(await collect(config, wait, security))
    await ask_memory(views, security)
    return views


def run_status(args: argparse.Namespace) -> None:
    bootstrap = bootstrap_list(args.bootstrap)
    if args.no_mdns and not bootstrap:
        raise ConfigError("--no-mdns needs at least one --bootstrap address")
    config = SwarmConfig(bootstrap=bootstrap, mdns=not args.no_mdns, mdns_interface=args.mdns_interface)
    security = load_security(**trust_options(args))
    views = asyncio.run(_views(config, args.wait, security))
    if args.json:
        print(json.dumps(as_json(views), indent=1))
    else:
        render(views, Console())
    if not views or any(view.missing() for view in views):
        raise SystemExit(1)
