"""`potluck` command line: join, generate, status, demo, eval, finetune, api, doctor, bench*, prepare-model.

The only place that reads argv and configures logging."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys

from node.config import ConfigError, NodeConfig, parse_blocks, read_config_file

log = logging.getLogger("potluck")

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


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


# Commands defined in their own modules: (module, function adding their parsers, {command: handler}).
_MODULE_COMMANDS = (
    ("node.bench", "add_bench_parser", {"bench": "run_bench"}),
    ("node.bench_perf", "add_perf_bench_parser", {"bench-perf": "run_perf_bench_cli"}),
    ("node.bench_swarm", "add_swarm_bench_parser", {"bench-swarm": "run_swarm_bench_cli"}),
    ("node.bench_recovery", "add_recovery_bench_parser", {"bench-recovery": "run_recovery_bench_cli"}),
    ("node.bench_wire", "add_wire_bench_parser", {"bench-wire": "run_wire_bench_cli"}),
    ("node.latency_proxy", "add_proxy_parser", {"proxy": "run_proxy_cli"}),
    ("node.bench_trust", "add_trust_bench_parser", {"bench-trust": "run_trust_bench_cli"}),
    ("node.bench_relay", "add_relay_bench_parser", {"bench-relay": "run_relay_bench_cli"}),
    ("node.bench_soak", "add_soak_bench_parser", {"bench-soak": "run_soak_bench_cli"}),
    ("node.bench_prefill", "add_prefill_bench_parser", {"bench-prefill": "run_prefill_bench_cli"}),
    ("node.bench_quant", "add_quant_bench_parser", {"bench-quant": "run_quant_bench_cli"}),
    ("node.bench_compile", "add_compile_bench_parser", {"bench-compile": "run_compile_bench_cli"}),
    ("node.bench_speculate", "add_speculate_bench_parser", {"bench-speculate": "run_speculate_bench_cli"}),
    ("client.api", "add_api_parser", {"api": "run_api_cli", "dashboard": "run_api_cli"}),
    ("node.doctor", "add_doctor_parser", {"doctor": "run_doctor_cli"}),
    ("client.eval", "add_eval_parser", {"eval": "run_eval_cli"}),
    ("client.finetune", "add_finetune_parser", {"finetune": "run_finetune_cli"}),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with `command`, the commands defined in other modules (benchmarks, api, ...)
    other than that one get an empty parser, so `potluck join` does not import them (~1.5 s a process)."""
    parser = argparse.ArgumentParser(prog="potluck", description="Peer-to-peer LLM inference on pooled hardware.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    join = commands.add_parser("join", help="serve a span of a model's layers")
    _add_join_args(join)

    generate = commands.add_parser("generate", help="generate text through a chain of nodes")
    generate.add_argument("--model", required=True, help="model folder, .gguf file or hub id (the one the nodes serve)")
    generate.add_argument("--peers", default=None, help="comma-separated HOST:PORT of nodes (default: discover them)")
    _add_swarm_args(generate)
    add_trust_args(generate)
    add_verify_args(generate)
    _add_generation_args(generate)
    generate.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]} at the end')
    generate.add_argument("--no-push", action="store_true",
                          help="send every hop its step from the client (default: nodes forward steps along the chain)")
    generate.add_argument("--prefill-chunk", type=int, default=0,
                          help="pipeline prompts of 2x this many tokens or more down the chain in chunks (default 0: off)")
    generate.add_argument("--adapter", default=None, metavar="NAME",
                          help="run with the LoRA adapter the nodes serve as NAME (potluck join --adapter NAME=PATH); "
                               "default: the base model")
    generate.add_argument("--prompt-weights", default=None, metavar="FILE",
                          help="generate with a soft prompt trained by `potluck finetune --method ptune` (docs/finetune.md)")
    _add_logging(generate)

    demo = commands.add_parser("demo", help="start a local 3-node swarm on the embedded model and chat through it")
    demo.add_argument("--model", default=None, help="model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)")
    demo.add_argument("--nodes", type=_positive, default=3, help="number of node processes (default 3)")
    demo.add_argument("--threads", type=int, default=0, help="torch threads per node (default: cores / nodes)")
    _add_generation_args(demo, default_prompt="What is the capital of France?", chat_default=True)
    _add_logging(demo)

    status = commands.add_parser("status", help="show the swarm: nodes, spans, coverage, warnings")
    _add_swarm_args(status)
    add_trust_args(status)
    status.add_argument("--wait", type=float, default=2.0, help="seconds to listen for nodes (default 2)")
    status.add_argument("--json", action="store_true", help="print the swarm as JSON")
    _add_logging(status)

    keys = commands.add_parser("swarm-key", help="make a private swarm's key")
    keys.add_argument("action", choices=["new"], help="new: write a fresh random key")
    keys.add_argument("file", help="where to write it (must not exist; readable by you only)")
    _add_logging(keys)

    prepare = commands.add_parser("prepare-model", help="write the embedded SmolLM2 model as a safetensors folder")
    prepare.add_argument("--out", default=None, help="folder to write (default ~/.cache/potluck/models/...)")
    _add_logging(prepare)

    for module, add_parser, runs in _MODULE_COMMANDS:
        if command is None or command in runs:
            getattr(importlib.import_module(module), add_parser)(commands)
        else:
            for name in runs:
                commands.add_parser(name)
    return parser


