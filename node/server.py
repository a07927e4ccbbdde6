"""Start a node: bind, join the swarm, choose (or take) a span, load it, serve, re-balance, leave."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import sys
from dataclasses import dataclass, field, replace

import grpc
import torch
from grpc_health.v1 import health, health_pb2

from common.ports import ensure_free
from common.swarm.dht import DhtConfig, DhtDiscovery, make_discovery, tcp_maddr
from common.swarm.identity import Identity, load_identity
from common.swarm.membership import Membership, SwarmConfig
from common.swarm.placement import Server, Span, choose_span, layers_for_memory, plan_move
from common.swarm.records import NodeState, PeerRecord
from common.weights.dtypes import dtype_name, free_memory, resolve_device, resolve_dtype
from common.weights.errors import ModelLoadError
from common.weights.files import ModelFiles, config_hash
from common.weights.fingerprint import weights_fingerprint
from common.wire.codec import MAX_MESSAGE_BYTES
from common.wire.generated import potluck_pb2 as pb
from common.wire.security import Security, load_security
from node.config import NodeConfig
from node.metrics import CacheView, MemoryView, MetricsServer, NodeMetrics, process_memory
from node.model.compact import exact_formats, span_numerics
from node.model.loader import (
    SpanForm,
    bytes_per_layer,
    load_span,
    loading_bytes,
    release_free_heap,
    stored_dtype,
)
from node.model.quant import weight_bytes
from node.rpc.dialing import DialPolicy, lab_swarm, members_of
from node.rpc.handlers import add_service
from node.rpc.model_files import ModelFileServer
from node.rpc.probe import Prober
from node.rpc.push import Pusher
from node.rpc.quiet import quiet_departed_clients
from node.rpc.ratelimit import RateLimiter
from node.rpc.servicer import NodeIdentity, PotluckServicer, Serving
from node.runtime.executor import Executor
from node.runtime.throughput import Throughput, cached_measure

log = logging.getLogger(__name__)

SERVICE_NAME = "potluck.v1.Potluck"
CACHE_FRACTION = 0.2  # the share of --memory placement leaves for KV caches (layers_for_memory's default)
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second node on a taken port must fail to bind, not share it (common/ports.py)
]


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def advertised_host(host: str) -> str:
    """The address others should dial when the node binds `host`: a wildcard bind advertises the
    address this machine uses for outgoing traffic (found by a UDP connect, which sends nothing)."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    family = socket.AF_INET6 if host == "::" else socket.AF_INET
    probe = "2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1"  # documentation ranges, never contacted
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))
            return sock.getsockname()[0]
    except OSError:
        return "127.0.0.1" if family == socket.AF_INET else "::1"


def _mdns_interface(config: NodeConfig) -> str | None:
    if config.mdns_interface:
        return config.mdns_interface
    return None if config.host in ("0.0.0.0", "::", "") else config.host


@dataclass
class RunningNode:
    config: NodeConfig
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    serving: Serving
    membership: Membership | DhtDiscovery  # gossip, or the DHT (common/swarm/dht.py)
    identity: Identity
    address: str  # the address others dial
    files: ModelFiles
    record: PeerRecord
    device: torch.device
    dtype: torch.dtype
    throughput: Throughput | None = None
    metrics: NodeMetrics | None = None  # None: --metrics-port off
    metrics_server: MetricsServer | None = None
    servicer: PotluckServicer | None = None  # holds the channels pushed steps are forwarded on
    security: Security | None = None  # swarm key and TLS as this node uses them (its certificate included)
    tasks: list[asyncio.Task] = field(default_factory=list)
    relay: object | None = None  # node.relay.join.Relayed while serving through a relay (docs/relay.md)
    baseline: int = 0  # resident bytes before any weight was read (node/metrics.py MemoryView)

    @property
    def executor(self) -> Executor | None:
        return self.serving.executor

    @property
    def span(self) -> Span:
        return Span(self.record.start, self.record.end)

    async def drain(self, timeout: float) -> None:
        """Stop taking sessions, announce DRAINING, finish steps in flight, send open sessions elsewhere.

        Idle sessions are evicted at once (their clients replay them on another node at their next
        step); busy ones after their step. Returns once no session is left, or after `timeout`."""
        self.serving.state = NodeState.DRAINING.value
        for task in self.tasks:
            task.cancel()
        self.record = replace(self.record, state=NodeState.DRAINING)
        try:
            await self.membership.publish(self.record)
        except Exception:
            log.exception("could not announce DRAINING")
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        executor = self.serving.executor
        deadline = asyncio.get_running_loop().time() + timeout
        while executor is not None and len(executor.sessions) and asyncio.get_running_loop().time() < deadline:
            executor.evict([s for s in executor.sessions.all() if not s.busy], "the node is draining")
            await asyncio.sleep(0.05)
        left = len(executor.sessions) if executor is not None else 0
        log.info("drained (%d sessions left)", left)

    async def stop(self, grace: float) -> None:
        """Leave the swarm (OFFLINE at once), finish steps in flight, release everything; never raises early."""
        for task in self.tasks:
            task.cancel()
        try:
            await self.membership.leave()
        except Exception:  # still stop the server
            log.exception("could not announce OFFLINE")
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.relay is not None:
            await self.relay.close()
        if self.servicer is not None:
            await self.servicer.close()
        await self.membership.close()
        if self.serving.executor is not None:
            self.serving.executor.shutdown()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.identity.release()


