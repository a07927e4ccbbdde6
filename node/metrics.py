"""Prometheus metrics of one node: what it served, how fast, its cache, its traffic, its errors.

Each node holds its own `CollectorRegistry` (never prometheus_client's process-global one): tests
run several nodes in one process. Counters are bumped on the hot path (a lock and an add each);
gauges are read only when /metrics is scraped."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# seconds: one decode step on a small span (~1 ms) up to a long prefill on a slow CPU
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class CacheView:
    """What the cache gauges read at scrape time (callables: the executor changes when the node moves)."""

    sessions: Callable[[], int]
    used_tokens: Callable[[], int]      # tokens held in the caches now (batch x position per session)
    reserved_tokens: Callable[[], int]  # tokens reserved by open sessions (batch x max_length each)
    free_tokens: Callable[[], int]      # budget minus reserved
    bytes_per_token: Callable[[], int]  # KV bytes of one token over the span's layers


def process_memory(pid: int | str = "self") -> tuple[int, int]:
    """(resident, peak resident) bytes of a process: VmRSS and VmHWM of /proc/<pid>/status; (0, 0) where there is
    no such file (not Linux, or the process is gone)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, amount, *_ = line.split()
                    values[name] = int(amount) * 1024
    except OSError:
        return 0, 0
    return values.get("VmRSS:", 0), values.get("VmHWM:", 0)


@dataclass(frozen=True)
class MemoryView:
    """A node's memory in its parts: the span's weights as held, its KV caches as allocated, and the runtime's
    baseline (resident before the weights were read); with the process's resident and peak bytes now."""

    weights: Callable[[], int]   # bytes the span's weights hold (their stored forms)
    kv_cache: Callable[[], int]  # bytes the sessions' KV caches hold now (they grow with use)
    baseline: int                # resident bytes of the process before it read any weight

    def snapshot(self) -> dict[str, int]:
        resident, peak = process_memory()
        return {"weights": self.weights(), "kv_cache": self.kv_cache(), "baseline": self.baseline,
                "resident": resident, "peak": peak}


MEMORY_PARTS = ("weights", "kv_cache", "baseline", "resident", "peak")


class NodeMetrics:
    """The node's metrics in its own registry; the servicer records, `serve` exposes them over HTTP."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.steps = Counter("potluck_steps", "Inference steps served", ["kind"], registry=r)
        self.step_seconds = Histogram("potluck_step_seconds", "Time to compute one inference step", ["kind"],
                                      buckets=STEP_BUCKETS, registry=r)
        self.forwards = Counter("potluck_forwards", "Stateless forward passes served", registry=r)
        self.bytes_received = Counter(
            "potluck_hidden_bytes_received", "Hidden-state bytes received in steps and forwards", registry=r
        )
        self.bytes_sent = Counter(
            "potluck_hidden_bytes_sent", "Hidden-state bytes sent in steps and forwards", registry=r
        )
        self.handovers = Counter("potluck_push_handovers", "Step outputs this node pushed to the next hop, by outcome",
                                 ["outcome"], registry=r)
        self.errors = Counter("potluck_errors", "Requests ended with a gRPC error status", ["code"], registry=r)
        self.sessions = Gauge("potluck_sessions_active", "Open inference sessions", registry=r)
        self.cache_tokens = Gauge(
            "potluck_kv_cache_tokens",
            "KV cache tokens: used (held), reserved, free (budget left)",
            ["state"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "potluck_kv_cache_bytes",
            "KV cache bytes (estimated from the config: tokens x 2 x layers x kv heads x head dim x dtype size)",
            ["state"],
            registry=r,
        )
        self.memory = Gauge(
            "potluck_memory_bytes",
            "Node memory: weights (as held), kv_cache (allocated), baseline (runtime before weights), resident, peak",
            ["part"],
            registry=r,
        )
        # label children resolved once: the hot path does no label lookups
        self._step_count = {kind: self.steps.labels(kind=kind) for kind in ("prefill", "decode")}
        self._step_time = {kind: self.step_seconds.labels(kind=kind) for kind in ("prefill", "decode")}

    # -- recording (hot path) ---------------------------------------------------------------
    def step(self, tokens: int, seconds: float, received: int, sent: int) -> None:
        kind = "decode" if tokens == 1 else "prefill"
        self._step_count[kind].inc()
        self._step_time[kind].observe(seconds)
        self.bytes_received.inc(received)
        self.bytes_sent.inc(sent)

    def forward(self, received: int, sent: int) -> None:
        self.forwards.inc()
        self.bytes_received.inc(received)
        self.bytes_sent.inc(sent)

    def handover(self, ok: bool) -> None:
        self.handovers.labels(outcome="ok" if ok else "failed").inc()

    def error(self, code_name: str) -> None:
        self.errors.labels(code=code_name).inc()

    # -- scrape-time gauges ------------------------------------------------------------------
    def watch(self, view: CacheView) -> None:
        self.sessions.set_function(view.sessions)
        tokens = {"used": view.used_tokens, "reserved": view.reserved_tokens, "free": view.free_tokens}
        for state, read in tokens.items():
            self.cache_tokens.labels(state=state).set_function(read)
            self.cache_bytes.labels(state=state).set_function(lambda read=read: read() * view.bytes_per_token())

    def watch_memory(self, read: Callable[[], dict[str, int]]) -> None:
        """Memory gauges read from `read()` (MemoryView.snapshot, or {} before the span is loaded) at scrape time."""
        for part in MEMORY_PARTS:
            self.memory.labels(part=part).set_function(lambda part=part: read().get(part, 0))

    # -- exposition --------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics over HTTP on `host:port` (0 = a free port) on a daemon thread."""
        try:
            httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from error
        server = MetricsServer(httpd, thread)
        log.info("metrics on http://%s/metrics", server.address(host))
        return server


class MetricsServer:
    def __init__(self, httpd, thread):
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def address(self, host: str) -> str:
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