def _add_join_args(join: argparse.ArgumentParser) -> None:
    join.add_argument("--config", default=None,
                      help="TOML file of join options (keys: these flags' names); flags given here override it")
    join.add_argument("--model", default=None,
                      help="model folder, .gguf file or hub id (org/name, or org/name@revision); required here or in --config")
    join.add_argument("--blocks", default=None,
                      help="layers to serve, START:END (half-open), e.g. 0:10; default: placement chooses")
    join.add_argument("--host", default="127.0.0.1", help="address to bind and advertise (default 127.0.0.1)")
    join.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    join.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    join.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (auto: fp32 on CPU, bf16 on GPU)")
    join.add_argument("--max-length", type=_positive, default=8192, help="longest session in tokens (default 8192)")
    join.add_argument("--cache-tokens", type=_positive, default=65536, help="KV cache budget in tokens (default 65536)")
    join.add_argument("--threads", type=int, default=0,
                      help="torch CPU threads (default: every core on CPU, 2 with a GPU)")
    join.add_argument("--quant", default="none", choices=["none", "int8", "nf4"],
                      help="quantise the span's weights: int8 (~1/4 of float32, small quality cost) or nf4 (~1/7, "
                           "larger cost; CUDA needs bitsandbytes); default none (exact outputs). docs/quantization.md")
    join.add_argument("--batch-wait-ms", type=float, default=5.0,
                      help="how long a pass may wait to batch the steps of other sessions active on this node "
                           "(default 5; 0: never wait; a lone session never waits). docs/performance.md")
    join.add_argument("--no-lean", action="store_true",
                      help="run transformers' own layers instead of the lean runtime (for comparisons)")
    join.add_argument("--no-pack", action="store_true",
                      help="on CPU, never pack the lean runtime's float32 weights for MKL (by default they are packed "
                           "while most passes carry several sessions' steps: ~1.5x faster there, ~5%% slower for one)")
    join.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                      help="serve a PEFT LoRA adapter (folder or hub id) under NAME; sessions pick it by name "
                           "(repeatable; docs/client-guide.md#lora-adapters)")
    join.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    join.add_argument("--name", default="", help="a name shown by `potluck status` (default host:port)")
    join.add_argument("--announce", default=None, help="HOST:PORT others should dial (default: the bound address)")
    join.add_argument("--identity", default=None,
                      help="ed25519 key file, created on first run (default: a free slot in ~/.local/share/potluck)")
    join.add_argument("--num-blocks", type=_positive, default=None, help="with no --blocks: how many layers to serve")
    join.add_argument("--memory", default=None, help="with no --blocks: memory budget, e.g. 4GB (default: half the free memory)")
    join.add_argument("--throughput", type=float, default=None, help="decode tokens/s to publish instead of measuring")
    join.add_argument("--heartbeat", type=float, default=5.0, help="seconds between re-announcements (default 5)")
    join.add_argument("--ttl", type=float, default=15.0, help="seconds a silent node stays listed (default 15)")
    join.add_argument("--drain-timeout", type=float, default=30.0,
                      help="SIGTERM: seconds to wait for sessions to move away before exiting (default 30)")
    join.add_argument("--session-idle-timeout", type=float, default=600.0,
                      help="close a session after this many seconds without a step (default 600)")
    join.add_argument("--no-rebalance", action="store_true", help="never move to other layers on its own")
    join.add_argument("--rebalance-period", type=float, default=30.0, help="mean seconds between re-balancing checks")
    join.add_argument("--metrics-port", type=int, default=0,
                      help="serve Prometheus metrics at http://HOST:PORT/metrics (default 0: off)")
    _add_limit_args(join)
    _add_swarm_args(join)
    add_trust_args(join, serving=True)
    _add_relay_args(join)
    _add_logging(join)


