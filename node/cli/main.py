"""`potluck` command line: join, generate, status, demo, eval, finetune, api, doctor, bench*, prepare-model.

The only place that reads argv and configures logging. Each command lives in its own module with an
`add_*_parser(commands)` and a run function; `COMMANDS` names them with plain imports (inside small loader
functions, so a command imports only its own module: `potluck join` never imports the benchmarks or the API)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from node.config import ConfigError

log = logging.getLogger("potluck")

Runner = Callable[[argparse.Namespace], None]


@dataclass(frozen=True)
class Command:
    """Command names and the loader of their module: returns (add_parser(commands), {name: run(args)})."""

    names: tuple[str, ...]
    load: Callable[[], tuple[Callable, dict[str, Runner]]]
    summary: str  # its line in `potluck --help` (which loads no command's module)


def _join():
    from node.cli import join

    return join.add_join_parser, {"join": join.run_join}


def _generate():
    from node.cli import generate

    return generate.add_generate_parser, {"generate": generate.run_generate}


def _demo():
    from node.cli import demo

    return demo.add_demo_parser, {"demo": demo.run_demo}


def _status():
    from node.cli import status

    return status.add_status_parser, {"status": status.run_status}


def _swarm_key():
    from node.cli import keys

    return keys.add_swarm_key_parser, {"swarm-key": keys.run_swarm_key}


def _prepare():
    from node.cli import demo

    return demo.add_prepare_parser, {"prepare-model": demo.run_prepare}


def _bench():
    from node.bench import basic

    return basic.add_bench_parser, {"bench": basic.run_bench}


def _bench_perf():
    from node.bench import perf

    return perf.add_perf_bench_parser, {"bench-perf": perf.run_perf_bench_cli}


def _bench_swarm():
    from node.bench import swarm

    return swarm.add_swarm_bench_parser, {"bench-swarm": swarm.run_swarm_bench_cli}


def _bench_dht():
    from node.bench import dht

    return dht.add_dht_bench_parser, {"bench-dht": dht.run_dht_bench_cli}


def _bench_recovery():
    from node.bench import recovery

    return recovery.add_recovery_bench_parser, {"bench-recovery": recovery.run_recovery_bench_cli}


def _bench_wire():
    from node.bench import wire

    return wire.add_wire_bench_parser, {"bench-wire": wire.run_wire_bench_cli}


def _proxy():
    from node.cli import proxy

    return proxy.add_proxy_parser, {"proxy": proxy.run_proxy_cli}


def _bench_trust():
    from node.bench import trust

    return trust.add_trust_bench_parser, {"bench-trust": trust.run_trust_bench_cli}


def _bench_relay():
    from node.bench import relay

    return relay.add_relay_bench_parser, {"bench-relay": relay.run_relay_bench_cli}


def _bench_abuse():
    from node.bench import abuse

    return abuse.add_abuse_bench_parser, {"bench-abuse": abuse.run_abuse_bench_cli}


def _bench_soak():
    from node.bench import soak

    return soak.add_soak_bench_parser, {"bench-soak": soak.run_soak_bench_cli}


def _bench_prefill():
    from node.bench import prefill

    return prefill.add_prefill_bench_parser, {"bench-prefill": prefill.run_prefill_bench_cli}


def _bench_quant():
    from node.bench import quant

    return quant.add_quant_bench_parser, {"bench-quant": quant.run_quant_bench_cli}


def _bench_memory():
    from node.bench import memory_cli

    return memory_cli.add_memory_bench_parser, {"bench-memory": memory_cli.run_memory_bench_cli}


def _bench_compile():
    from node.bench import compile as compile_bench

    return compile_bench.add_compile_bench_parser, {"bench-compile": compile_bench.run_compile_bench_cli}


def _bench_placement():
    from node.bench import placement_sim

    return placement_sim.add_placement_bench_parser, {"bench-placement": placement_sim.run_placement_bench_cli}


def _bench_speculate():
    from node.bench import speculate

    return speculate.add_speculate_bench_parser, {"bench-speculate": speculate.run_speculate_bench_cli}


def _api():
    from node.cli import api

    return api.add_api_parser, {"api": api.run_api_cli, "dashboard": api.run_api_cli}


def _doctor():
    from node.cli import doctor

    return doctor.add_doctor_parser, {"doctor": doctor.run_doctor_cli}


def _eval():
    from node.cli import eval as eval_cli

    return eval_cli.add_eval_parser, {"eval": eval_cli.run_eval_cli}


def _finetune():
    from node.cli import finetune

    return finetune.add_finetune_parser, {"finetune": finetune.run_finetune_cli}


COMMANDS = (
    Command(("join",), _join, "serve a span of a model's layers"),
    Command(("generate",), _generate, "generate text through a chain of nodes"),
    Command(("demo",), _demo, "start a local 3-node swarm on the embedded model and chat through it"),
    Command(("status",), _status, "show the swarm: nodes, spans, coverage, warnings"),
    Command(("swarm-key",), _swarm_key, "make a private swarm's key"),
    Command(("prepare-model",), _prepare, "write the embedded SmolLM2 model as a safetensors folder"),
    Command(("bench",), _bench, "benchmark local transformers vs a local swarm, same run"),
    Command(("bench-perf",), _bench_perf, "decode, WAN, concurrency, prefill and memory against transformers"),
    Command(("bench-swarm",), _bench_swarm, "benchmark joining, discovery and gossip traffic"),
    Command(("bench-dht",), _bench_dht, "benchmark the DHT backend's cost per node with real DHT peers"),
    Command(("bench-recovery",), _bench_recovery, "benchmark recovery after a node is SIGKILLed mid-generation"),
    Command(("bench-wire",), _bench_wire, "benchmark wire formats: bytes per token per hop, error, exactness"),
    Command(("proxy",), _proxy, "forward TCP to a node with an added one-way delay (simulated WAN)"),
    Command(("bench-trust",), _bench_trust, "benchmark the cost of a swarm key and TLS on decode speed"),
    Command(("bench-relay",), _bench_relay, "benchmark decode speed through a relay against direct"),
    Command(("bench-abuse",), _bench_abuse,
            "an honest client's latency with and without strangers attacking"),
    Command(("bench-soak",), _bench_soak, "soak a 3-node swarm: concurrent clients, disconnects, a restart"),
    Command(("bench-prefill",), _bench_prefill, "benchmark pipelined (chunked) prefill against one step"),
    Command(("bench-quant",), _bench_quant, "benchmark --quant int8/nf4: memory per layer, decode speed, perplexity"),
    Command(("bench-memory",), _bench_memory,
            "benchmark a node's memory: weights, cache, baseline, peak and final, per model and span"),
    Command(("bench-compile",), _bench_compile,
            "time torch.compile (CUDA graphs on a GPU) against the eager decode step"),
    Command(("bench-speculate",), _bench_speculate,
            "benchmark speculative decoding by prompt lookup: swarm vs transformers"),
    Command(("bench-placement",), _bench_placement,
            "simulate 100 nodes joining at once: herding, reloads, coverage; time routing"),
    Command(("api", "dashboard"), _api,
            "serve an OpenAI-compatible HTTP API backed by the swarm, and its dashboard at /"),
    Command(("doctor",), _doctor, "check this machine before joining: memory, disk, clock, reachability"),
    Command(("eval",), _eval, "perplexity of a text through the swarm (and, with --local, on this machine)"),
    Command(("finetune",), _finetune, "train a soft prompt through the swarm (the nodes' layers stay frozen)"),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with `command`, only that one's (the others get an empty parser with their summary),
    so that `potluck join` imports neither the benchmarks nor the API, and `potluck --help` (command "") no
    command's module at all. A command's module defines its flags without importing torch, transformers or grpc
    (those come with its run function), so parsing and its errors take a fraction of a second."""
    parser = argparse.ArgumentParser(prog="potluck", description="Peer-to-peer LLM inference on pooled hardware.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS:
        if command is None or command in entry.names:
            add_parser, _ = entry.load()
            add_parser(commands)
        else:
            commands.add_parser(entry.names[0], aliases=list(entry.names[1:]), help=entry.summary)
    return parser


def _runner(command: str) -> Runner:
    for entry in COMMANDS:
        if command in entry.names:
            return entry.load()[1][command]
    raise KeyError(command)


# Errors that are the user's to fix: one line, exit code 2, no traceback. Named by module so that a command
# that never imports torch (proxy, swarm-key) does not import it just to name them: an error can only
# come from a module that was imported.
_USER_ERRORS = (
    ("node.config", "ConfigError"), ("common.weights.errors", "ModelLoadError"), ("client.transport", "PeerError"),
    ("client.routing", "MissingLayersError"), ("node.launcher", "NodeStartError"),
    ("common.swarm.identity", "IdentityError"), ("common.wire.security", "SecurityError"),
    ("client.verify", "VerificationError"), ("common.swarm.dht", "DhtUnavailable"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return (*loaded, NotImplementedError, ValueError, MemoryError, OSError)


def main(argv: list[str] | None = None) -> int:
    words = [word for word in (sys.argv[1:] if argv is None else argv) if not word.startswith("-")]
    parser = build_parser(words[0] if words else "")
    args = parser.parse_args(argv)
    if args.command == "join" and args.config:
        from node.cli.join import join_args

        argv = sys.argv[1:] if argv is None else argv
        try:
            args = join_args(argv[argv.index("join") + 1:])
        except ConfigError as error:
            print(f"potluck join: error: {error}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG" and args.command not in ("proxy", "swarm-key", "status"):  # need no transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        _runner(args.command)(args)
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
