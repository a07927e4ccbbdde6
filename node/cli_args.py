"""Small argparse helpers that node/cli.py and node/join_cli.py share: --log-level, integer types, the swarm
(--bootstrap, mDNS) and trust (--swarm-key, TLS) flags. Other modules import them through node.cli."""

from __future__ import annotations

import argparse
import os

from node.config import ConfigError


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative integer")
    return value


def _add_swarm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", default=[],
                        help="HOST:PORT of a known node, or a file with one per line (repeatable)")
    parser.add_argument("--no-mdns", action="store_true", help="turn LAN discovery (zeroconf) off")
    parser.add_argument("--mdns-interface", default=None, help="address of the interface for mDNS")


def bootstrap_list(values: list[str]) -> tuple[str, ...]:
    """--bootstrap values: addresses, or files holding one address per line (# comments allowed)."""
    from pathlib import Path

    out: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_file():
            lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
            out.extend(line for line in lines if line)
        elif ":" in value:
            out.extend(v.strip() for v in value.split(",") if v.strip())
        else:
            raise ConfigError(f"--bootstrap {value!r}: neither HOST:PORT nor a readable file")
    return tuple(dict.fromkeys(out))


def add_trust_args(parser: argparse.ArgumentParser, serving: bool = False) -> None:
    """--swarm-key and TLS: the same on nodes and clients of one swarm (docs/reliability.md)."""
    parser.add_argument("--swarm-key", default=os.environ.get("POTLUCK_SWARM_KEY_FILE"),
                        help="key file of a private swarm (env POTLUCK_SWARM_KEY_FILE; make one: potluck swarm-key new FILE)")
    parser.add_argument("--tls", default="off", choices=["off", "auto", "ca"],
                        help="encrypt every call: auto = certificates endorsed by node identities; ca = --tls-ca roots")
    parser.add_argument("--tls-ca", default=None, help="PEM roots that nodes' certificates are checked against (--tls ca)")
    parser.add_argument("--tls-server-name", default=None,
                        help="the name nodes' certificates are issued to (default: the dialed host)")
    if serving:
        parser.add_argument("--tls-cert", default=None, help="PEM certificate chain this node presents (implies --tls ca)")
        parser.add_argument("--tls-key", default=None, help="the certificate's PEM private key")


def trust_options(args: argparse.Namespace) -> dict:
    """The trust flags as keyword arguments (ClientConfig / NodeConfig field names, and load_security's)."""
    options = {"swarm_key": args.swarm_key, "tls": args.tls, "tls_ca": args.tls_ca,
               "tls_server_name": args.tls_server_name}
    if getattr(args, "tls_cert", None) or getattr(args, "tls_key", None):
        options.update(tls="ca", tls_cert=args.tls_cert, tls_key=args.tls_key)
    return options