def _add_limit_args(join: argparse.ArgumentParser) -> None:
    """Overload limits (docs/reliability.md#overload): past each, RESOURCE_EXHAUSTED naming the flag."""
    join.add_argument("--max-sessions", type=_positive, default=256,
                      help="sessions open at once; more wait --admission-wait, then are refused (default 256)")
    join.add_argument("--max-session-tokens", type=int, default=0,
                      help="cache tokens one session may reserve, batch x max_length (default 0: the whole budget)")
    join.add_argument("--cache-memory", default=None,
                      help="KV cache budget in bytes, e.g. 2GB; replaces --cache-tokens (converted per token of the span)")
    join.add_argument("--rate-limit", type=float, default=0.0,
                      help="requests per second per peer address, bursts of 2 s (default 0: off)")
    join.add_argument("--admission-wait", type=float, default=2.0,
                      help="seconds an open waits for cache or a session slot to free up (default 2; 0: refuse at once)")


def _add_relay_args(join: argparse.ArgumentParser) -> None:
    """Relays for nodes nobody can reach (docs/relay.md)."""
    join.add_argument("--relay", action="store_true",
                      help="volunteer as a relay: carry the connections of nodes that cannot be reached")
    join.add_argument("--relay-max-nodes", type=_positive, default=8, help="with --relay: nodes carried at once (default 8)")
    join.add_argument("--relay-max-bytes", default=None,
                      help="with --relay: bytes a second each carried node may move, e.g. 10MB (default: no limit)")
    join.add_argument("--no-relay", action="store_true",
                      help="never serve through a relay, even if the swarm cannot reach this node")
    join.add_argument("--relay-via", default=None, metavar="HOST:PORT",
                      help="serve through this relay without checking reachability (behind NAT, for instance)")


def _relay_options(args: argparse.Namespace) -> dict:
    from node.config import parse_size

    return dict(relay=args.relay, relay_max_nodes=args.relay_max_nodes, relay_fallback=not args.no_relay,
                relay_max_bytes=parse_size(args.relay_max_bytes, "--relay-max-bytes") if args.relay_max_bytes else 0,
                relay_via=args.relay_via)


def _limit_options(args: argparse.Namespace) -> dict:
    """NodeConfig's overload fields from `join`'s flags."""
    from node.config import parse_size

    return dict(max_sessions=args.max_sessions, max_session_tokens=args.max_session_tokens,
                cache_memory=parse_size(args.cache_memory, "--cache-memory") if args.cache_memory else None,
                rate_limit=args.rate_limit, admission_wait=args.admission_wait)


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
    if action.type in (int, _positive) and not isinstance(value, (int, str)):
        raise bad("an integer")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (ValueError, argparse.ArgumentTypeError):
            raise bad("an integer" if action.type in (int, _positive) else "a number") from None
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
    _add_join_args(parser)
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


