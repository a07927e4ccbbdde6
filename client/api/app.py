"""The FastAPI application: /v1/models, /v1/chat/completions, /v1/completions, and the dashboard
(the page at `/`, its files under /dashboard/, its data at /v1/swarm).

Handlers validate, encode the prompt and hand the work to a pool of generation threads (`generate`
blocks), so the event loop stays free; up to `ApiSettings.parallel` requests generate at once and
travel the chain together (client/api/engine.py: seeded ones run alone). Streaming answers are
server-sent events fed from those threads."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

import torch
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2.exceptions import TemplateError
from starlette.datastructures import Headers
from transformers import PreTrainedTokenizerBase

from client.api.catalog import SwarmCatalog, load_tokenizer_for
from client.api.dashboard import STATIC, SwarmWatch
from client.api.engine import Completion, SamplingParams, complete
from client.api.errors import (
    ApiError,
    bad_request,
    from_exception,
    install_handlers,
    unauthorized,
    unknown_model,
)
from client.api.models import ModelSource, ServedModel, build_registry
from client.api.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, GenerationRequest
from client.api.settings import ApiSettings
from client.model import DistributedModelForCausalLM
from client.textgen import encode_prompt

log = logging.getLogger(__name__)






def create_app(models: dict[str, ModelSource], tokenizers: PreTrainedTokenizerBase | dict[str, PreTrainedTokenizerBase],
               api_key: str | None = None, settings: ApiSettings = ApiSettings(),
               catalog: SwarmCatalog | None = None) -> FastAPI:
    """An OpenAI-compatible app over `models` (name -> DistributedModelForCausalLM, or a
    zero-argument factory that loads one). Instances stay the caller's to close; models made
    by factories are closed with the app. With `api_key`, every request needs that bearer key,
    except for the dashboard's static page and files (they hold no data). With a `catalog`, every
    other model the swarm fully covers is listed too and loaded on its first request."""
    if not models and catalog is None:
        raise ValueError("no models to serve: give a model, or discover the swarm's")
    state = _State(build_registry(models, tokenizers) if models else {}, settings, catalog)
    watch = SwarmWatch()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        preloads = [asyncio.create_task(m.preload()) for m in state.models.values() if m.owned]
        try:
            yield
        finally:
            for task in preloads:
                task.cancel()
            await watch.close()
            if catalog is not None:
                await catalog.close()
            await asyncio.to_thread(state.executor.shutdown, True, cancel_futures=True)
            for model in state.models.values():
                model.close()

    app = FastAPI(title="Potluck OpenAI-compatible API", lifespan=lifespan)
    install_handlers(app)
    if api_key:
        app.add_middleware(_RequireKey, key=api_key)
    app.add_middleware(_LimitBody, limit=settings.max_body_bytes)  # added last: runs first, before the key check
    app.mount("/dashboard", StaticFiles(directory=STATIC), name="dashboard")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/swarm")
    async def swarm_state() -> dict:
        """Each served model's nodes, coverage and warnings (what the dashboard polls)."""
        views = list(await asyncio.gather(*(watch.state(m.name, m.loaded) for m in state.models.values())))
        if catalog is not None:  # models the swarm covers that no request has loaded yet: shown from records
            views += await catalog.views(exclude=set(state.models))
        return {"object": "swarm", "time": time.time(), "models": views}

    @app.get("/v1/models")
    async def list_models() -> dict:
        served = list(state.models.values())
        ready = await asyncio.gather(*(m.available() for m in served))
        names = [m.name for m, ok in zip(served, ready) if ok]
        names += [f"{m.name}:{adapter}" for m, ok in zip(served, ready) if ok and ":" not in m.name
                  for adapter in m.loaded.swarm.full_adapters()]  # MODEL:ADAPTER, run on first use
        names = list(dict.fromkeys(names))
        if catalog is not None:  # what the swarm covers besides: listed, loaded on first use
            names += [m.model_id for m in await catalog.models() if m.model_id not in state.models]
        return {"object": "list", "data": [state.model_card(name) for name in names]}

    @app.get("/v1/models/{name:path}")
    async def retrieve_model(name: str) -> dict:
        if name not in state.models and catalog is not None and await catalog.find(name) is not None:
            return state.model_card(name)
        served = await state.find(name) if ":" in name else state.lookup(name)  # MODEL:ADAPTER: 404 if unserved
        if not await served.available():
            raise unknown_model(name)
        return state.model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        served = await state.find(body.model)
        input_ids = encode_chat(served.tokenizer, body.messages)
        return await state.respond(served, input_ids, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        served = await state.find(body.model)
        input_ids = encode_text(served.tokenizer, body.prompt)
        return await state.respond(served, input_ids, body, chat=False)

    return app


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> torch.Tensor:
    if not tokenizer.chat_template:
        raise bad_request("this model's tokenizer has no chat template: use /v1/completions", param="messages")
    try:
        encoded = tokenizer.apply_chat_template([m.for_template() for m in messages], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
    except (TemplateError, ValueError, TypeError) as error:
        raise bad_request(f"messages: the chat template refused them: {error}", param="messages") from None
    return encoded["input_ids"]


def encode_text(tokenizer: PreTrainedTokenizerBase, prompt: str | list) -> torch.Tensor:
    if isinstance(prompt, list) and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # the schema allows one prompt only
    if isinstance(prompt, str):
        input_ids = encode_prompt(tokenizer, prompt, chat=False)
    else:
        if any(not 0 <= t < len(tokenizer) for t in prompt):
            raise bad_request(f"prompt: token ids must be in [0, {len(tokenizer)})", param="prompt")
        input_ids = torch.tensor([prompt], dtype=torch.long)
    if input_ids.shape[1] == 0:
        raise bad_request("prompt: the prompt is empty", param="prompt")
    return input_ids


class _State:
    def __init__(self, models: dict[str, ServedModel], settings: ApiSettings, catalog: SwarmCatalog | None = None):
        self.models = models
        self.settings = settings
        self.catalog = catalog
        self._adding = asyncio.Lock()  # one load per newly requested discovered model
        self.created = int(time.time())
        # up to `parallel` generations at once; the others queue in arrival order
        self.executor = ThreadPoolExecutor(max_workers=settings.parallel, thread_name_prefix="potluck-api-generate")

    def lookup(self, name: str) -> ServedModel:
        if name not in self.models:
            raise unknown_model(name)
        return self.models[name]

    async def find(self, name: str) -> ServedModel:
        """`name`'s model: one the API serves, one the swarm covers (its client parts loaded now), or
        `MODEL:ADAPTER`, a served model with a LoRA adapter its nodes serve."""
        if name not in self.models and ":" in name:
            return await self._with_adapter(name)
        if name in self.models or self.catalog is None:
            return self.lookup(name)
        async with self._adding:
            if name not in self.models:
                covered = await self.catalog.find(name)
                if covered is None:
                    raise unknown_model(name)
                try:
                    source = await self.catalog.source(name)
                    tokenizer = await load_tokenizer_for(name, source)
                except LookupError as error:
                    raise ApiError(503, str(error), type="server_error", code="model_unavailable") from None
                factory = partial(DistributedModelForCausalLM.from_pretrained, source, config=self.catalog.config)
                self.models[name] = ServedModel(name, factory, tokenizer)
                log.info("serving %s, discovered in the swarm (client parts from %s)", name, source)
        return self.models[name]

    async def _with_adapter(self, name: str) -> ServedModel:
        """`MODEL:ADAPTER`: MODEL's client parts, routed through nodes serving ADAPTER (client/model.py
        `with_adapter`); 404 unless some node of MODEL advertises ADAPTER."""
        base_name, adapter = name.rsplit(":", 1)
        base = await self.find(base_name)
        try:
            model = await base.get()
        except Exception as error:
            raise from_exception(error, base_name) from None
        infos = await asyncio.to_thread(model.swarm.refresh)
        if not adapter or not any(adapter in info.adapters for info in infos):
            raise unknown_model(name)
        async with self._adding:
            if name not in self.models:
                self.models[name] = ServedModel(name, partial(model.with_adapter, adapter), base.tokenizer)
                log.info("serving %s: %s with LoRA adapter %r", name, base_name, adapter)
        return self.models[name]

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "potluck"}

    async def respond(self, served: ServedModel, input_ids: torch.Tensor, body: GenerationRequest, chat: bool):
        try:
            model = await served.get()
        except Exception as error:
            raise from_exception(error, served.name) from None
        context = getattr(model.config, "max_position_embeddings", None)
        params = self.sampling(body, input_ids.shape[1], context, prompt_param="messages" if chat else "prompt")
        run = _Run(served, input_ids, params, chat, body.include_usage)
        if body.stream:
            return await run.stream(self.executor, model)
        return JSONResponse(run.whole(await run.complete(self.executor, model)))

    def sampling(self, body: GenerationRequest, prompt_tokens: int, context: int | None,
                 prompt_param: str) -> SamplingParams:
        wanted = body.token_limit
        max_new = wanted or self.settings.default_max_tokens
        if context is not None and prompt_tokens + max_new > context:
            if wanted is not None or prompt_tokens >= context:
                raise bad_request(
                    f"this model's context is {context} tokens; the prompt has {prompt_tokens} and max_tokens asks for"
                    f" {max_new} more", param="max_tokens" if wanted else prompt_param, code="context_length_exceeded")
            max_new = context - prompt_tokens
        temperature = 1.0 if body.temperature is None else body.temperature
        return SamplingParams(
            max_new_tokens=max_new, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed, stop=body.stops, prompt_lookup=self.settings.prompt_lookup,
        )


class _Run:
    """One request's generation and the OpenAI objects that report it."""

    def __init__(self, served: ServedModel, input_ids: torch.Tensor, params: SamplingParams, chat: bool,
                 include_usage: bool):
        self.served = served
        self.input_ids = input_ids
        self.params = params
        self.chat = chat
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.cancelled = threading.Event()

    # -- running ----------------------------------------------------------------------------------
    async def complete(self, executor: ThreadPoolExecutor, model) -> Completion:
        work = partial(complete, model, self.served.tokenizer, self.input_ids, self.params, self.cancelled)
        try:
            return await asyncio.wrap_future(executor.submit(work))
        except asyncio.CancelledError:
            self.cancelled.set()  # the client went away: stop at the next token
            raise
        except Exception as error:
            raise from_exception(error, self.served.name) from None

    async def stream(self, executor: ThreadPoolExecutor, model) -> StreamingResponse:
        """Start generating; answer once the route is up (so routing errors get a proper status),
        then stream each piece of text as it is produced."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(kind: str, value=None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the server's loop has closed: nobody is listening any more
                pass

        def work() -> None:
            try:
                result = complete(model, self.served.tokenizer, self.input_ids, self.params, self.cancelled,
                                  on_start=lambda: post("start"), on_text=lambda text: post("text", text))
            except Exception as error:
                post("error", error)
            else:
                post("done", result)

        executor.submit(work)
        try:
            kind, value = await events.get()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if kind == "error":
            raise from_exception(value, self.served.name)
        if kind != "start":  # generation ended before it could signal its start: keep what came
            events.put_nowait((kind, value))
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _Streaming(self._sse(events), self.cancelled, media_type="text/event-stream", headers=headers)

    async def _sse(self, events: asyncio.Queue) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield _sse(self.chunk({"role": "assistant", "content": ""}, None))
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield _sse(self.chunk({"content": value} if self.chat else value, None))
                elif kind == "done":
                    yield _sse(self.chunk({} if self.chat else "", value.finish_reason))
                    if self.include_usage:
                        yield _sse({**self._head(chunk=True), "choices": [], "usage": _usage(value)})
                    break
                elif kind == "error":
                    yield _sse(from_exception(value, self.served.name).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.cancelled.set()  # a no-op after "done"; otherwise the client went away

    # -- OpenAI objects ---------------------------------------------------------------------------
    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.served.name}

    def chunk(self, delta: dict | str, finish: str | None) -> dict:
        choice = {"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta}
        return {**self._head(chunk=True), "choices": [{**choice, "logprobs": None, "finish_reason": finish}]}

    def whole(self, result: Completion) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}}
        else:
            choice = {"index": 0, "text": result.text}
        choice.update(logprobs=None, finish_reason=result.finish_reason)
        return {**self._head(chunk=False), "choices": [choice], "usage": _usage(result)}


class _Streaming(StreamingResponse):
    """A streamed answer that stops its generation however the response ends: sent in full, the client gone
    before its first byte (the body's generator then never starts, so its own `finally` never runs), or the
    server's task cancelled."""

    def __init__(self, content: AsyncIterator[str], cancelled: threading.Event, **kwargs):
        super().__init__(content, **kwargs)
        self.cancelled = cancelled

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancelled.set()  # a no-op after "done"; otherwise the client went away


def _usage(result: Completion) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _RequireKey:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <key>`, except GETs of
    the dashboard's static page and files (the page asks for the key and sends it itself)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send) -> None:
        public = scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and (
            scope["path"] == "/" or scope["path"].startswith("/dashboard/"))
        if scope["type"] == "http" and not public:
            given = Headers(scope=scope).get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                await unauthorized(bool(given)).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _LimitBody:
    """ASGI middleware: a request body over `limit` bytes is answered 413 (the API's JSON error shape) before the
    app parses it. A declared Content-Length over the limit is refused unread; otherwise the body is read up to
    the limit, then handed to the app as it came."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = ApiError(413, f"the request body exceeds {self.limit} bytes", code="request_too_large")
        await error.response()(scope, receive, send)
