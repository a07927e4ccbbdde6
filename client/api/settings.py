"""`potluck api`'s settings: what the command line sets, importable without the server (fastapi, torch)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_BODY_BYTES = 512 * 1024  # ~128k tokens of text: more than any context the API serves needs


@dataclass(frozen=True)
class ApiSettings:
    default_max_tokens: int = 512  # chat completions that give no max_tokens (capped by the context)
    parallel: int = 8              # requests that generate at once (more wait their turn, in arrival order)
    prompt_lookup: int = 0         # speculative decoding by prompt lookup, drafts of up to this many tokens (0: off)
    max_body_bytes: int = MAX_BODY_BYTES  # a larger request body is refused (413) before it is parsed or tokenized
