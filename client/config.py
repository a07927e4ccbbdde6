"""The client's configuration: one frozen dataclass, built by the CLI or from keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass

from common.wire.contract import WIRE_FORMATS


@dataclass(frozen=True)
class ClientConfig:
    peers: tuple[str, ...] = ()        # "host:port" of nodes to route through; empty = discover the swarm
    bootstrap: tuple[str, ...] = ()    # "host:port" of known nodes to discover the swarm through
    mdns: bool = True                  # discover nodes on the LAN with zeroconf (when no peers are given)
    mdns_interface: str | None = None  # interface address for mDNS (None = all)
    discovery_timeout: float = 10.0    # seconds to wait for nodes covering every layer
    discovery: str = "auto"            # gossip (bootstrap + mDNS) | dht (hivemind DHT) | auto: dht with initial_peers
    initial_peers: tuple[str, ...] = ()  # DHT: multiaddrs of peers to join through (common/swarm/dht.py)
    device: str = "cpu"                # where embeddings, norm and head run
    dtype: str = "float32"             # dtype of the client's local parts
    wire_dtype: str = "float32"        # hidden states on the wire: float32 | bfloat16 | float16 | int8 (blockwise)
    connect_timeout: float = 10.0      # seconds to wait for a peer's Info
    step_timeout: float = 120.0        # seconds to wait for one hop of one step (prefill included)
    session_timeout: float = 3600.0    # deadline of a whole inference stream
    deadline_floor: float = 1.5        # no step deadline is shorter than this (seconds)
    deadline_factor: float = 10.0      # a step's deadline = factor x (RTT + expected compute), at least the floor
    missing_wait: float = 30.0         # after a failure, how long to wait for a node covering lost layers
    max_failovers: int = 20            # failovers one session may go through before giving up
    ban_seconds: float = 5.0           # first ban of a failed node; doubles with each strike (up to 5 min)
    pack_head: bool = True             # CPU: combined LM-head calls of concurrent generations go through an MKL-packed
                                       # copy of the head (made once they occur; as much memory again as the head)
    exact_head: bool = True  # CPU float32: an LM head whose values are exactly 8-bit blocks or bfloat16 (a GGUF
    # model's, most checkpoints') multiplies from that narrow copy (common/weights/exact.py)
    push: bool = True                  # nodes forward each step along the chain (k+1 trips a token, not 2k)
    convoys: bool = True               # with push: concurrent generations in this process step as convoys, so that
                                       # each node runs them in one pass (common/wire/convoy.py)
    prefill_chunk: int = 0             # with push: prompts of 2x this many tokens or more go down the chain in
                                       # chunks, pipelined across nodes (0 = off; at most 8 chunks)
    accept_quant: str = "any"          # nodes whose weights may be quantised: any | int8 (int8 or none) | none
                                       # (only exact, unquantised nodes); docs/quantization.md
    accept_numerics: str = "any"       # nodes whose products may run in llama.cpp's numerics (`--numerics fast`):
                                       # any | exact (only nodes whose products are exact); docs/performance.md
    head_numerics: str = "exact"       # the exact head's products: exact, or fast (llama.cpp's numerics, as a node's
                                       # `--numerics fast`: 8-bit activations, integer dot products; q4/q8 heads)
    adapter: str | None = None         # LoRA adapter the nodes apply (one they serve: `potluck join --adapter`);
                                       # None = the base model. Routing uses only nodes that serve it
    weights: str = "match"             # match: only nodes announcing the model's weights fingerprint (from the
                                       # client's files; without them: most nodes') | any: the config hash only
    unfingerprinted: bool = False      # with match: also nodes whose records carry no fingerprint (older nodes)
    model_cache: str = "~/.cache/potluck/models"  # client files fetched from nodes, by fingerprint (client/fetch.py)
    verify: str = "off"                # recompute hops on other nodes: off | spot (some steps) | full (every step)
    verify_fraction: float = 0.25      # spot: the share of steps that trigger a check (client/verify.py)
    # -- trust (docs/reliability.md) ----------------------------------------------------------------
    swarm_key: str | None = None       # the private swarm's key file; None = the public swarm
    tls: str = "off"                   # off | auto (pin each node's identity-endorsed certificate) | ca (--tls-ca)
    tls_ca: str | None = None          # PEM roots for nodes' certificates (tls="ca")
    tls_server_name: str | None = None  # the name those certificates are issued to (default: the dialed host)

    @property
    def uses_dht(self) -> bool:
        """Discovery through the hivemind DHT (common/swarm/dht.py) rather than gossip and mDNS."""
        return self.discovery == "dht" or (self.discovery == "auto" and bool(self.initial_peers))

    def dht_config(self):
        """The common.swarm.dht.DhtConfig of this client (a peer nobody dials), or None with gossip."""
        if not self.uses_dht:
            return None
        from common.swarm.dht import DhtConfig

        return DhtConfig(initial_peers=self.initial_peers, host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True)

    def security(self):
        """The common.wire.security.Security these trust fields describe (reads the key and CA files)."""
        from common.wire.security import load_security

        return load_security(self.swarm_key, self.tls, tls_ca=self.tls_ca, tls_server_name=self.tls_server_name)

    def __post_init__(self) -> None:
        if self.wire_dtype not in WIRE_FORMATS:
            raise ValueError(f"wire_dtype {self.wire_dtype!r} is not one of {', '.join(WIRE_FORMATS)}")
        if self.accept_quant not in ("any", "int8", "none"):
            raise ValueError(f"accept_quant {self.accept_quant!r} is not one of any, int8, none")
        if self.accept_numerics not in ("any", "exact"):
            raise ValueError(f"accept_numerics {self.accept_numerics!r} is not one of any, exact")
        if self.head_numerics not in ("exact", "fast"):
            raise ValueError(f"head_numerics {self.head_numerics!r} is not one of exact, fast")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not 0 < len(self.adapter) <= 64):
            raise ValueError(f"adapter {self.adapter!r}: give the name a node serves it under (1-64 characters)")
        if self.weights not in ("match", "any"):
            raise ValueError(f"weights {self.weights!r} is not one of match, any")
        if self.verify not in ("off", "spot", "full"):
            raise ValueError(f"verify {self.verify!r} is not one of off, spot, full")
        if not 0 < self.verify_fraction <= 1:
            raise ValueError(f"verify_fraction {self.verify_fraction} is not within (0, 1]")
        if self.prefill_chunk < 0:
            raise ValueError("prefill_chunk must be >= 0 (0 turns pipelined prefill off)")
        if self.discovery not in ("auto", "gossip", "dht"):
            raise ValueError(f"discovery {self.discovery!r} is not one of auto, gossip, dht")
        if self.initial_peers and self.discovery == "gossip":
            raise ValueError("initial peers are DHT peers: drop them, or use discovery dht (or auto)")
        if self.discovery == "dht" and not self.initial_peers and not self.peers:
            raise ValueError("discovery dht needs initial peers (--initial-peers: multiaddrs a node printed)")
        if not self.peers and not self.bootstrap and not self.mdns and not self.uses_dht:
            raise ValueError("nothing to find nodes with: give peers, bootstrap nodes, initial peers, or leave mDNS on")
        for name in ("connect_timeout", "step_timeout", "session_timeout", "discovery_timeout", "deadline_floor",
                     "deadline_factor", "ban_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
