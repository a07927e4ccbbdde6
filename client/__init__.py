"""Potluck client SDK: run a model whose layers are served by a swarm of nodes.

`from client import DistributedModelForCausalLM` works as always; the names load on first use, so that a
submodule (client.config, say) can be imported without torch (the command line's flags and errors)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClientConfig": "client.config",
    "DistributedModelForCausalLM": "client.model",
    "MissingLayersError": "client.routing",
    "PeerError": "client.transport",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
