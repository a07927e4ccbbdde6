"""`potluck api`: serve the OpenAI-compatible app with uvicorn."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import uvicorn

from client.api.app import ApiSettings, create_app
from client.api.catalog import SwarmCatalog
from client.config import ClientConfig
from client.model import DistributedModelForCausalLM
from client.textgen import load_tokenizer
from node.model.loader import ModelFiles



def serve(model: str | list[str], host: str = "127.0.0.1", port: int = 8000, *, config: ClientConfig,
          api_key: str | None = None, name: str | None = None, revision: str | None = None,
          settings: ApiSettings = ApiSettings(), models_dir: Path | None = None) -> None:
    """Serve one model or several (folders or hub ids; the ones the swarm's nodes serve) until interrupted.

    A model's name in the API is `name` (one model only), by default its folder name or hub id. The
    tokenizers are loaded now; the models on start-up, in the background (and again on requests if the
    swarm did not cover them yet). Without fixed peers, the other models the swarm covers are offered
    too (client parts from `models_dir/<model id>` or the hub, on first use)."""
    models = [model] if isinstance(model, str) else list(model)
    if name is not None and len(models) != 1:
        raise ValueError("--name needs exactly one --model")
    sources, tokenizers = {}, {}
    for path in models:
        served = name or ModelFiles.open(path, revision=revision).model_id
        if served in sources:
            raise ValueError(f"two models would be served as {served!r}")
        tokenizers[served] = load_tokenizer(path, revision=revision)
        sources[served] = partial(DistributedModelForCausalLM.from_pretrained, path, config=config, revision=revision)
    catalog = None if config.peers else SwarmCatalog(config, models_dir)
    name = ", ".join(sources) or "the models the swarm covers"
    app = create_app(sources, tokenizers, api_key=api_key, settings=settings, catalog=catalog)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family)  # bound here: port 0 works, the real port is shown
    bound_host, bound_port = listener.getsockname()[:2]
    shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    print(f"potluck api serving {name} on http://{shown}:{bound_port}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=10))
    with _stopped_by_signals_is_success():
        server.run(sockets=[listener])


@contextmanager
def _stopped_by_signals_is_success():
    """uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-sends the signal to the handler
    that was there before it. Make that handler a no-op, so that after a graceful stop we
    return (exit 0, like `potluck join`) instead of dying of the signal a second time."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_api_parser(commands) -> None:
    api = commands.add_parser("api", aliases=["dashboard"],
                              help="serve an OpenAI-compatible HTTP API backed by the swarm, and its dashboard at /")
    api.add_argument("--model", action="append", default=[],
                     help="model folder, .gguf file or hub id (the one the nodes serve); repeat to serve several. Without "
                          "--peers, every other model the discovered swarm covers is offered too")
    api.add_argument("--models-dir", default=None,
                     help="folder holding discovered models' folders by name (default: load them from the hub)")
    api.add_argument("--name", default=None, help="the model's name in the API (default: folder name or hub id)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    api.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request")
    api.add_argument("--peers", default=None, help="comma-separated HOST:PORT of nodes (default: discover them)")
    api.add_argument("--bootstrap", action="append", default=[],
                     help="HOST:PORT of a known node, or a file with one per line (repeatable)")
    api.add_argument("--no-mdns", action="store_true", help="turn LAN discovery (zeroconf) off")
    api.add_argument("--mdns-interface", default=None, help="address of the interface for mDNS")
    api.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                     help="dtype of activations on the wire (default float32)")
    api.add_argument("--default-max-tokens", type=int, default=ApiSettings.default_max_tokens,
                     help=f"chat completions without max_tokens stop here (default {ApiSettings.default_max_tokens})")
    from node.cli import PROMPT_LOOKUP, add_trust_args, add_verify_args

    api.add_argument("--parallel", type=int, default=ApiSettings.parallel,
                     help=f"requests that generate at once; more wait their turn (default {ApiSettings.parallel})")
    api.add_argument("--no-convoys", action="store_true",
                     help="concurrent requests step on their own, not as convoys sharing the nodes' passes (docs/performance.md)")
    api.add_argument("--prompt-lookup", type=int, default=PROMPT_LOOKUP, metavar="N",
                     help="speculative decoding by prompt lookup: each pass also checks up to N tokens that followed "
                          "the last ones earlier in the text; the same text for greedy requests and the same "
                          "distribution for sampled ones, faster when answers repeat the prompt; a request drafts "
                          f"only while it generates alone (default {PROMPT_LOOKUP}; 0: off)")
    api.add_argument("--no-pack-head", action="store_true",
                     help="no MKL-packed copy of the LM head for requests' shared head products (saves the head's memory)")
    add_trust_args(api)
    add_verify_args(api)
    api.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_api_cli(args: argparse.Namespace) -> None:
    from node.cli import bootstrap_list, trust_options, verify_options

    if args.default_max_tokens < 1:
        raise ValueError("--default-max-tokens must be at least 1")
    if args.parallel < 1:
        raise ValueError("--parallel must be at least 1")
    if args.prompt_lookup < 0:
        raise ValueError("--prompt-lookup must be 0 (off) or more")
    peers = tuple(p.strip() for p in (args.peers or "").split(",") if p.strip())
    config = ClientConfig(peers=peers, bootstrap=bootstrap_list(args.bootstrap), mdns=not args.no_mdns,
                          mdns_interface=args.mdns_interface, wire_dtype=args.wire_dtype,
                          convoys=not args.no_convoys, pack_head=not args.no_pack_head,
                          **trust_options(args), **verify_options(args))
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"potluck api: warning: listening on {args.host} without --api-key", file=sys.stderr)
    if not args.model and peers:
        raise ValueError("--peers needs --model (discovered models are offered only when discovering the swarm)")
    serve(args.model, args.host, args.port, config=config, api_key=args.api_key, name=args.name,
          settings=ApiSettings(default_max_tokens=args.default_max_tokens, parallel=args.parallel,
                               prompt_lookup=args.prompt_lookup),
          models_dir=Path(args.models_dir).expanduser() if args.models_dir else None)