def _stats(serving: Serving) -> dict:
    executor = serving.executor
    if executor is None:
        return {"load": 0.0, "free_cache_tokens": 0}
    return {"load": float(len(executor.sessions)), "free_cache_tokens": max(executor.sessions.free_tokens, 0)}


def _cache_view(serving: Serving) -> CacheView:
    """The cache gauges' readers, through `serving` (its executor is replaced when the node moves)."""

    def read(get):
        return lambda: get(serving.executor) if serving.executor is not None else 0

    return CacheView(
        sessions=read(lambda e: len(e.sessions)),
        used_tokens=read(lambda e: e.sessions.used_tokens),
        reserved_tokens=read(lambda e: e.sessions.reserved_tokens),
        free_tokens=read(lambda e: max(e.sessions.free_tokens, 0)),
        bytes_per_token=read(lambda e: e.kv_bytes_per_token),
    )


def _memory_view(serving: Serving, weights: int, baseline: int) -> MemoryView:
    """The node's memory parts (node/metrics.py): KV bytes as the lean caches hold them, else as transformers'
    caches hold their tokens."""

    def kv_cache() -> int:
        executor = serving.executor
        if executor is None:
            return 0
        lean = executor.span.lean
        return lean.kv.bytes if lean is not None else executor.sessions.used_tokens * executor.kv_bytes_per_token

    return MemoryView(weights=lambda: weights, kv_cache=kv_cache, baseline=baseline)


def _layer_need(config: NodeConfig, files: ModelFiles, model_config, device: torch.device,
                dtype: torch.dtype) -> tuple[int, int]:
    """(bytes a layer is held in, bytes loading holds for a moment): docs/memory.md."""
    stored = stored_dtype(model_config) if files.gguf is None else None
    exact = config.exact and device.type == "cpu"
    return (bytes_per_layer(model_config, dtype, config.quant, stored, exact),
            loading_bytes(model_config, stored))


