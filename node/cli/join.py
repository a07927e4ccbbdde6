"""`potluck join` on the command line: its flags (and the --config TOML file that can give them), and
building the NodeConfig that node.server runs."""

from __future__ import annotations

import argparse
import asyncio
import sys

from node.cli.args import (
    add_logging,
    add_swarm_args,
    add_trust_args,
    bootstrap_list,
    discovery_options,
    positive,
    trust_options,
)
from node.config import ConfigError, NodeConfig, parse_blocks, read_config_file

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_join_parser(commands) -> None:
    add_join_args(commands.add_parser("join", help="serve a span of a model's layers"))


def blocks(text: str) -> str:
    """--blocks START:END, checked as it is parsed: a wrong span is said before anything heavy is imported."""
    try:
        parse_blocks(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--blocks ")) from None
    return text


def add_join_args(join: argparse.ArgumentParser) -> None:
    join.add_argument("--config", default=None,
                      help="TOML file of join options (keys: these flags' names); flags given here override it")
    join.add_argument(
        "--model",
        default=None,
        help="model folder, .gguf file or hub id (org/name, or org/name@revision); required here or in --config",
    )
    join.add_argument("--blocks", type=blocks, default=None,
                      help="layers to serve, START:END (half-open), e.g. 0:10; default: placement chooses")
    join.add_argument("--host", default="127.0.0.1", help="address to bind and advertise (default 127.0.0.1)")
    join.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    join.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    join.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (auto: fp32 on CPU, bf16 on GPU)")
    join.add_argument("--max-length", type=positive, default=8192, help="longest session in tokens (default 8192)")
    join.add_argument("--cache-tokens", type=positive, default=65536, help="KV cache budget in tokens (default 65536)")
    join.add_argument("--threads", type=int, default=0,
                      help="torch CPU threads (default: every core on CPU, 2 with a GPU)")
    join.add_argument("--quant", default="none", choices=["none", "int8", "nf4"],
                      help="quantise the span's weights: int8 (~1/4 of float32, small quality cost) or nf4 (~1/7, "
                           "larger cost; CUDA needs bitsandbytes); default none (exact outputs). docs/quantization.md")
    join.add_argument("--numerics", default="exact", choices=["exact", "fast"],
                      help="exact (default): products equal transformers' up to float rounding; fast: the exact "
                           "compact q4/q8 weights multiply 8-bit quantised activations with integer dot products, "
                           "as llama.cpp does (faster, perplexity within ~1%%; clients may refuse such nodes: "
                           "--accept-numerics). docs/performance.md#fast-numerics")
    join.add_argument("--batch-wait-ms", type=float, default=5.0,
                      help="how long a pass may wait to batch the steps of other sessions active on this node "
                           "(default 5; 0: never wait; a lone session never waits). docs/performance.md")
    join.add_argument("--no-lean", action="store_true",
                      help="run transformers' own layers instead of the lean runtime (for comparisons)")
    join.add_argument(
        "--no-exact",
        action="store_true",
        help="on CPU, keep every float32 matrix dense (by default a matrix whose values are exactly 4-bit "
        "or 8-bit blocks, as in a model converted from GGUF, or bfloat16 values is kept so, and "
        "multiplied by a small C kernel built on first use: the same results, fewer bytes to read; "
        "docs/performance.md#exact-compact-weights)",
    )
    join.add_argument("--no-pack", action="store_true",
                      help="on CPU, never pack the lean runtime's float32 weights for MKL (by default they are packed "
                           "while most passes carry several sessions' steps: ~1.5x faster there, ~5%% slower for one)")
    join.add_argument("--no-inline-decode", action="store_true",
                      help="run every step on the compute thread (by default a lone one-token step runs on the event "
                           "loop's own thread: two thread hand-overs fewer a token; docs/performance.md)")
    join.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                      help="serve a PEFT LoRA adapter (folder or hub id) under NAME; sessions pick it by name "
                           "(repeatable; docs/client-guide.md#lora-adapters)")
    join.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    join.add_argument("--name", default="", help="a name shown by `potluck status` (default host:port)")
    join.add_argument("--announce", default=None, help="HOST:PORT others should dial (default: the bound address)")
    join.add_argument("--identity", default=None,
                      help="ed25519 key file, created on first run (default: a free slot in ~/.local/share/potluck)")
    join.add_argument("--num-blocks", type=positive, default=None, help="with no --blocks: how many layers to serve")
    join.add_argument(
        "--memory", default=None, help="with no --blocks: memory budget, e.g. 4GB (default: half the free memory)"
    )
    join.add_argument("--throughput", type=float, default=None, help="decode tokens/s to publish instead of measuring")
    join.add_argument("--heartbeat", type=float, default=30.0, help="seconds between re-announcements (default 30)")
    join.add_argument("--ttl", type=float, default=90.0,
                      help="seconds a silent node stays listed (default 90, at most 180)")
    join.add_argument("--drain-timeout", type=float, default=30.0,
                      help="SIGTERM: seconds to wait for sessions to move away before exiting (default 30)")
    join.add_argument("--session-idle-timeout", type=float, default=600.0,
                      help="close a session after this many seconds without a step (default 600)")
    join.add_argument("--session-open-timeout", type=float, default=10.0,
                      help="close a session that has not stepped this many seconds after opening (default 10)")
    join.add_argument("--no-rebalance", action="store_true", help="never move to other layers on its own")
    join.add_argument("--rebalance-period", type=float, default=30.0, help="mean seconds between re-balancing checks")
    join.add_argument("--metrics-port", type=int, default=0,
                      help="serve Prometheus metrics at http://HOST:PORT/metrics (default 0: off)")
    _add_limit_args(join)
    add_swarm_args(join)
    join.add_argument("--dht-port", type=int, default=0,
                      help="with the DHT: TCP port of its DHT peer (default 0: any; fix it for an initial peer)")
    join.add_argument("--dht-refresh", type=float, default=30.0,
                      help="with the DHT: seconds between re-stores of this node's record; it lives 3x as long "
                           "(default 30)")
    add_trust_args(join, serving=True)
    _add_relay_args(join)
    join.add_argument("--local-swarm", action="store_true",
                      help="a lab swarm: push targets and probes may be loopback or private addresses (default: "
                           "when this node's and its bootstrap nodes' addresses all are; docs/operators-config.md)")
    join.add_argument("--public-swarm", action="store_true",
                      help="a public swarm: push targets and probes must be global addresses (default: when this "
                           "node's or a bootstrap node's address is)")
    add_logging(join)