def _add_generation_args(parser: argparse.ArgumentParser, default_prompt: str | None = None, chat_default: bool = False) -> None:
    parser.add_argument("--prompt", required=default_prompt is None, default=default_prompt, help="the prompt text")
    parser.add_argument("--chat", action="store_true", default=chat_default, help="wrap the prompt in the chat template")
    parser.add_argument("--max-new-tokens", type=_positive, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=None, help="stop when this string appears (repeatable)")
    parser.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                        help="hidden states on the wire; int8: blockwise quantised (default float32)")
    parser.add_argument("--prompt-lookup", type=_non_negative, default=0, metavar="N",
                        help="speculative decoding: each pass also checks up to N tokens that followed the last "
                             "tokens earlier in the text; same output, faster when the answer repeats the prompt "
                             "(default 0: off; try 7)")


def add_verify_args(parser: argparse.ArgumentParser) -> None:
    """Which nodes' outputs to accept (quantised weights, docs/quantization.md) and their verification
    (client/verify.py, docs/reliability.md)."""
    parser.add_argument("--accept-quant", default="any", choices=["any", "int8", "none"],
                        help="route through nodes with quantised weights: any (default), int8 (int8 or none), "
                             "none (only unquantised nodes: outputs exact to transformers')")
    parser.add_argument("--verify", default="off", choices=["off", "spot", "full"],
                        help="recompute hops on other nodes serving the same layers and ban nodes caught lying: "
                             "spot = a random share of steps, full = every step (default off)")
    parser.add_argument("--verify-fraction", type=float, default=0.25,
                        help="with --verify spot: the share of steps that trigger a check (default 0.25)")


def verify_options(args: argparse.Namespace) -> dict:
    return {"verify": args.verify, "verify_fraction": args.verify_fraction, "accept_quant": args.accept_quant}


def _join(args: argparse.Namespace) -> None:
    from node.server import run_node

    from node.config import parse_size

    if not args.model:
        raise ConfigError("--model is required (on the command line or in the --config file)")
    from node.model.loader import split_revision

    model, revision = split_revision(args.model, args.revision)  # org/name@revision (hub ids only)
    start, end = parse_blocks(args.blocks) if args.blocks else (None, None)
    config = NodeConfig(
        model=model, start=start, end=end, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        max_length=args.max_length, cache_tokens=args.cache_tokens, threads=args.threads, revision=revision,
        lean=not args.no_lean, pack=not args.no_pack, batch_wait=args.batch_wait_ms / 1000, quant=args.quant, name=args.name, announce=args.announce, identity=args.identity, bootstrap=bootstrap_list(args.bootstrap),
        mdns=not args.no_mdns, mdns_interface=args.mdns_interface, num_blocks=args.num_blocks,
        memory_bytes=parse_size(args.memory) if args.memory else None, throughput=args.throughput,
        heartbeat=args.heartbeat, ttl=args.ttl, rebalance=not args.no_rebalance,
        rebalance_period=args.rebalance_period, drain_timeout=args.drain_timeout,
        session_idle_timeout=args.session_idle_timeout, metrics_port=args.metrics_port or None,
        progress=sys.stderr.isatty(), adapters=_adapter_specs(args.adapter), **trust_options(args),
        **_limit_options(args), **_relay_options(args),
    )
    asyncio.run(run_node(config))


def _adapter_specs(values: list[str]) -> tuple[tuple[str, str], ...]:
    """--adapter NAME=PATH values (from the command line or the --config file's `adapter` list)."""
    from node.model.lora import parse_adapter_spec

    try:
        return tuple(parse_adapter_spec(value) for value in values)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _generate(args: argparse.Namespace) -> None:
    from client.model import DistributedModelForCausalLM
    from client.textgen import generate_text, load_tokenizer

    peers = [p.strip() for p in (args.peers or "").split(",") if p.strip()]
    model = DistributedModelForCausalLM.from_pretrained(args.model, config=_client_config(args, peers))
    try:
        if args.prompt_weights:
            from client.finetune import load_prompts

            load_prompts(model, args.prompt_weights)
        tokenizer = load_tokenizer(args.model)
        result = generate_text(
            model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop,
            out=None if args.json else sys.stdout, prompt_lookup=args.prompt_lookup,
        )
    finally:
        model.close()
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        passes = f" in {result.passes} passes" if args.prompt_lookup and result.passes else ""
        print(f"\n[{len(result.token_ids)} tokens{passes}, {result.decode_tokens_per_s:.1f} tokens/s decode]", file=sys.stderr)


