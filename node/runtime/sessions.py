"""Per-session state on a node (KV cache, padding mask, position) and the cache budget.

A session reserves cache tokens as it steps (batch x the length its steps reach), not the batch x max_length it
declares on opening: opening sessions costs a peer nothing it could hoard. Each peer (the caller's address, or a
client identity at that address, as the servicer resolves it: node/runtime/quota.py) may hold a share of the
sessions and of the budget, and all callers from one address together no more than the per-peer limits: one peer
never starves the others, and fresh identities from one address cannot multiply its share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PretrainedConfig

from node.runtime.errors import AlreadyExists, Exhausted, Full, NotFound
from node.runtime.quota import address_of, limit_of


@dataclass
class Session:
    session_id: str
    start: int
    end: int
    batch_size: int
    max_length: int
    wire_dtype: torch.dtype
    cache: DynamicCache
    position: int = 0  # tokens held per sequence
    mask: torch.Tensor | None = None  # [batch, position] 2D mask, None while there is no padding
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False  # a step is being computed
    handler: object = None  # the asyncio task serving this session's stream (cancelled to evict it)
    evicted: str = ""  # why the node ended this session ("" while it is not evicted)
    wire: str = (
        "float32"  # wire format of the hidden states (contract.FLOAT_WIRE_DTYPES); wire_dtype is what it decodes to
    )
    adapter: object = None  # node/model/lora.LoraAdapter every step of this session runs with; None = the base model
    computing: int = 0  # its steps queued on or running in the compute thread (under the executor's lock)
    closed: bool = False  # out of the table; its cache tokens are released once `computing` is back to 0
    peer: str = ""  # who opened it (quota.caller_key: its address, or an identity there): what the quotas count
    reserved: int = 0  # tokens per sequence reserved so far: the furthest length its steps reached (0: none yet)

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.reserved


def kv_bytes_per_token(config: PretrainedConfig, layers: int, dtype: torch.dtype) -> int:
    """Estimated KV-cache bytes of one token over `layers` layers, as transformers' cache holds them.

    Most families: keys + values x kv heads x head dim. Multi-head latent attention (DeepSeek-V2/V3 and
    their kin: a `kv_lora_rank`) caches the compressed latent of kv_lora_rank plus the rotary key of
    qk_rope_head_dim, once for all heads, and expands keys/values per head only inside attention.
    Sliding windows are not discounted."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    latent = getattr(config, "kv_lora_rank", None)
    if latent:
        return layers * (latent + config.qk_rope_head_dim) * itemsize
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers * kv_heads * 2 * head_dim * itemsize


