"""`potluck swarm-key new FILE`: a private swarm's key (docs/reliability.md)."""

from __future__ import annotations

import argparse

from common.wire.security import SwarmKey
from node.cli.args import add_logging
from node.config import ConfigError


def add_swarm_key_parser(commands) -> None:
    keys = commands.add_parser("swarm-key", help="make a private swarm's key")
    keys.add_argument("action", choices=["new"], help="new: write a fresh random key")
    keys.add_argument("file", help="where to write it (must not exist; readable by you only)")
    add_logging(keys)


def run_swarm_key(args: argparse.Namespace) -> None:
    try:
        SwarmKey.generate().write(args.file)
    except FileExistsError:
        raise ConfigError(f"{args.file} exists already; choose another file (keys are never overwritten)") from None
    print(f"wrote a new swarm key to {args.file}: give it to every node and client of the swarm (--swarm-key)")
