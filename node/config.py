"""The node's configuration: one frozen dataclass, built by the CLI (or by tests)."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class NodeConfig:
    model: str                      # local model folder or hub id ("org/name")
    start: int                      # first layer served (global index)
    end: int                        # one past the last layer served
    host: str = "127.0.0.1"         # address to bind and to advertise
    port: int = 0                   # 0 = any free port; the bound port is printed when ready
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"             # auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on GPUs)
    max_length: int = 8192          # longest session (tokens per sequence) this node accepts
    cache_tokens: int = 65536       # KV cache budget over all sessions, in tokens (batch x max_length each)
    max_batch: int = 64             # largest batch in one session or forward
    threads: int = 0                # torch intra-op threads on CPU; 0 = torch's default
    revision: str | None = None     # hub revision (branch, tag or commit)
    node_id: str = ""               # a name for logs and Info; empty = host:port
    grace_seconds: float = 5.0      # how long SIGTERM waits for steps in flight

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ConfigError(f"span {self.start}:{self.end}: need 0 <= start < end")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not within 0..65535")
        if self.max_length < 1 or self.cache_tokens < 1 or self.max_batch < 1:
            raise ConfigError("max_length, cache_tokens and max_batch must be positive")
        if self.threads < 0:
            raise ConfigError("threads must be >= 0")
