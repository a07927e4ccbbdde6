"""The node's configuration: one frozen dataclass, built by the CLI (or by tests)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.swarm.records import TTL_CAP


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


def parse_blocks(text: str) -> tuple[int, int]:
    """'10:20' -> (10, 20): the half-open span of global layer indices."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ConfigError(f"--blocks {text!r}: expected START:END, e.g. 0:10") from None
    if not 0 <= start < end:
        raise ConfigError(f"--blocks {text!r}: need 0 <= START < END")
    return start, end


_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, flag: str = "--memory") -> int:
    """'4GB' -> 4_000_000_000; '512MiB' -> 536870912."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"{flag} {text!r}: expected a size like 4GB, 512MiB or 2000000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def read_config_file(path: str) -> dict:
    """The top-level table of a TOML file (`potluck join --config FILE`)."""
    import tomllib

    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config {path}: not valid TOML: {error}") from None


@dataclass(frozen=True)
class NodeConfig:
    model: str                      # local model folder or hub id ("org/name")
    start: int | None = None        # first layer served (global index); None = chosen by placement
    end: int | None = None          # one past the last layer served
    host: str = "127.0.0.1"         # address to bind
    port: int = 0                   # 0 = any free port; the bound port is printed when ready
    announce: str | None = None     # HOST:PORT others should dial (default: the bound address)
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"             # auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on GPUs)
    max_length: int = 8192          # longest session (tokens per sequence) this node accepts
    cache_tokens: int = 65536       # KV cache budget over all sessions, in tokens (batch x max_length each)
    max_batch: int = 64             # largest batch in one session or forward
    batch_wait: float = 0.005       # seconds a pass waits for other active sessions' steps (node/runtime/executor.py)
    threads: int = 0                # torch intra-op threads on CPU; 0 = torch's default
    lean: bool = True               # the lean runtime (fused weights, static cache, batching) where the family has one
    exact: bool = True              # CPU float32: hold matrices in the narrow form they are exact in (model/exact.py)
    numerics: str = "exact"         # exact | fast: the exact forms' q4/q8 products in llama.cpp's numerics (8-bit
                                    # activations, integer dot products): faster, not bit-exact (docs/performance.md)
    pack: bool = True               # CPU float32: pack the lean weights for MKL while passes batch (runtime/layout.py)
    inline_decode: bool = True      # a lone one-token step runs on the event loop's thread (runtime/executor.py)
    quant: str = "none"             # weight-only quantisation of the span's projections: none | int8 | nf4
                                    # (node/model/quant.py, docs/quantization.md); outputs are then not exact
    adapters: tuple[tuple[str, str], ...] = ()  # LoRA adapters served, (name, PEFT folder or hub id) pairs
                                    # (--adapter NAME=PATH; node/model/lora.py); a session picks one by name
    revision: str | None = None     # hub revision (branch, tag or commit)
    name: str = ""                  # a human-friendly name shown by `potluck status`
    grace_seconds: float = 5.0      # how long the final stop waits for calls in flight
    drain_timeout: float = 30.0     # SIGTERM: longest wait for open sessions to move away before exiting
    session_idle_timeout: float = 600.0  # a session with no step for this long is closed (its client is gone)
    session_open_timeout: float = 10.0  # a session opened this long ago that never stepped is closed
    progress: bool = False          # progress bars on stderr while loading and measuring (the CLI: when a terminal)
    metrics_port: int | None = None  # Prometheus /metrics on host:this port; None = off, 0 = any free port
    # -- swarm ------------------------------------------------------------------------------------
    identity: str | None = None     # ed25519 key file (created on first run); None = a default slot
    bootstrap: tuple[str, ...] = ()  # HOST:PORT of known nodes to join through
    mdns: bool = True               # announce and discover on the LAN with zeroconf
    mdns_interface: str | None = None  # interface address for mDNS (default: the bound host if specific)
    num_blocks: int | None = None   # with no --blocks: how many layers to serve (default: what memory allows)
    memory_bytes: int | None = None  # with no --blocks: memory budget for weights + cache (default: free memory)
    throughput: float | None = None  # decode tokens/s to publish instead of measuring
    heartbeat: float = 30.0         # seconds between re-announcements
    ttl: float = 90.0               # record lifetime; a silent node disappears after it (at most 180)
    discovery_wait: float = 1.5     # seconds to listen for the swarm before choosing a span
    discovery: str = "auto"         # gossip (bootstrap + mDNS) | dht (hivemind DHT) | auto: dht with initial_peers
    initial_peers: tuple[str, ...] = ()  # DHT: multiaddrs of peers to join through; none = start a new DHT
    dht_port: int = 0               # DHT: the TCP port its libp2p peer listens on (0 = any; give one to be an
                                    # initial peer others can name)
    dht_refresh: float = 30.0       # DHT: seconds between re-stores of this node's keys; they live 3x as long
    rebalance: bool = True          # move to a better span when coverage becomes uneven (auto-placed nodes)
    rebalance_period: float = 30.0  # mean seconds between rebalancing checks (jittered)
    # -- limits: overload (docs/reliability.md#overload); each refusal is RESOURCE_EXHAUSTED naming its flag ---
    max_sessions: int = 256         # sessions open at once; further opens wait (admission_wait), then are refused
    max_session_tokens: int = 0  # cache tokens one session may reserve (batch x max_length); 0 = the whole budget
    cache_memory: int | None = (
        None  # KV cache budget in bytes; set, it replaces cache_tokens (bytes / KV bytes a token)
    )
    rate_limit: float = 0.0         # requests a second per peer address (token bucket, bursts of 2 s); 0 = off
    admission_wait: float = 2.0     # seconds an open waits for cache or a session slot to free up; 0 = refuse at once
    max_peer_sessions: int = 32     # sessions one peer (caller address) may hold open here; 0 = only --max-sessions
    max_peer_tokens: int = 0        # cache tokens one peer may hold here (reserved as its sessions step); 0 = half
                                    # the cache budget
    # -- trust: private swarms and encryption (docs/reliability.md) --------------------------------
    swarm_key: str | None = None    # swarm key file: every call must prove it; None = the public swarm
    tls: str = "off"                # off | auto (certificate endorsed by the identity) | ca (--tls-cert/--tls-key)
    tls_cert: str | None = None     # PEM certificate chain this node presents (tls="ca")
    tls_key: str | None = None      # its PEM private key
    tls_ca: str | None = None       # PEM roots that other nodes' certificates are checked against (tls="ca")
    tls_server_name: str | None = None  # the name those certificates are issued to (default: the dialed host)
    # -- relays: nodes nobody can reach serve through a reachable peer (docs/relay.md) ----------------
    relay: bool = False             # volunteer as a relay: carry unreachable nodes' connections
    relay_max_nodes: int = 8        # nodes relayed at once; more get RESOURCE_EXHAUSTED
    relay_max_bytes: int = 16 * 2**20  # bytes a second each relayed node may move (both ways); 0 = no limit
    relay_fallback: bool = True     # if peers cannot call this node back, serve through a relay (--no-relay: off)
    relay_via: str | None = None    # HOST:PORT of a relay to serve through, without checking reachability
    # -- what the node dials on a caller's behalf: push targets, probes (node/rpc/dialing.py) ---------
    swarm_scope: str = "auto"       # auto | local (--local-swarm: loopback/private peers may be dialed) | public
                                    # (--public-swarm: global addresses only); auto: local when the node's own
                                    # address and every bootstrap node's are loopback or private

    def __post_init__(self) -> None:
        if (self.start is None) != (self.end is None):
            raise ConfigError("give both ends of the span, or neither")
        if self.start is not None and not 0 <= self.start < self.end:
            raise ConfigError(f"span {self.start}:{self.end}: need 0 <= start < end")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not within 0..65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics port {self.metrics_port} is not within 0..65535")
        if self.max_length < 1 or self.cache_tokens < 1 or self.max_batch < 1:
            raise ConfigError("max_length, cache_tokens and max_batch must be positive")
        if not 0 <= self.batch_wait <= 1:
            raise ConfigError(f"batch_wait must be within 0..1 s, got {self.batch_wait}")
        if self.quant not in ("none", "int8", "nf4"):
            raise ConfigError(f"--quant {self.quant!r}: expected none, int8 or nf4")
        if self.numerics not in ("exact", "fast"):
            raise ConfigError(f"--numerics {self.numerics!r}: expected exact or fast")
        if self.threads < 0:
            raise ConfigError("threads must be >= 0")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError("--num-blocks must be at least 1")
        if not 0 < self.heartbeat < self.ttl:
            raise ConfigError("need 0 < --heartbeat < --ttl")
        if self.discovery not in ("auto", "gossip", "dht"):
            raise ConfigError(f"--discovery {self.discovery!r}: expected auto, gossip or dht")
        if self.initial_peers and self.discovery == "gossip":
            raise ConfigError("--initial-peers are DHT peers: drop them, or use --discovery dht (or auto)")
        if not 0 <= self.dht_port <= 65535 or not 0 < self.dht_refresh <= 1200:
            raise ConfigError("--dht-port must be within 0..65535 and --dht-refresh within (0, 1200] seconds")
        if self.ttl > TTL_CAP:
            raise ConfigError(f"--ttl {self.ttl:g}: at most {TTL_CAP:g} s (nodes cut longer TTLs to that)")
        self._check_limits()
        self._check_adapters()
        if self.relay_max_nodes < 1 or self.relay_max_bytes < 0:
            raise ConfigError("--relay-max-nodes must be at least 1 and --relay-max-bytes >= 0")
        if self.relay and self.relay_via:
            raise ConfigError("a relay (--relay) serves on its own address; drop --relay-via")
        if self.swarm_scope not in ("auto", "local", "public"):
            raise ConfigError(f"swarm_scope {self.swarm_scope!r}: expected auto, local or public")
        if self.tls not in ("off", "auto", "ca"):
            raise ConfigError(f"--tls {self.tls!r}: expected off, auto or ca")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both --tls-cert and --tls-key, or neither")
        if self.tls == "ca" and self.tls_cert is None:
            raise ConfigError("--tls ca needs --tls-cert and --tls-key")

    def _check_adapters(self) -> None:
        if not self.adapters:
            return
        from node.model.lora import MAX_ADAPTERS, check_name

        names = [name for name, _ in self.adapters]
        for name in names:
            try:
                check_name(name)
            except ValueError as error:
                raise ConfigError(f"--adapter: {error}") from None
        if len(set(names)) != len(names):
            raise ConfigError(f"--adapter: a name is given twice ({', '.join(sorted(names))})")
        if len(names) > MAX_ADAPTERS:
            raise ConfigError(f"--adapter: at most {MAX_ADAPTERS} adapters per node, got {len(names)}")

    def _check_limits(self) -> None:
        if self.max_sessions < 1:
            raise ConfigError("--max-sessions must be at least 1")
        if self.max_session_tokens < 0:
            raise ConfigError("--max-session-tokens must be >= 0 (0: the whole cache budget)")
        if self.cache_memory is not None and self.cache_memory < 1:
            raise ConfigError("--cache-memory must be a positive size")
        if not (0 <= self.rate_limit < float("inf")):
            raise ConfigError("--rate-limit must be >= 0 requests/s (0: off)")
        if not (0 <= self.admission_wait <= 3600):
            raise ConfigError("--admission-wait must be within 0..3600 seconds")
        if self.max_peer_sessions < 0 or self.max_peer_tokens < 0:
            raise ConfigError("--max-peer-sessions and --max-peer-tokens must be >= 0 (0: the default share)")
        if not 0 < self.session_open_timeout < float("inf"):
            raise ConfigError("--session-open-timeout must be a positive number of seconds")

    @property
    def max_rpcs(self) -> int:
        """Calls in flight at once (gRPC refuses more): a stream per session, a push beside each, and room
        for short calls (Info, Gossip, health)."""
        return 2 * self.max_sessions + 64

    @property
    def uses_dht(self) -> bool:
        """Discovery through the hivemind DHT (common/swarm/dht.py) rather than gossip and mDNS."""
        return self.discovery == "dht" or (self.discovery == "auto" and bool(self.initial_peers))

    @property
    def auto_placed(self) -> bool:
        return self.start is None
