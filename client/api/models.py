"""The models an API server offers: each a name, a tokenizer, and a swarm model (or how to load one)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from client.model import DistributedModelForCausalLM
from client.routing import MissingLayersError
from client.transport import PeerError

log = logging.getLogger(__name__)

ModelSource = DistributedModelForCausalLM | Callable[[], DistributedModelForCausalLM]


class ServedModel:
    """One model name. Given a factory, the model is loaded on first use (again after a failed
    load: a swarm that did not cover the model may cover it later) and closed with the server."""

    def __init__(self, name: str, source: ModelSource, tokenizer: PreTrainedTokenizerBase):
        self.name = name
        self.tokenizer = tokenizer
        self.owned = not isinstance(source, DistributedModelForCausalLM)
        self._model: DistributedModelForCausalLM | None = None if self.owned else source
        self._factory = source if self.owned else None
        self._loading = asyncio.Lock()

    async def get(self) -> DistributedModelForCausalLM:
        """The model; loads it (off the event loop) if needed. Raises what the factory raises."""
        if self._model is None:
            async with self._loading:
                if self._model is None:
                    self._model = await asyncio.to_thread(self._factory)
                    log.info("model %s loaded", self.name)
        return self._model

    @property
    def loaded(self) -> DistributedModelForCausalLM | None:
        """The model if it is loaded; None otherwise (nothing is loaded by asking)."""
        return self._model

    async def available(self) -> bool:
        """Whether the swarm serves every layer now (asks the peers, or the discovered records)."""
        try:
            model = await self.get()
            await asyncio.to_thread(model.swarm.route, True)
        except (MissingLayersError, PeerError) as error:
            log.info("model %s is not available: %s", self.name, error)
            return False
        except Exception:  # a broken model must not hide the others: log it, leave it out
            log.exception("cannot load %s", self.name)
            return False
        return True

    async def preload(self) -> None:
        """Load now rather than on the first request, and say whether the swarm covers the model."""
        try:
            await self.get()
        except (MissingLayersError, PeerError) as error:
            log.warning("%s: %s; will try again on the next request", self.name, error)
        except Exception:
            log.exception("cannot load %s", self.name)

    def close(self) -> None:
        if self.owned and self._model is not None:
            self._model.close()
            self._model = None


def build_registry(models: dict[str, ModelSource],
                   tokenizers: PreTrainedTokenizerBase | dict[str, PreTrainedTokenizerBase]) -> dict[str, ServedModel]:
    """Pair each model with its tokenizer (one tokenizer for all, or one per name)."""
    if not models:
        raise ValueError("no models to serve")
    served = {}
    for name, source in models.items():
        if isinstance(tokenizers, dict):
            if name not in tokenizers:
                raise ValueError(f"no tokenizer for model {name!r}")
            tokenizer = tokenizers[name]
        else:
            tokenizer = tokenizers
        served[name] = ServedModel(name, source, tokenizer)
    return served
