"""Models the swarm serves that the API was not told about: found in the discovered records.

`GET /v1/models` lists every model whose layers the swarm's ONLINE nodes cover completely. The
client parts (embeddings, norm, head, tokenizer) of such a model are loaded on its first request,
from `--models-dir/<model id>` when that folder exists, else from the swarm's own nodes (rpc ModelFile,
checked against the weights fingerprint the nodes announce, cached under ~/.cache/potluck/models; see
client/fetch.py), else from the Hugging Face hub (cache first; offline mode and tokens as huggingface_hub
reads them). So `potluck api --bootstrap HOST:PORT` needs nothing but an address.

A model id comes from records anyone can sign, so only ids that name a folder inside `--models-dir` or a hub
repository are listed (`safe_model_id`): an absolute path, a `..` component, a backslash or a control character
would make the API read whatever folder a stranger chose."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from client.api.dashboard import model_state, node_from_record
from client.config import ClientConfig
from client.fetch import fetch_model
from common.swarm.dht import make_discovery
from common.swarm.membership import SwarmConfig
from common.swarm.records import NodeState
from common.weights.errors import ModelLoadError

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2.0  # at most one pull from the swarm per this many seconds of listing
MAX_MODEL_ID_CHARS = 200  # longest model id listed (hub ids are at most 96 characters)


def safe_model_id(model_id: str) -> bool:
    """Whether a gossiped model id names a hub repository (`org/name`) or a folder's name, and nothing else: a
    relative path of one or two plain components, none of them `.`, `..` or hidden."""
    if not model_id or len(model_id) > MAX_MODEL_ID_CHARS or not model_id.isprintable():
        return False
    if "\\" in model_id or ":" in model_id or model_id.startswith(("/", "~")):
        return False
    parts = model_id.split("/")
    return len(parts) <= 2 and all(part and not part.startswith(".") and part.strip() == part for part in parts)


@dataclass(frozen=True)
class CoveredModel:
    model_id: str       # what nodes announce: a hub id, or a local folder's name
    config_hash: str
    num_layers: int
    nodes: int


def covered_models(records) -> list[CoveredModel]:
    """The models whose every layer some ONLINE record serves (pure: records in, models out)."""
    by_model: dict[tuple[str, str], list] = {}
    for record in records:
        if record.state == NodeState.ONLINE and safe_model_id(record.model_id):
            by_model.setdefault((record.model_id, record.config_hash), []).append(record)
    models = []
    for (model_id, config_hash), group in by_model.items():
        num_layers = group[0].num_layers
        covered = [False] * num_layers
        for record in group:
            for layer in range(max(record.start, 0), min(record.end, num_layers)):
                covered[layer] = True
        if num_layers > 0 and all(covered):
            models.append(CoveredModel(model_id, config_hash, num_layers, len(group)))
    return sorted(models, key=lambda m: m.model_id)


class SwarmCatalog:
    """Watches the swarm's records (pull-only membership). Use it on the API server's event loop."""

    def __init__(self, config: ClientConfig, models_dir: Path | None = None):
        self.config = config
        self.models_dir = models_dir
        swarm = SwarmConfig(bootstrap=config.bootstrap, mdns=config.mdns, mdns_interface=config.mdns_interface)
        self.membership = make_discovery(swarm, config.dht_config(), security=config.security())  # DHT: every model
        self._started = False
        self._pulled = 0.0

    async def models(self) -> list[CoveredModel]:
        if not self._started:
            self._started = True
            await self.membership.start()
            self._pulled = time.monotonic()
        elif time.monotonic() - self._pulled > REFRESH_SECONDS:
            self._pulled = time.monotonic()
            await self.membership.pull_all()
        return covered_models(self.membership.live())

    async def find(self, name: str) -> CoveredModel | None:
        for model in await self.models():
            if model.model_id == name:
                return model
        return None

    async def source(self, model_id: str) -> str:
        """Where the client parts of `model_id` are read from: the models folder's copy, else the files the
        swarm's nodes serve (fetched and verified once, then cached), else the hub id. LookupError for an id
        that could name a path outside the models folder (never listed either)."""
        if not safe_model_id(model_id):
            raise LookupError(f"the swarm announces the model id {model_id[:MAX_MODEL_ID_CHARS]!r}, which is not a "
                              "hub id or a folder name: refused")
        if self.models_dir is not None:
            # a safe id is one or two plain names, so the candidate is an entry of the models folder (or of a
            # folder in it); an entry may be a link the operator made to a model kept elsewhere
            candidate = self.models_dir / model_id
            if (candidate / "config.json").is_file():
                return str(candidate)
        try:
            folder = await fetch_model(model_id, self.membership.live(), self.config.security(),
                                       Path(self.config.model_cache))
        except ModelLoadError as error:
            log.warning("the client files of %s could not be fetched from the swarm (%s); trying the hub",
                        model_id, error)
            return model_id
        return str(folder)

    async def views(self, exclude: set[str]) -> list[dict]:
        """The dashboard's view (client/api/dashboard.py) of every covered model not in `exclude`, from the
        records alone: what the chat menu offers before a request loads the model."""
        now = time.time()
        records = self.membership.live()
        return [model_state(m.model_id, m.num_layers, m.config_hash,
                            [node_from_record(r, now) for r in records
                             if r.model_id == m.model_id and r.config_hash == m.config_hash], True)
                for m in await self.models() if m.model_id not in exclude]

    async def close(self) -> None:
        if self._started:
            await self.membership.close()


async def load_tokenizer_for(model_id: str, source: str):
    """The tokenizer of a discovered model, or a clear error naming what is missing."""
    from client.textgen import load_tokenizer

    try:
        return await asyncio.to_thread(load_tokenizer, source)
    except Exception as error:  # OSError, ValueError, hub errors: all mean "cannot load it here"
        raise LookupError(
            f"the swarm serves `{model_id}` but this API cannot load its tokenizer and client parts from "
            f"{source!r} ({type(error).__name__}: {error}); give the model's folder with --models-dir or --model"
        ) from None
