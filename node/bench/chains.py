"""Helpers shared by the benchmarks that compare chains side by side (bench-relay, bench-trust), and a free
loopback port for the ones that start servers of their own (bench-swarm, bench-perf's llama.cpp)."""

from __future__ import annotations

import argparse
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from node.bench.basic import local_model_folder


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a process that cannot bind port 0 and say which)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_chain_bench_args(parser: argparse.ArgumentParser) -> None:
    """--model, --nodes, --new-tokens, --rounds and --threads, as every side-by-side chain benchmark has them."""
    parser.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    parser.add_argument("--nodes", type=int, default=3, help="nodes per chain (default 3)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per measurement (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating between the chains (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per node (default: all cores)")


def chain_bench_model(args: argparse.Namespace, command: str) -> Path:
    """The --model folder of a chain benchmark, once its counts are checked."""
    model = local_model_folder(args.model, command)
    if args.nodes < 1 or args.new_tokens < 2 or args.rounds < 1:
        raise ValueError("need --nodes >= 1, --new-tokens >= 2 and --rounds >= 1")
    return model


def decode_ms(client, ids: torch.Tensor, new_tokens: int, exact_length: bool = True) -> tuple[float, torch.Tensor]:
    """Decode ms per token of a greedy `generate` after a warm-up (its time to one token subtracted), and its ids.

    `exact_length` keeps generating until `new_tokens` even past EOS."""
    client.generate(ids, max_new_tokens=2, do_sample=False)  # warm the route and the caches
    started = time.perf_counter()
    client.generate(ids, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - started
    length = {"min_new_tokens": new_tokens} if exact_length else {}
    started = time.perf_counter()
    out = client.generate(ids, max_new_tokens=new_tokens, **length, do_sample=False)
    elapsed = time.perf_counter() - started
    return (elapsed - prefill) / max(new_tokens - 1, 1) * 1000, out


def alternate_rounds(chains: dict[str, Callable[[], tuple[float, torch.Tensor]]], rounds: int,
                     console: Console) -> tuple[dict[str, list[float]], list[dict[str, torch.Tensor]]]:
    """Run every chain's measurement once per round, in order, for `rounds` rounds (the machine's speed drifts,
    so chains are compared within a round). Each measurement returns (ms per token, output ids); the result is
    every chain's ms per token (one per round) and every round's outputs by chain."""
    ms_per_token: dict[str, list[float]] = {name: [] for name in chains}
    outputs: list[dict[str, torch.Tensor]] = []
    for round_ in range(rounds):
        outputs.append({})
        for name, measure in chains.items():
            ms, outputs[-1][name] = measure()
            ms_per_token[name].append(ms)
            console.print(f"round {round_ + 1}/{rounds} {name}: {ms:.1f} ms/token")
    return ms_per_token, outputs


def stop_chains(clients: dict[str, object], chains: dict[str, list]) -> None:
    """Close every client, then stop every node of every chain."""
    for client in clients.values():
        client.close()
    for chain in chains.values():
        for node in chain:
            node.stop()
