"""An OpenAI-compatible HTTP API (chat and text completions, streaming) backed by the swarm."""

from client.api.app import ApiSettings, create_app
from client.api.server import add_api_parser, run_api_cli, serve

__all__ = ["ApiSettings", "add_api_parser", "create_app", "run_api_cli", "serve"]