def _client_config(args: argparse.Namespace, peers: list[str]):
    from client.config import ClientConfig

    return ClientConfig(peers=tuple(peers), bootstrap=bootstrap_list(args.bootstrap), mdns=not args.no_mdns,
                        mdns_interface=args.mdns_interface, wire_dtype=args.wire_dtype, push=not args.no_push,
                        prefill_chunk=args.prefill_chunk, adapter=getattr(args, "adapter", None), **trust_options(args),
                        **verify_options(args))


def _swarm_key(args: argparse.Namespace) -> None:
    from node.rpc.security import SwarmKey

    try:
        SwarmKey.generate().write(args.file)
    except FileExistsError:
        raise ConfigError(f"{args.file} exists already; choose another file (keys are never overwritten)") from None
    print(f"wrote a new swarm key to {args.file}: give it to every node and client of the swarm (--swarm-key)")


def _status(args: argparse.Namespace) -> None:
    from rich.console import Console

    from client.status import as_json, collect, group_by_model, render
    from node.swarm.membership import SwarmConfig

    bootstrap = bootstrap_list(args.bootstrap)
    if args.no_mdns and not bootstrap:
        raise ConfigError("--no-mdns needs at least one --bootstrap address")
    config = SwarmConfig(bootstrap=bootstrap, mdns=not args.no_mdns, mdns_interface=args.mdns_interface)
    from node.rpc.security import load_security

    security = load_security(**trust_options(args))
    views = group_by_model(asyncio.run(collect(config, args.wait, security)))
    if args.json:
        print(json.dumps(as_json(views), indent=1))
    else:
        render(views, Console())
    if not views or any(view.missing() for view in views):
        raise SystemExit(1)


def _prepare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from node.model.embedded import DEFAULT_DIR, prepare_embedded_model

    print(prepare_embedded_model(Path(args.out) if args.out else DEFAULT_DIR))


def _demo(args: argparse.Namespace) -> None:
    from node.demo import run_demo

    run_demo(args)


# Errors that are the user's to fix: one line, exit code 2, no traceback. Named by module so that a command
# that never imports torch (proxy, swarm-key) does not import it just to name them: an error can only
# come from a module that was imported.
_USER_ERRORS = (
    ("node.config", "ConfigError"), ("node.model.errors", "ModelLoadError"), ("client.transport", "PeerError"),
    ("client.routing", "MissingLayersError"), ("node.launcher", "NodeStartError"), ("node.swarm.identity", "IdentityError"),
    ("node.rpc.security", "SecurityError"), ("client.verify", "VerificationError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return (*loaded, NotImplementedError, ValueError, MemoryError, OSError)


def main(argv: list[str] | None = None) -> int:
    words = [word for word in (sys.argv[1:] if argv is None else argv) if not word.startswith("-")]
    parser = build_parser(words[0] if words else None)
    args = parser.parse_args(argv)
    if args.command == "join" and args.config:
        argv = sys.argv[1:] if argv is None else argv
        try:
            args = join_args(argv[argv.index("join") + 1:])
        except ConfigError as error:
            print(f"potluck join: error: {error}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG" and args.command not in ("proxy", "swarm-key"):  # the two that need no transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    handlers = {"join": _join, "generate": _generate, "demo": _demo, "prepare-model": _prepare, "status": _status,
                "swarm-key": _swarm_key}
    for module, _, runs in _MODULE_COMMANDS:
        for command, run in runs.items():
            if command == args.command:
                handlers[command] = getattr(importlib.import_module(module), run)
    try:
        handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        print(f"potluck {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