def _check_fits(config: NodeConfig, files: ModelFiles, model_config, span: Span, device: torch.device,
                dtype: torch.dtype) -> None:
    """MemoryError, before anything is loaded, if the span's peak does not fit in --memory (with a fifth of it left
    for caches, as placement leaves) or, without --memory, in the memory free now."""
    per_layer, loading = _layer_need(config, files, model_config, device, dtype)
    weights = per_layer * (span.end - span.start)
    runtime = process_memory()[0]
    if config.memory_bytes:
        room, where = int(config.memory_bytes * (1 - CACHE_FRACTION)) - runtime, (
            f"--memory {config.memory_bytes / 1e9:.2f} GB (a fifth kept for caches, {runtime / 1e9:.2f} GB runtime)")
    else:
        room, where = free_memory(device), f"the {free_memory(device) / 1e9:.2f} GB free on {device}"
    if weights + loading > room:
        fits = max(0, (room - loading) // per_layer)
        raise MemoryError(
            f"layers {span.start}:{span.end} of {files.model_id} need {(weights + loading) / 1e9:.2f} GB at peak "
            f"({weights / 1e9:.2f} GB of weights + {loading / 1e9:.2f} GB while loading), more than {where}: "
            f"serve at most {fits} layers here, or use --quant int8")


def _servers(membership: Membership | DhtDiscovery, config_hash: str) -> list[Server]:
    """The nodes placement counts: those serving (or about to serve) this model."""
    return [
        Server(r.node_id, r.start, r.end, r.throughput)
        for r in membership.live(config_hash)
        if r.state in (NodeState.ONLINE, NodeState.JOINING)
    ]


async def _choose_span(config: NodeConfig, membership: Membership | DhtDiscovery, files: ModelFiles, model_config,
                       chash: str, device: torch.device, dtype: torch.dtype) -> Span:
    num_layers = model_config.num_hidden_layers
    if not config.auto_placed:
        if config.end > num_layers:
            raise ModelLoadError(
                f"span {config.start}:{config.end} is not within the model's {num_layers} layers (0:{num_layers})"
            )
        span = Span(config.start, config.end)
        await asyncio.to_thread(_check_fits, config, files, model_config, span, device, dtype)
        return span
    if config.mdns and not config.uses_dht:
        await asyncio.sleep(config.discovery_wait)  # let mDNS answers and their record pulls arrive
    if config.num_blocks is not None:
        length = min(config.num_blocks, num_layers)
    else:
        budget = config.memory_bytes or free_memory(device) // 2
        per_layer, loading = await asyncio.to_thread(_layer_need, config, files, model_config, device, dtype)
        # the peak counts: the runtime now, one layer as read while loading, then the layers as held
        length = layers_for_memory(budget, per_layer, num_layers, fixed_bytes=process_memory()[0] + loading)
        if length < 1:
            raise MemoryError(f"not even one layer of {files.model_id} fits in {budget / 1e9:.2f} GB (with the "
                              f"runtime's {process_memory()[0] / 1e9:.2f} GB and {loading / 1e9:.2f} GB while loading)")
    await membership.pull_all()  # re-read the swarm just before choosing: the freshest view herds least
    servers = _servers(membership, chash)
    span = choose_span(servers, num_layers, length, random.Random())  # a random near-best window: no herd
    log.info("placement chose layers %d:%d (%d known nodes)", span.start, span.end, len(servers))
    return span


async def _load(node: RunningNode, span: Span) -> None:
    """Load `span` (announced as JOINING meanwhile), measure it, and start serving it (ONLINE)."""
    config = node.config
    node.record = replace(node.record, start=span.start, end=span.end, state=NodeState.JOINING)
    await node.membership.publish(node.record, mdns_address=node.address)
    node.serving.state = NodeState.JOINING.value
    form = SpanForm(lean=config.lean, quant=config.quant, exact=config.exact and node.device.type == "cpu",
                    transpose=node.device.type == "cpu", numerics=config.numerics)  # each layer's final form as read
    model, stats = await asyncio.to_thread(load_span, node.files, span.start, span.end, node.device, node.dtype,
                                           config.progress, form)
    if not node.baseline:  # the runtime without weights: measured by the loader just before it read any
        node.baseline = stats.resident_before or process_memory()[0]
    adapters = {}
    if config.adapters:  # LoRA adapters: this span's part of each (node/model/lora.py)
        from node.model.lora import load_adapters

        adapters = await asyncio.to_thread(load_adapters, config.adapters, model, node.files.model_id)
    if config.throughput is not None:
        node.throughput = Throughput(decode=config.throughput, prefill=config.throughput * 8)
    else:
        quant = "" if config.quant == "none" else f"|{config.quant}"
        quant += "".join(f"|{fmt}{count}" for fmt, count in sorted(exact_formats(model).items()))
        quant += "|fast" if span_numerics(model) == "fast" else ""
        key = (f"{node.record.config_hash}|{node.device}|{dtype_name(node.dtype)}{quant}|{span.start}:{span.end}|"
               f"{torch.get_num_threads()}")
        node.throughput = await asyncio.to_thread(cached_measure, model, key, progress=config.progress)
    old = node.serving.executor
    node.serving.executor = Executor(model, cache_tokens=config.cache_tokens, max_length=config.max_length,
                                     max_batch=config.max_batch, cache_memory=config.cache_memory,
                                     max_sessions=config.max_sessions, max_session_tokens=config.max_session_tokens,
                                     admission_wait=config.admission_wait, adapters=adapters,
                                     max_peer_sessions=config.max_peer_sessions,
                                     max_peer_tokens=config.max_peer_tokens, peer_share=0.5,
                                     batch_wait=config.batch_wait, pack=config.pack and node.device.type == "cpu",
                                     inline_decode=config.inline_decode)
    if old is not None:
        old.shutdown()
    node.serving.memory = _memory_view(node.serving, weight_bytes(model), node.baseline).snapshot
    node.record = replace(node.record, state=NodeState.ONLINE, throughput=node.throughput.decode,
                          prefill_throughput=node.throughput.prefill, adapters=tuple(sorted(adapters)),
                          numerics=span_numerics(model),  # what it computes in (fast asked for, no q4/q8: exact)
                          **_stats(node.serving))
    node.serving.throughput, node.serving.prefill_throughput = node.throughput.decode, node.throughput.prefill
    node.serving.state = NodeState.ONLINE.value
    await node.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await node.membership.publish(node.record)


async def _janitor(node: RunningNode) -> None:
    """Close sessions whose client went silent (a cancelled stream is freed at once; this catches the rest)."""
    timeout = node.config.session_idle_timeout
    unstepped = min(node.config.session_open_timeout, timeout)
    while True:
        await asyncio.sleep(min(unstepped / 4, 30.0))
        executor = node.serving.executor
        if executor is not None:
            idle = executor.sessions.idle(timeout, unstepped)
            evicted = executor.evict(idle, f"idle for over {timeout:.0f}s (or never stepped in {unstepped:g}s)")
            if evicted:
                log.info("closed %d idle sessions", evicted)
        release_free_heap()  # passes' freed temporaries (prefills' activations, dequantised weights) go back


async def _rebalance_loop(node: RunningNode, rng: random.Random) -> None:
    period = node.config.rebalance_period
    num_layers = node.record.num_layers
    while True:
        await asyncio.sleep(period * rng.uniform(0.5, 1.5))  # jitter: nodes do not all move at once
        await node.membership.pull_all()  # decide on the freshest view
        target = plan_move(_servers(node.membership, node.record.config_hash), node.record.node_id, num_layers,
                           rng=rng)
        if target is None:
            continue
        log.warning("re-balancing: moving from layers %d:%d to %d:%d", node.record.start, node.record.end,
                    target.start, target.end)
        before = node.span
        await node.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await _load(node, target)
        print(serving_line(node, moved_from=before), flush=True)


def serving_line(node: RunningNode, moved_from: Span | None = None) -> str:
    """The line a node prints on stdout when it is ready (node/launcher.py's READY parses it), and again, with
    "now" and where it came from, each time it moves to another span."""
    span = f"layers {node.record.start}:{node.record.end} of {node.config.model} on {node.address}"
    if moved_from is None:
        return f"potluck node {node.identity.node_id[:8]} serving {span}"
    return (f"potluck node {node.identity.node_id[:8]} now serving {span} "
            f"(moved from {moved_from.start}:{moved_from.end})")


def compute_threads(requested: int, device: torch.device) -> int:
    """--threads if given; else every core this process may run on when the node computes on the CPU,
    and 2 when an accelerator computes (the CPU only feeds it; more threads just spin)."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if device.type == "cpu" else min(2, cores)


def _warn_plaintext(config: NodeConfig, security: Security) -> None:
    """Plaintext is fine on loopback and for labs that choose it; say so when it leaves the machine."""
    if security.encrypted or config.host in ("127.0.0.1", "::1", "localhost"):
        return
    log.warning("serving without TLS on %s: activations cross the network readable by anyone on the path "
                "(use --tls auto, or --tls-cert/--tls-key)", config.host)


def _dht_config(config: NodeConfig) -> DhtConfig | None:
    """The DHT peer of a node with --discovery dht: it listens on the node's host, --dht-port."""
    if not config.uses_dht:
        return None
    announce = ()
    if config.announce and config.dht_port:
        announce = (tcp_maddr(config.announce.rpartition(":")[0], config.dht_port),)
    return DhtConfig(initial_peers=config.initial_peers, host_maddrs=(tcp_maddr(config.host, config.dht_port),),
                     announce_maddrs=announce, refresh=config.dht_refresh, ttl=3 * config.dht_refresh)


async def _fingerprint(files: ModelFiles) -> str:
    """The model's weights fingerprint for the record (common/weights/fingerprint.py); "" when unreadable."""
    try:
        return await asyncio.to_thread(weights_fingerprint, files)
    except (ModelLoadError, OSError, ValueError, KeyError) as error:
        log.warning("%s: no weights fingerprint (%s); clients matching fingerprints will not route here",
                    files.model_id, error)
        return ""


async def start_node(config: NodeConfig) -> RunningNode:
    """Bind, join, load, serve. Returns once the node is ONLINE (its span loaded and announced)."""
    ensure_free(config.host, config.port)  # before any loading: a taken port is the user's to fix, in one line
    device = resolve_device(config.device)
    torch.set_num_threads(compute_threads(config.threads, device))
    dtype = resolve_dtype(config.dtype, device)
    files = ModelFiles.open(config.model, revision=config.revision)
    model_config = files.config()
    chash = config_hash(model_config)
    fingerprint = await _fingerprint(files)
    security = load_security(config.swarm_key, config.tls, config.tls_cert, config.tls_key, config.tls_ca,
                             config.tls_server_name)
    identity = load_identity(config.identity)
    security = security.for_node(identity.key)
    _warn_plaintext(config, security)
    serving = Serving()
    metrics = NodeMetrics() if config.metrics_port is not None else None
    on_reject = (lambda reason: metrics.error("UNAUTHENTICATED")) if metrics is not None else None
    quiet_departed_clients()  # a client gone before its call's status: one DEBUG line, not an ERROR traceback
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=security.server_interceptors(on_reject),
                             maximum_concurrent_rpcs=config.max_rpcs)  # past it: RESOURCE_EXHAUSTED from grpc
    try:
        port = security.add_port(server, format_address(config.host, config.port))
    except RuntimeError:  # grpc: "Failed to bind to address ..." (a node started at the same time, say)
        port = 0
    if port == 0:
        identity.release()
        ensure_free(config.host, config.port)
        raise OSError(f"cannot bind {format_address(config.host, config.port)}")
    address = config.announce or format_address(advertised_host(config.host), port)
    swarm = SwarmConfig(bootstrap=config.bootstrap, mdns=config.mdns, mdns_interface=_mdns_interface(config),
                        heartbeat=config.heartbeat, ttl=config.ttl, model=chash)
    membership = make_discovery(swarm, _dht_config(config), identity, stats=lambda: _stats(serving),
                                security=security, watch={chash: model_config.num_hidden_layers})
    node_identity = NodeIdentity(node_id=identity.node_id, name=config.name or address, model_id=files.model_id,
                                 config_hash=chash, num_layers=model_config.num_hidden_layers,
                                 dtype=dtype_name(dtype), device=str(device), quant=config.quant)
    if metrics is not None:
        metrics.watch(_cache_view(serving))
        metrics.watch_memory(lambda: serving.memory() if serving.memory is not None else {})
    limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
    servicer = PotluckServicer(serving, node_identity, membership, metrics, limiter=limiter)
    # what strangers may have this node dial (node/rpc/dialing.py): in a swarm, pushes go to members only
    policy = DialPolicy(local=lab_swarm(address, config.bootstrap, config.swarm_scope))
    members = members_of(membership) if config.bootstrap or config.mdns else None
    servicer.pusher = Pusher(security=security, policy=policy, members=members)
    servicer.prober = Prober(security=security, policy=policy)  # Probe dials as this node does (TLS, swarm key)
    servicer.model_files = ModelFileServer(files)  # rpc ModelFile: config, tokenizer, client parts
    # registered from the descriptors: request bytes that do not parse get INVALID_ARGUMENT (node/rpc/handlers.py)
    add_service(server, pb.DESCRIPTOR.services_by_name["Potluck"], servicer, metrics.error if metrics else None)
    from common.wire.generated import relay_pb2
    from node.relay.gate import NotARelay

    relay = NotARelay()  # a node that runs no relay answers strangers' Attach as a relay does (node/relay/gate.py)
    if config.relay:  # volunteer as a relay (node/relay/relay.py): rpc Attach, behind the same interceptors
        from node.relay.relay import RelayLimits, RelayServicer

        relay = RelayServicer(RelayLimits(config.relay_max_nodes, config.relay_max_bytes), config.host,
                              address.rpartition(":")[0].strip("[]"))
    add_service(server, relay_pb2.DESCRIPTOR.services_by_name["Relay"], relay)
    servicer.relay = relay  # its attach limits are read by tests and benchmarks
    health_servicer = health.aio.HealthServicer()
    add_service(server, health_pb2.DESCRIPTOR.services_by_name["Health"], health_servicer)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    record = PeerRecord(
        node_id=identity.node_id,
        addresses=(address,),
        model_id=files.model_id,
        config_hash=chash,
        num_layers=model_config.num_hidden_layers,
        start=0,
        end=1,
        dtype=dtype_name(dtype),
        device=str(device),
        max_length=config.max_length,
        free_cache_tokens=config.cache_tokens,
        state=NodeState.JOINING,
        quant=config.quant,
        numerics=config.numerics,  # as asked until the span is loaded (then what it computes in)
        name=config.name or address,
        started_at=serving.started_at,
        relay_slots=config.relay_max_nodes if config.relay else 0,
        weights=fingerprint,
    )
    node = RunningNode(config=config, server=server, health=health_servicer, serving=serving, membership=membership,
                       identity=identity, address=address, files=files, record=record, device=device, dtype=dtype,
                       metrics=metrics, servicer=servicer, security=security)
    try:
        if metrics is not None:
            node.metrics_server = metrics.serve(config.host, config.metrics_port)
        await membership.start()
        node.relay = await _relay_if_needed(node, port, policy)
        span = await _choose_span(config, membership, files, model_config, chash, device, dtype)
        await _load(node, span)
    except BaseException:
        await node.stop(0)
        raise
    node.tasks.append(asyncio.ensure_future(_janitor(node)))
    if config.auto_placed and config.rebalance:
        node.tasks.append(asyncio.ensure_future(_rebalance_loop(node, random.Random())))
    return node