def _add_limit_args(join: argparse.ArgumentParser) -> None:
    """Overload limits (docs/reliability.md#overload): past each, RESOURCE_EXHAUSTED naming the flag."""
    join.add_argument("--max-sessions", type=positive, default=256,
                      help="sessions open at once; more wait --admission-wait, then are refused (default 256)")
    join.add_argument("--max-session-tokens", type=int, default=0,
                      help="cache tokens one session may reserve, batch x max_length (default 0: the whole budget)")
    join.add_argument(
        "--cache-memory",
        default=None,
        help="KV cache budget in bytes, e.g. 2GB; replaces --cache-tokens (converted per token of the span)",
    )
    join.add_argument("--rate-limit", type=float, default=0.0,
                      help="requests per second per peer address, bursts of 2 s (default 0: off)")
    join.add_argument(
        "--admission-wait",
        type=float,
        default=2.0,
        help="seconds an open waits for cache or a session slot to free up (default 2; 0: refuse at once)",
    )
    join.add_argument("--max-peer-sessions", type=int, default=32,
                      help="sessions one peer (caller address) may hold open on this node (default 32; 0: no limit)")
    join.add_argument("--max-peer-tokens", type=int, default=0,
                      help="cache tokens one peer may hold on this node (default 0: half the cache budget)")


def _add_relay_args(join: argparse.ArgumentParser) -> None:
    """Relays for nodes nobody can reach (docs/relay.md)."""
    join.add_argument("--relay", action="store_true",
                      help="volunteer as a relay: carry the connections of nodes that cannot be reached")
    join.add_argument(
        "--relay-max-nodes", type=positive, default=8, help="with --relay: nodes carried at once (default 8)"
    )
    join.add_argument("--relay-max-bytes", default=None,
                      help="with --relay: bytes a second each carried node may move, e.g. 10MB (default 16MiB; "
                           "0: no limit)")
    join.add_argument("--no-relay", action="store_true",
                      help="never serve through a relay, even if the swarm cannot reach this node")
    join.add_argument("--relay-via", default=None, metavar="HOST:PORT",
                      help="serve through this relay without checking reachability (behind NAT, for instance)")


def _relay_options(args: argparse.Namespace) -> dict:
    from node.config import parse_size

    return dict(relay=args.relay, relay_max_nodes=args.relay_max_nodes, relay_fallback=not args.no_relay,
                relay_max_bytes=(parse_size(args.relay_max_bytes, "--relay-max-bytes")
                                 if args.relay_max_bytes is not None else 16 * 2**20),
                relay_via=args.relay_via)


def _limit_options(args: argparse.Namespace) -> dict:
    """NodeConfig's overload fields from `join`'s flags."""
    from node.config import parse_size

    return dict(max_sessions=args.max_sessions, max_session_tokens=args.max_session_tokens,
                cache_memory=parse_size(args.cache_memory, "--cache-memory") if args.cache_memory else None,
                rate_limit=args.rate_limit, admission_wait=args.admission_wait,
                max_peer_sessions=args.max_peer_sessions, max_peer_tokens=args.max_peer_tokens)


