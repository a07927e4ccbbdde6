"""An OpenAI-compatible HTTP API (chat and text completions, streaming) backed by the swarm."""

from client.api.app import ApiSettings, create_app
from client.api.server import serve

__all__ = ["ApiSettings", "create_app", "serve"]
