"""An OpenAI-compatible HTTP API (chat and text completions, streaming) backed by the swarm.

Its names load on first use (`from client.api import create_app` imports the server then), so that
`client.api.settings` can be read without fastapi and torch (`potluck api --help`)."""

from __future__ import annotations

import importlib

_EXPORTS = {"ApiSettings": "client.api.settings", "create_app": "client.api.app", "serve": "client.api.server"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'client.api' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