async def _relay_if_needed(node: RunningNode, port: int, policy: DialPolicy):
    """Serve through a relay if the swarm cannot reach this node (node/relay/join.py); None otherwise."""
    from node.relay.join import relay_if_needed

    async def moved(address: str, relay_id: str) -> None:
        node.address = address
        node.record = replace(node.record, addresses=(address,), relay_via=relay_id)
        if node.membership.own is not None:
            await node.membership.publish(node.record)

    local_host = "127.0.0.1" if node.config.host in ("0.0.0.0", "") else "::1" if node.config.host == "::" \
        else node.config.host
    return await relay_if_needed(node.config, node.membership, node.security, node.address,
                                 format_address(local_host, port), moved, record=lambda: node.record,
                                 callers=node.servicer.tunneled, policy=policy)


async def run_node(config: NodeConfig, announce=print) -> None:
    """Serve until SIGINT/SIGTERM; then drain (sessions move away), leave the swarm (OFFLINE) and stop.

    A second signal skips the rest of the drain."""
    node = await start_node(config)
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the ready line: a signal right after it must drain
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    announce(serving_line(node), flush=True)
    if config.uses_dht:  # on stderr: stdout keeps only the ready line
        print(f"potluck node: DHT peer at {','.join(node.membership.visible_maddrs())} (others join with "
              "--initial-peers set to it)", file=sys.stderr, flush=True)
    try:
        await signals.get()
        sessions = len(node.executor.sessions) if node.executor is not None else 0
        # on stderr, so that the stop is never silent (stdout keeps only the ready line)
        print(f"potluck node: draining {sessions} session{'' if sessions == 1 else 's'} (at most "
              f"{config.drain_timeout:g}s; signal again to stop now)...", file=sys.stderr, flush=True)
        drain = asyncio.ensure_future(node.drain(config.drain_timeout))
        again = asyncio.ensure_future(signals.get())
        await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
        drain.cancel()
        again.cancel()
        print("potluck node: leaving the swarm, finishing calls in flight...", file=sys.stderr, flush=True)
    finally:
        await node.stop(config.grace_seconds)
    print("potluck node: done", file=sys.stderr, flush=True)