class SessionTable:
    """Open sessions and the cache tokens they reserve, within a fixed budget (and the node's limits:
    how many sessions at once, how many tokens one session may reserve, how many sessions and tokens one
    peer may hold)."""

    def __init__(self, budget_tokens: int, max_sessions: int = 0, max_session_tokens: int = 0,
                 budget_flag: str = "--cache-tokens", max_peer_sessions: int = 0, max_peer_tokens: int = 0):
        self.budget_tokens = budget_tokens
        self.max_sessions = max_sessions  # 0: no limit but the budget
        self.max_session_tokens = max_session_tokens or budget_tokens  # 0: the whole budget
        self.budget_flag = budget_flag  # the option that set the budget, named in errors
        self.max_peer_sessions = max_peer_sessions  # 0: no per-peer limit but max_sessions
        self.max_peer_tokens = max_peer_tokens or budget_tokens  # 0: the whole budget
        self._sessions: dict[str, Session] = {}
        self._reserved = 0  # kept as a sum: read by the metrics thread without walking the dict
        self._peer_sessions: dict[str, int] = {}  # peer -> sessions in the table
        self._peer_tokens: dict[str, int] = {}  # peer -> cache tokens reserved (until released)
        self._address_sessions: dict[str, int] = {}  # address -> sessions of all its peers (identities)
        self._address_tokens: dict[str, int] = {}  # address -> cache tokens of all its peers

    @property
    def reserved_tokens(self) -> int:
        return self._reserved

    @property
    def used_tokens(self) -> int:
        """Tokens held in the caches now (batch x position per session)."""
        return sum(s.batch_size * s.position for s in list(self._sessions.values()))

    @property
    def free_tokens(self) -> int:
        return self.budget_tokens - self.reserved_tokens

    def __len__(self) -> int:
        return len(self._sessions)

    def peer_sessions(self, peer: str) -> int:
        return self._peer_sessions.get(peer, 0)

    def peer_tokens(self, peer: str) -> int:
        return self._peer_tokens.get(peer, 0)

    def address_tokens(self, address: str) -> int:
        """Cache tokens all callers from `address` hold (every identity there and the anonymous one)."""
        return self._address_tokens.get(address, 0)

    def check_room(self, session_id: str, batch_size: int, max_length: int, peer: str = "") -> None:
        """Raise unless a session of this size may open now: Exhausted if it never can, Full if it can once
        other sessions close. Called before its cache is allocated, and again by `add`. No cache tokens are
        reserved yet (`reserve`, as it steps)."""
        if session_id in self._sessions:
            raise AlreadyExists(f"session {session_id!r} is already open on this node")
        tokens = batch_size * max_length
        needs = f"session needs {tokens} cache tokens (batch {batch_size} x max_length {max_length})"
        if tokens > self.budget_tokens:
            raise Exhausted(f"{needs} but only {self.free_tokens} of {self.budget_tokens} are free, and this node's "
                            f"whole cache budget is smaller ({self.budget_flag})")
        if tokens > self.max_session_tokens:
            raise Exhausted(f"{needs}, over this node's per-session limit of {self.max_session_tokens} "
                            f"(--max-session-tokens)")
        if self.max_sessions and len(self._sessions) >= self.max_sessions:
            raise Full(f"this node already holds {len(self._sessions)} sessions, its limit (--max-sessions)")
        if not self.max_peer_sessions:
            return
        address = address_of(peer)
        if self._address_sessions.get(address, 0) >= self.max_peer_sessions:
            raise Full(f"{address or 'this peer'} already holds {self._address_sessions.get(address, 0)} sessions on "
                       f"this node, the limit per peer (--max-peer-sessions)")
        if peer != address and self.peer_sessions(peer) >= limit_of(peer, self.max_peer_sessions):
            raise Full(f"this identity already holds {self.peer_sessions(peer)} sessions on this node, its share of "
                       f"the limit per peer (--max-peer-sessions)")

    def reserve(self, session: Session, length: int) -> None:
        """Reserve cache tokens for `session` up to `length` tokens per sequence (what its next step reaches);
        Full if the budget or its peer's share has no room now (a rewind keeps what it reserved)."""
        more = session.batch_size * (length - session.reserved)
        if more <= 0:
            return
        peer = session.peer
        address = address_of(peer)
        held, together = self.peer_tokens(peer), self._address_tokens.get(address, 0)
        if together + more > self.max_peer_tokens:
            raise Full(f"step needs {more} more cache tokens but {address or 'this peer'} already holds {together} of "
                       f"its {self.max_peer_tokens} on this node (--max-peer-tokens)")
        if peer != address and held + more > limit_of(peer, self.max_peer_tokens):
            raise Full(f"step needs {more} more cache tokens but this identity already holds {held} of its share "
                       f"{int(limit_of(peer, self.max_peer_tokens))} on this node (of --max-peer-tokens)")
        if more > self.free_tokens:
            raise Full(f"step needs {more} more cache tokens but only {self.free_tokens} of {self.budget_tokens} "
                       f"are free ({self.budget_flag})")
        session.reserved = length
        self._reserved += more
        self._peer_tokens[peer] = held + more
        self._address_tokens[address] = together + more

    def add(self, session: Session) -> None:
        self.check_room(session.session_id, session.batch_size, session.max_length, session.peer)
        self._sessions[session.session_id] = session
        self._peer_sessions[session.peer] = self.peer_sessions(session.peer) + 1
        address = address_of(session.peer)
        self._address_sessions[address] = self._address_sessions.get(address, 0) + 1

    def get(self, session_id: str) -> Session:
        try:
            session = self._sessions[session_id]
        except KeyError:
            raise NotFound(f"unknown session {session_id!r}") from None
        session.last_used = time.monotonic()
        return session

    def retire(self, session_id: str) -> Session | None:
        """Take a session out of the table; its cache tokens stay reserved until `release` (the compute thread may
        still write its cache)."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            _decrease(self._peer_sessions, session.peer, 1)
            _decrease(self._address_sessions, address_of(session.peer), 1)
        return session

    def release(self, session: Session) -> None:
        """Give a retired session's cache tokens back to the budget (and to its peer's share)."""
        self._reserved -= session.reserved_tokens
        _decrease(self._peer_tokens, session.peer, session.reserved_tokens)
        _decrease(self._address_tokens, address_of(session.peer), session.reserved_tokens)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def idle(self, max_idle: float, max_unstepped: float | None = None, now: float | None = None) -> list[Session]:
        """Sessions that have not stepped for `max_idle` seconds (their client is probably gone), and those opened
        more than `max_unstepped` seconds ago that never stepped (an open that only holds a slot)."""
        now = time.monotonic() if now is None else now
        unstepped = max_idle if max_unstepped is None else max_unstepped
        return [s for s in self._sessions.values()
                if not s.busy and now - s.last_used > (unstepped if not s.reserved else max_idle)]


def _decrease(counts: dict[str, int], key: str, by: int) -> None:
    """Lower a per-peer count, forgetting peers at 0 (the dicts stay as small as the open sessions)."""
    left = counts.get(key, 0) - by
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
