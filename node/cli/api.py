"""`potluck api` (alias `dashboard`): its flags, and the OpenAI-compatible server (client/api/server.py) built from
them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.api.settings import ApiSettings
from common.wire.contract import WIRE_FORMATS
from node.cli.args import (
    PROMPT_LOOKUP,
    add_logging,
    add_peers_arg,
    add_swarm_args,
    add_trust_args,
    add_verify_args,
    bootstrap_list,
    discovery_options,
    trust_options,
    verify_options,
)


def add_api_parser(commands) -> None:
    api = commands.add_parser("api", aliases=["dashboard"],
                              help="serve an OpenAI-compatible HTTP API backed by the swarm, and its dashboard at /")
    api.add_argument(
        "--model",
        action="append",
        default=[],
        help="model folder, .gguf file or hub id (the one the nodes serve); repeat to serve several. Without "
        "--peers, every other model the discovered swarm covers is offered too",
    )
    api.add_argument("--models-dir", default=None,
                     help="folder holding discovered models' folders by name (default: load them from the hub)")
    api.add_argument("--name", default=None, help="the model's name in the API (default: folder name or hub id)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    api.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request")
    add_peers_arg(api)
    add_swarm_args(api)
    api.add_argument("--wire-dtype", default="float32", choices=WIRE_FORMATS,
                     help="dtype of activations on the wire (default float32)")
    api.add_argument("--default-max-tokens", type=int, default=ApiSettings.default_max_tokens,
                     help=f"chat completions without max_tokens stop here (default {ApiSettings.default_max_tokens})")
    api.add_argument("--parallel", type=int, default=ApiSettings.parallel,
                     help=f"requests that generate at once; more wait their turn (default {ApiSettings.parallel})")
    api.add_argument(
        "--no-convoys",
        action="store_true",
        help="concurrent requests step on their own, not as convoys sharing the nodes' passes (docs/performance.md)",
    )
    api.add_argument("--prompt-lookup", type=int, default=PROMPT_LOOKUP, metavar="N",
                     help="speculative decoding by prompt lookup: each pass also checks up to N tokens that followed "
                          "the last ones earlier in the text; the same text for greedy requests and the same "
                          "distribution for sampled ones, faster when answers repeat the prompt; a request drafts "
                          f"only while it generates alone (default {PROMPT_LOOKUP}; 0: off)")
    api.add_argument(
        "--no-pack-head",
        action="store_true",
        help="no MKL-packed copy of the LM head for requests' shared head products (saves the head's memory)",
    )
    add_trust_args(api)
    add_verify_args(api)
    add_logging(api)


def run_api_cli(args: argparse.Namespace) -> None:
    from client.api import server
    from client.config import ClientConfig

    if args.default_max_tokens < 1:
        raise ValueError("--default-max-tokens must be at least 1")
    if args.parallel < 1:
        raise ValueError("--parallel must be at least 1")
    if args.prompt_lookup < 0:
        raise ValueError("--prompt-lookup must be 0 (off) or more")
    peers = args.peers
    config = ClientConfig(peers=peers, bootstrap=bootstrap_list(args.bootstrap), **discovery_options(args),
                          mdns=not args.no_mdns,
                          mdns_interface=args.mdns_interface, wire_dtype=args.wire_dtype,
                          convoys=not args.no_convoys, pack_head=not args.no_pack_head,
                          **trust_options(args), **verify_options(args))
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"potluck api: warning: listening on {args.host} without --api-key", file=sys.stderr)
    if not args.model and peers:
        raise ValueError("--peers needs --model (discovered models are offered only when discovering the swarm)")
    server.serve(args.model, args.host, args.port, config=config, api_key=args.api_key, name=args.name,
          settings=ApiSettings(default_max_tokens=args.default_max_tokens, parallel=args.parallel,
                               prompt_lookup=args.prompt_lookup),
          models_dir=Path(args.models_dir).expanduser() if args.models_dir else None)
