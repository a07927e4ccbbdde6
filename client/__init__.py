"""Potluck client SDK: run a model whose layers are served by a swarm of nodes."""

from client.config import ClientConfig
from client.model import DistributedModelForCausalLM
from client.routing import MissingLayersError
from client.transport import PeerError

__all__ = ["ClientConfig", "DistributedModelForCausalLM", "MissingLayersError", "PeerError"]