def _file_value(action: argparse.Action, key: str, value, where: str):
    """A TOML value for the option `action`, checked and converted as argparse would convert the flag."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r}: expected {expected}")

    if action.nargs == 0:  # a switch (--no-mdns): true or false
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(action.default, list):  # repeatable (--bootstrap): one string or a list of strings
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise bad("a string or a list of strings")
        return values
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad("a string or a number")
    if action.type in (int, positive) and not isinstance(value, (int, str)):
        raise bad("an integer")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (ValueError, argparse.ArgumentTypeError) as error:
            if action.type in (int, positive, float):
                raise bad("an integer" if action.type in (int, positive) else "a number") from None
            raise ConfigError(f"{where}: {key}: {error}") from None
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise bad("one of " + ", ".join(map(str, action.choices)))
    return value


def join_args(argv: list[str]) -> argparse.Namespace:
    """`join`'s options: flags on the command line, over the --config file's values, over the defaults.

    File keys are the flags' names without the leading dashes (`cache-tokens` or `cache_tokens`);
    a repeatable flag given on the command line (--bootstrap) replaces the file's list."""
    parser = argparse.ArgumentParser(prog="potluck join")
    add_join_args(parser)
    args = parser.parse_args(argv)
    if args.config:
        options = {opt[2:]: action for action in parser._actions for opt in action.option_strings
                   if opt.startswith("--") and action.dest not in ("help", "config")}
        table = read_config_file(args.config)
        unknown = sorted(key for key in table if key.replace("_", "-") not in options)
        if unknown:
            raise ConfigError(f"--config {args.config}: unknown keys {', '.join(unknown)} "
                              f"(expected `potluck join` options: {', '.join(sorted(options))})")
        defaults = {}
        for key, value in table.items():
            action = options[key.replace("_", "-")]
            if action.dest in defaults:
                raise ConfigError(f"--config {args.config}: {key} is given twice")
            if isinstance(action.default, list) and getattr(args, action.dest):
                continue  # given on the command line: that list wins
            defaults[action.dest] = _file_value(action, key, value, f"--config {args.config}")
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    args.command = "join"
    return args


def run_join(args: argparse.Namespace) -> None:
    from node.config import parse_size
    from node.server import run_node

    if not args.model:
        raise ConfigError("--model is required (on the command line or in the --config file)")
    from common.weights.files import split_revision

    model, revision = split_revision(args.model, args.revision)  # org/name@revision (hub ids only)
    start, end = parse_blocks(args.blocks) if args.blocks else (None, None)
    config = NodeConfig(
        model=model,
        start=start,
        end=end,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        max_length=args.max_length,
        cache_tokens=args.cache_tokens,
        threads=args.threads,
        revision=revision,
        lean=not args.no_lean,
        exact=not args.no_exact,
        numerics=args.numerics,
        pack=not args.no_pack,
        inline_decode=not args.no_inline_decode,
        batch_wait=args.batch_wait_ms / 1000,
        quant=args.quant,
        name=args.name,
        announce=args.announce,
        identity=args.identity,
        bootstrap=bootstrap_list(args.bootstrap),
        mdns=not args.no_mdns,
        mdns_interface=args.mdns_interface,
        dht_port=args.dht_port,
        dht_refresh=args.dht_refresh,
        **discovery_options(args),
        num_blocks=args.num_blocks,
        memory_bytes=parse_size(args.memory) if args.memory else None,
        throughput=args.throughput,
        heartbeat=args.heartbeat,
        ttl=args.ttl,
        rebalance=not args.no_rebalance,
        rebalance_period=args.rebalance_period,
        drain_timeout=args.drain_timeout,
        session_idle_timeout=args.session_idle_timeout,
        session_open_timeout=args.session_open_timeout,
        metrics_port=args.metrics_port or None,
        progress=sys.stderr.isatty(),
        adapters=_adapter_specs(args.adapter),
        **trust_options(args),
        **_limit_options(args),
        **_relay_options(args),
        swarm_scope=_swarm_scope(args),
    )
    asyncio.run(run_node(config))


def _swarm_scope(args: argparse.Namespace) -> str:
    if args.local_swarm and args.public_swarm:
        raise ConfigError("--local-swarm and --public-swarm contradict each other: give one of them")
    return "local" if args.local_swarm else "public" if args.public_swarm else "auto"


def _adapter_specs(values: list[str]) -> tuple[tuple[str, str], ...]:
    """--adapter NAME=PATH values (from the command line or the --config file's `adapter` list)."""
    from node.model.lora import parse_adapter_spec

    try:
        return tuple(parse_adapter_spec(value) for value in values)
    except ValueError as error:
        raise ConfigError(str(error)) from None
