"""`potluck bench-perf`'s settings and results: what node/bench/perf.py measures and node/bench/perf_report.py
renders."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from node.bench.batch_compute import BatchCompute
from node.bench.llamacpp import BatchedRun, LlamaSide


@dataclass(frozen=True)
class PerfSettings:
    model: Path
    prompt_tokens: int = 32                      # prompt of the decode runs
    new_tokens: int = 48                         # tokens per decode run
    prefill_tokens: int = 512                    # prompt of the prefill runs
    repeats: int = 3                             # timed runs per configuration (median reported)
    node_counts: tuple[int, ...] = (1, 2, 3)
    delays_ms: tuple[float, ...] = (10.0, 50.0)  # one-way delay per hop for the simulated WAN
    wan_tokens: int = 16
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    concurrency_tokens: int = 24
    threads: int = 0                             # torch threads here and per node (0: every core)
    wan_threads: int = 1                         # torch threads per node of the WAN chain (0: as threads)
    llama_cpp: Path | None = None                # a llama.cpp build (deploy/llamacpp.sh): run it side by side
    # GGUF files of the same weights for llama.cpp, the one the swarm serves first (for the demo: its Q4_1 file)
    llama_gguf: tuple[Path, ...] = ()
    llama_served: Path | None = None             # which of them the swarm serves, value for value
    out: Path | None = None
    plot: Path | None = None
    command: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.prompt_tokens >= 1, "--prompt-tokens must be at least 1"),
            (self.new_tokens >= 2, "--new-tokens must be at least 2"),
            (self.prefill_tokens >= 1, "--prefill-tokens must be at least 1"),
            (self.repeats >= 1, "--repeats must be at least 1"),
            (all(n >= 1 for n in self.node_counts) and self.node_counts, "--nodes needs counts >= 1"),
            (all(d >= 0 for d in self.delays_ms), "--delays-ms must not be negative"),
            (all(c >= 1 for c in self.concurrency) and self.concurrency, "--concurrency needs counts >= 1"),
            (self.threads >= 0 and self.wan_threads >= 0, "--threads and --wan-threads must not be negative"),
            ((self.llama_cpp is None) == (not self.llama_gguf),
             "--llama-cpp needs a GGUF file: --llama-gguf, or a model folder made from one (potluck prepare-model)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def torch_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass
class Speed:
    label: str
    decode_tps: list[float]
    tokens: list[int]
    reference_tps: list[float] = field(default_factory=list)  # transformers, timed alternately with these runs

    @property
    def median(self) -> float:
        return statistics.median(self.decode_tps)

    @property
    def ratio(self) -> float:
        """Against the transformers runs interleaved with this system's (the machine drifts between systems)."""
        return self.median / statistics.median(self.reference_tps) if self.reference_tps else float("nan")


@dataclass
class WanResult:
    delay_ms: float
    push: bool
    decode_tps: float
    limit_tps: float
    limit_proxied_tps: float = float("nan")  # the limit with the compute measured through 0 ms proxies

    @property
    def share(self) -> float:
        return self.decode_tps / self.limit_tps

    @property
    def share_proxied(self) -> float:
        return self.decode_tps / self.limit_proxied_tps


@dataclass
class PerfResult:
    settings: PerfSettings
    machine: dict[str, str]
    local: Speed
    swarms: list[Speed] = field(default_factory=list)
    wan: list[WanResult] = field(default_factory=list)
    # (sessions, aggregate tok/s, steps/pass, tok/s while every session decodes: `steady_decode`)
    concurrency: list[tuple[int, float, float, float]] = field(default_factory=list)
    concurrency_plain: tuple[int, float, float, float] | None = None  # the same, 8 sessions (or the most), no convoys
    # llama-batched-bench on the served file, a run per round (sessions -> runs), taking turns with the swarm's rounds
    llama_batched: dict[int, list[BatchedRun]] = field(default_factory=dict)
    concurrency_runs: dict[int, list[float]] = field(default_factory=dict)  # sessions -> aggregate tok/s of each round
    # one session with a batch of N rows (one generate call, `batched_speed`), in the same rounds: N -> (aggregate
    # tok/s, tok/s from first to last new tokens) of each round, and whether the first round's rows equal
    # transformers' tokens for each prompt alone
    batched: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    batched_exact: dict[int, bool] = field(default_factory=dict)
    settle_s: list[float] = field(default_factory=list)  # seconds before each one-session round (settle_alone)
    # what batching gives when only the computation takes time, exact and dense (node/bench/batch_compute.py)
    batch_compute: list[BatchCompute] = field(default_factory=list)
    prefill_local_s: float = 0.0
    prefill_swarm_s: float = 0.0
    rss_node_mb: float = 0.0
    rss_node_now_mb: float = 0.0
    rss_whole_mb: float = 0.0
    llama: list[LlamaSide] = field(default_factory=list)  # llama.cpp side by side (--llama-cpp), a file each
    node_span: tuple[int, int] = (0, 0)
    node_exact: dict[str, int] = field(default_factory=dict)  # the first node's matrices by exact form (model/exact.py)
    num_layers: int = 0
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def swarm(self, label: str) -> Speed | None:
        return next((s for s in self.swarms if s.label == label), None)
