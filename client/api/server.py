"""`potluck api`: serve the OpenAI-compatible app with uvicorn."""

from __future__ import annotations

import errno
import signal
import socket
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import uvicorn

from client.api.app import ApiSettings, create_app
from client.api.catalog import SwarmCatalog
from client.config import ClientConfig
from client.model import DistributedModelForCausalLM
from client.textgen import load_tokenizer
from common.ports import PortInUseError, ensure_free
from common.weights.files import ModelFiles


def serve(model: str | list[str], host: str = "127.0.0.1", port: int = 8000, *, config: ClientConfig,
          api_key: str | None = None, name: str | None = None, revision: str | None = None,
          settings: ApiSettings = ApiSettings(), models_dir: Path | None = None) -> None:
    """Serve one model or several (folders or hub ids; the ones the swarm's nodes serve) until interrupted.

    A model's name in the API is `name` (one model only), by default its folder name or hub id. The
    tokenizers are loaded now; the models on start-up, in the background (and again on requests if the
    swarm did not cover them yet). Without fixed peers, the other models the swarm covers are offered
    too (client parts from `models_dir/<model id>` or the hub, on first use)."""
    ensure_free(host, port)  # before the tokenizers load: a taken port is said at once, in one line
    models = [model] if isinstance(model, str) else list(model)
    if name is not None and len(models) != 1:
        raise ValueError("--name needs exactly one --model")
    sources, tokenizers = {}, {}
    for path in models:
        served = name or ModelFiles.open(path, revision=revision).model_id
        if served in sources:
            raise ValueError(f"two models would be served as {served!r}")
        tokenizers[served] = load_tokenizer(path, revision=revision)
        sources[served] = partial(DistributedModelForCausalLM.from_pretrained, path, config=config, revision=revision)
    catalog = None if config.peers else SwarmCatalog(config, models_dir)
    name = ", ".join(sources) or "the models the swarm covers"
    app = create_app(sources, tokenizers, api_key=api_key, settings=settings, catalog=catalog)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family)  # bound here: port 0 works, the real port is shown
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port) from None
        raise
    bound_host, bound_port = listener.getsockname()[:2]
    shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    print(f"potluck api serving {name} on http://{shown}:{bound_port}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=10))
    with _stopped_by_signals_is_success():
        server.run(sockets=[listener])


@contextmanager
def _stopped_by_signals_is_success():
    """uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-sends the signal to the handler
    that was there before it. Make that handler a no-op, so that after a graceful stop we
    return (exit 0, like `potluck join`) instead of dying of the signal a second time."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


