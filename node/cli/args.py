"""The flags several commands share, each defined once: --log-level, integer types, the swarm (--bootstrap,
mDNS, --discovery and the DHT's --initial-peers), trust (--swarm-key, TLS), verification and generation
(--wire-dtype from the wire contract's list)."""

from __future__ import annotations

import argparse
import os

from common.wire.contract import WIRE_FORMATS
from node.config import ConfigError


def add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative integer")
    return value


def peer_list(text: str) -> tuple[str, ...]:
    """--peers: comma-separated HOST:PORT (IPv6 as [HOST]:PORT). A host without a port is refused: gRPC
    would dial port 443 and report a refused connection there."""
    peers = []
    for peer in (p.strip() for p in text.split(",")):
        if not peer:
            continue
        host, colon, port = peer.rpartition(":")
        if not colon or not host or host.count(":") and not (host.startswith("[") and host.endswith("]")):
            raise argparse.ArgumentTypeError(f"{peer!r} is not HOST:PORT (give the port the node printed, "
                                             "e.g. 127.0.0.1:5001; IPv6: [::1]:5001)")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"{peer!r}: the port {port!r} is not a number from 1 to 65535")
        peers.append(peer)
    return tuple(peers)


def add_peers_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=peer_list, default=(), metavar="HOST:PORT,...",
                        help="comma-separated HOST:PORT of nodes (default: discover them)")


def add_swarm_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", default=[],
                        help="HOST:PORT of a known node, or a file with one per line (repeatable)")
    parser.add_argument("--no-mdns", action="store_true", help="turn LAN discovery (zeroconf) off")
    parser.add_argument("--mdns-interface", default=None, help="address of the interface for mDNS")
    parser.add_argument("--discovery", default="auto", choices=["auto", "gossip", "dht"],
                        help="how to find the swarm: gossip (--bootstrap, mDNS: a LAN), dht (the public swarm's "
                             "hivemind DHT, --initial-peers); auto (default) = dht when --initial-peers is given")
    parser.add_argument("--initial-peers", type=multiaddr_list, default=(), metavar="MULTIADDR,...",
                        help="comma-separated multiaddrs of DHT peers to join through (a node prints its own)")


def multiaddr_list(text: str) -> tuple[str, ...]:
    """--initial-peers: comma-separated libp2p multiaddrs, e.g. /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."""
    peers = tuple(p.strip() for p in text.split(",") if p.strip())
    for peer in peers:
        if not peer.startswith("/") or "/tcp/" not in peer and "/udp/" not in peer:
            raise argparse.ArgumentTypeError(f"{peer!r} is not a multiaddr (like /ip4/203.0.113.5/tcp/31337/p2p/"
                                             "12D3KooW...; a node prints its own on start)")
    return peers


def discovery_options(args: argparse.Namespace) -> dict:
    """--discovery and --initial-peers as keyword arguments of NodeConfig and ClientConfig."""
    return {"discovery": args.discovery, "initial_peers": tuple(args.initial_peers)}


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
    parser.add_argument(
        "--swarm-key",
        default=os.environ.get("POTLUCK_SWARM_KEY_FILE"),
        help="key file of a private swarm (env POTLUCK_SWARM_KEY_FILE; make one: potluck swarm-key new FILE)",
    )
    parser.add_argument("--tls", default="off", choices=["off", "auto", "ca"],
                        help="encrypt every call: auto = certificates endorsed by node identities; ca = --tls-ca roots")
    parser.add_argument(
        "--tls-ca", default=None, help="PEM roots that nodes' certificates are checked against (--tls ca)"
    )
    parser.add_argument("--tls-server-name", default=None,
                        help="the name nodes' certificates are issued to (default: the dialed host)")
    if serving:
        parser.add_argument(
            "--tls-cert", default=None, help="PEM certificate chain this node presents (implies --tls ca)"
        )
        parser.add_argument("--tls-key", default=None, help="the certificate's PEM private key")


def trust_options(args: argparse.Namespace) -> dict:
    """The trust flags as keyword arguments (ClientConfig / NodeConfig field names, and load_security's)."""
    options = {"swarm_key": args.swarm_key, "tls": args.tls, "tls_ca": args.tls_ca,
               "tls_server_name": args.tls_server_name}
    if getattr(args, "tls_cert", None) or getattr(args, "tls_key", None):
        options.update(tls="ca", tls_cert=args.tls_cert, tls_key=args.tls_key)
    return options


def temperature(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not 0 (greedy) or a positive number")
    return value


def top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not within (0, 1]")
    return value


# speculative decoding's longest draft by default: exact, and a pass of up to 8 tokens costs about one of 1 on CPU
# nodes (docs/performance.md); the draft length adapts, so answers that repeat nothing lose nothing measurable
PROMPT_LOOKUP = 7


def add_generation_args(
    parser: argparse.ArgumentParser, default_prompt: str | None = None, chat_default: bool = False
) -> None:
    parser.add_argument("--prompt", required=default_prompt is None, default=default_prompt, help="the prompt text")
    parser.add_argument(
        "--chat", action="store_true", default=chat_default, help="wrap the prompt in the chat template"
    )
    parser.add_argument("--max-new-tokens", type=positive, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default); >0 samples")
    parser.add_argument("--top-p", type=top_p, default=1.0, help="nucleus sampling threshold, in (0, 1] (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=None, help="stop when this string appears (repeatable)")
    parser.add_argument("--wire-dtype", default="float32", choices=WIRE_FORMATS,
                        help="hidden states on the wire; int8: blockwise quantised (default float32)")
    parser.add_argument(
        "--prompt-lookup",
        type=non_negative,
        default=PROMPT_LOOKUP,
        metavar="N",
        help="speculative decoding: each pass also checks up to N tokens that followed the last "
        "tokens earlier in the text; the same output (sampling: the same distribution), faster when "
        f"the answer repeats the prompt (default {PROMPT_LOOKUP}; 0: off)",
    )


def add_verify_args(parser: argparse.ArgumentParser) -> None:
    """Which nodes' outputs to accept (quantised weights, docs/quantization.md) and their verification
    (client/verify.py, docs/reliability.md)."""
    parser.add_argument("--accept-quant", default="any", choices=["any", "int8", "none"],
                        help="route through nodes with quantised weights: any (default), int8 (int8 or none), "
                             "none (only unquantised nodes: outputs exact to transformers')")
    parser.add_argument("--accept-numerics", default="any", choices=["any", "exact"],
                        help="route through nodes computing in llama.cpp's fast numerics (potluck join --numerics "
                             "fast): any (default), exact (only nodes whose products are exact; "
                             "docs/performance.md#fast-numerics)")
    parser.add_argument("--head-numerics", default="exact", choices=["exact", "fast"],
                        help="the client's LM head: exact (default) or fast, in llama.cpp's numerics as a node's "
                             "--numerics fast (8-bit activations; docs/performance.md#fast-numerics)")
    parser.add_argument("--weights", default="match", choices=["match", "any"],
                        help="match (default): route only through nodes announcing the model's weights fingerprint "
                             "(docs/swarm.md); any: every node of the model's config")
    parser.add_argument("--allow-unfingerprinted", action="store_true",
                        help="with --weights match: also route through nodes announcing no fingerprint (older nodes)")
    parser.add_argument("--verify", default="off", choices=["off", "spot", "full"],
                        help="recompute hops on other nodes serving the same layers and ban nodes caught lying: "
                             "spot = a random share of steps, full = every step (default off)")
    parser.add_argument("--verify-fraction", type=float, default=0.25,
                        help="with --verify spot: the share of steps that trigger a check (default 0.25)")


def verify_options(args: argparse.Namespace) -> dict:
    return {"verify": args.verify, "verify_fraction": args.verify_fraction, "accept_quant": args.accept_quant,
            "accept_numerics": args.accept_numerics, "head_numerics": args.head_numerics,
            "weights": args.weights, "unfingerprinted": args.allow_unfingerprinted}
