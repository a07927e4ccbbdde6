"""A transformers-compatible causal LM whose decoder layers live on remote nodes.

The client holds the embeddings, the final norm and the LM head; `generate` works as in
transformers (sampling, stopping criteria, streamers, logits processors), with the KV
caches kept on the nodes of an inference session."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import replace

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
from transformers.generation.stopping_criteria import StopStringCriteria
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import CausalLMOutputWithPast

from client.combine import Combiner, PackedHead
from client.config import ClientConfig
from client.draft import AdaptiveDraft, Calls, StopAwareDraft
from client.fetch import from_swarm
from client.processors import LeanProcessors
from client.swarm import SwarmClient, SyncSession
from client.verify import VerificationError, VerificationRestart
from common.weights.client_parts import load_client_parts
from common.weights.dtypes import parse_dtype, resolve_device
from common.weights.fast_linear import TransposedLinear
from common.weights.files import ModelFiles, config_hash
from common.weights.fingerprint import weights_fingerprint
from common.weights.threads import one_torch_thread, saved_torch_threads

log = logging.getLogger(__name__)

# A tied head needs its own transposed copy: worth it below this size (SmolLM2's is 113 MB).
FAST_HEAD_COPY_BYTES = 512 * 2**20


class RemoteCache:
    """Stands where transformers expects a Cache: the real caches are on the nodes of `session`."""

    is_compileable = False
    is_linear = (False,)

    def __init__(self, session: SyncSession, offset: int = 0):
        self.session = session
        self.offset = offset  # tokens of a trained prompt (ptune) the session holds before the input's

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.session.position - self.offset, 0)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.session.max_length - self.offset

    # Assisted decoding (prompt lookup, a draft model): generate() takes rejected draft tokens back with crop().
    is_croppable = True

    def activate_past_recording(self, **options) -> None:
        pass  # the nodes keep every token until a rewind; nothing to switch on (transformers >= 5.25 passes options)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (a negative count, as transformers' Cache.crop takes it); the
        nodes forget them when the next step, sent at the shorter position, reaches them."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove:
            self.session.rewind(self.session.position + tokens_to_remove)


class _PipelineCheck(logging.Filter):
    """Drops one record: transformers' text-generation pipeline checks a model's class *name* against its fixed
    list (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES; AutoModelForCausalLM.register does not reach that list since
    transformers 5) and logs an error naming ~200 classes for any other, though the pipeline only needs
    `generate`, which this model has. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str)
                    and record.msg.startswith("The model 'DistributedModelForCausalLM' is not supported for"))


def _welcome_in_pipelines() -> None:
    """`transformers.pipeline("text-generation", model=<this model>)` works; make it say nothing about it (once,
    when the first model is made: nothing happens at import)."""
    logger = logging.getLogger("transformers.pipelines.base")
    if not any(isinstance(existing, _PipelineCheck) for existing in logger.filters):
        logger.addFilter(_PipelineCheck())


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """`from_pretrained(path_or_id, peers=[...])` (or no peers: discovery), then `generate(...)` or `model(...)`."""

    config_class = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    # Experts run on the nodes; the client has none, so any experts setting is a no-op here.
    _can_set_experts_implementation_cached_value = True

    def __init__(self, config: PretrainedConfig, embed_tokens: nn.Module, norm: nn.Module, lm_head: nn.Module,
                 swarm: SwarmClient):
        super().__init__(config)
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        # concurrent generations share head products, several rows through a packed copy of the head
        self.head_calls = Combiner(PackedHead(lambda: self.lm_head, enabled=swarm.config.pack_head,
                                              exact=swarm.config.exact_head, numerics=swarm.config.head_numerics))
        self.swarm = swarm
        _welcome_in_pipelines()
        self.last_session: SyncSession | None = None
        self.calls = Calls()  # generate calls running now (prompt lookup drafts only while one is alone)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        model: str,
        peers: list[str] | tuple[str, ...] = (),
        *,
        bootstrap: list[str] | tuple[str, ...] = (),
        mdns: bool = True,
        mdns_interface: str | None = None,
        revision: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        wire_dtype: str = "float32",
        push: bool = True,
        verify: str = "off",
        swarm_key: str | None = None,
        tls: str = "off",
        tls_ca: str | None = None,
        adapter: str | None = None,
        config: ClientConfig | None = None,
        tuning: str | None = None,
        num_prompt_tokens: int = 16,
    ) -> "DistributedModelForCausalLM":
        """Load the client's parts of `model` and find the nodes serving the rest.

        With `peers`, route through exactly those nodes; without, discover the swarm through the
        `bootstrap` nodes and/or mDNS (on `mdns_interface`). With `push` (the default), nodes forward
        each step along the chain themselves; `push=False` sends every hop its step from the client.
        A private swarm needs its `swarm_key` file; `tls="auto"` (or `"ca"` with `tls_ca`) encrypts every hop.
        `verify="spot"` or `"full"` recomputes hops on other nodes and bans nodes caught lying (client/verify.py).
        `adapter="NAME"` runs every layer with the LoRA adapter the nodes serve under NAME (routing then uses
        only nodes that have it); None, the default, is the base model.
        `tuning="ptune"` adds a trainable soft prompt of `num_prompt_tokens` embeddings before every input;
        `"deep_ptune"` also trainable prompts added at every layer's input (docs/finetune.md)."""
        config = config or ClientConfig(
            peers=tuple(peers), bootstrap=tuple(bootstrap), mdns=mdns, mdns_interface=mdns_interface, device=device,
            dtype=dtype, wire_dtype=wire_dtype, push=push, swarm_key=swarm_key, tls=tls, tls_ca=tls_ca, verify=verify,
            adapter=adapter,
        )
        # a model id the swarm serves needs neither its files nor the hub: nodes serve them (client/fetch.py)
        files = from_swarm(model, config, revision) or ModelFiles.open(model, revision=revision)
        parts = load_client_parts(files, resolve_device(config.device), parse_dtype(config.dtype))
        fingerprint = weights_fingerprint(files) if config.weights == "match" and not config.peers else ""
        swarm = SwarmClient(config, parts.config.num_hidden_layers, parts.config.hidden_size, config_hash(parts.config),
                            weights=fingerprint)
        try:
            swarm.route()  # fail now, with a clear message, if the peers do not cover the model
        except BaseException:
            swarm.close()
            raise
        head = parts.lm_head
        if (
            head.weight.device.type == "cpu"
            and type(head) is torch.nn.Linear
            and (
                head.weight is not parts.embed_tokens.weight
                or head.weight.numel() * head.weight.element_size() <= FAST_HEAD_COPY_BYTES
            )
        ):
            head = TransposedLinear.from_linear(head)  # ~2x faster one-token logits on CPU
        instance = cls(parts.config, parts.embed_tokens, parts.norm, head, swarm)
        instance.head_calls.fn.exact_weight()  # now rather than in the first token's time (common/weights/exact.py)
        instance.name_or_path = files.model_id
        if tuning is not None:
            instance.add_prompts(tuning, num_prompt_tokens)
        try:
            instance.generation_config = GenerationConfig.from_pretrained(files.root)
        except OSError:
            instance.generation_config = GenerationConfig.from_model_config(parts.config)
        return instance.eval()

    def with_adapter(self, adapter: str | None) -> "DistributedModelForCausalLM":
        """This model with another LoRA adapter (None: the base model): the client's weights are shared, the
        swarm client is its own (routing only through nodes serving `adapter`). MissingLayersError if no chain
        of such nodes covers the model. Close it like any model."""
        swarm = SwarmClient(replace(self.swarm.config, adapter=adapter), self.swarm.num_layers, self.swarm.hidden_size,
                            self.swarm.config_hash, weights=self.swarm.weights)
        try:
            swarm.route()
        except BaseException:
            swarm.close()
            raise
        instance = type(self)(self.config, self.embed_tokens, self.norm, self.lm_head, swarm)
        instance.head_calls = Combiner(self.head_calls.fn)  # the same head: one packed copy of it, not one each
        instance.name_or_path = self.name_or_path
        instance.generation_config = self.generation_config
        return instance.eval()

    # -- prompt tuning (docs/finetune.md) -----------------------------------------------------------
    tuning: str | None = None  # None, "ptune" or "deep_ptune"

    def add_prompts(self, tuning: str, num_prompt_tokens: int = 16) -> None:
        """Trainable prompts on the client: `prompt_embeddings` [num_prompt_tokens, hidden] before every input
        ("ptune"), and with "deep_ptune" also `intermediate_prompts` [num_layers, num_prompt_tokens, hidden]
        added to those positions at every layer's input on the nodes (zeros at first, as in Petals)."""
        if tuning not in ("ptune", "deep_ptune"):
            raise ValueError(f"tuning must be 'ptune' or 'deep_ptune', got {tuning!r}")
        if num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens must be at least 1, got {num_prompt_tokens}")
        weight = self.embed_tokens.weight
        hidden, std = self.config.hidden_size, getattr(self.config, "initializer_range", 0.02)
        self.tuning = tuning
        self.prompt_embeddings = nn.Parameter(torch.randn(num_prompt_tokens, hidden, device=weight.device) * std)
        if tuning == "deep_ptune":
            self.intermediate_prompts = nn.Parameter(
                torch.zeros(self.config.num_hidden_layers, num_prompt_tokens, hidden, device=weight.device))

    def _prepend_prompts(self, inputs_embeds, attention_mask, position_ids):
        """The inputs with the soft prompt in front (mask and position ids extended), and the deep prompts."""
        batch, count = inputs_embeds.shape[0], self.prompt_embeddings.shape[0]
        prompt = self.prompt_embeddings.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        inputs_embeds = torch.cat([prompt, inputs_embeds], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, count), attention_mask], dim=1)
        if position_ids is not None:
            ahead = torch.arange(count, device=position_ids.device).expand(batch, count)
            position_ids = torch.cat([ahead, position_ids + count], dim=1)
        deep = None
        if self.tuning == "deep_ptune":
            deep = self.intermediate_prompts.to(inputs_embeds.dtype).unsqueeze(1).expand(-1, batch, -1, -1)
        return inputs_embeds, attention_mask, position_ids, deep

    # -- transformers plumbing --------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def _supports_default_dynamic_cache(self) -> bool:
        return False  # the caches live on the nodes; generate() passes a RemoteCache instead

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the checkpoint

    def close(self) -> None:
        self.swarm.close()

    def inference_session(self, max_length: int) -> SyncSession:
        """An explicit session (context manager) to step through by hand or share across generate calls."""
        return self.swarm.open_session(max_length)

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RemoteCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        deep, prompted = None, False
        if self.tuning is not None:
            if cache is None or cache.session.position == 0:  # a pass, or a session's first step: prompt first
                inputs_embeds, attention_mask, position_ids, deep = self._prepend_prompts(inputs_embeds, attention_mask,
                                                                                          position_ids)
                prompted = True
            else:  # later steps of a session that holds the prompt: positions and mask count it
                count = self.prompt_embeddings.shape[0]
                position_ids = position_ids + count if position_ids is not None else None
                if attention_mask is not None:
                    attention_mask = torch.cat(
                        [attention_mask.new_ones(attention_mask.shape[0], count), attention_mask], 1
                    )
        tokens = inputs_embeds.shape[1]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: nothing to send (the nodes assume all ones)
        convoys = cache is not None and self.swarm.config.convoys
        if cache is not None:
            if convoys:  # with the other sessions of its last head product (client/combine.py)
                self.head_calls.depart(cache.session, cache.session.next_convoy, tokens)
            new_mask = attention_mask[:, -tokens:] if attention_mask is not None else None
            try:
                if (
                    deep is not None
                ):  # deep_ptune: the session's first step carries each hop's slice of the deep prompts
                    hidden = cache.session.step(inputs_embeds, position_ids, new_mask, deep)
                else:
                    hidden = cache.session.step(inputs_embeds, position_ids, new_mask)
            except BaseException:
                if convoys:
                    self.head_calls.abandon(cache.session)
                raise
        else:
            if attention_mask is not None and attention_mask.shape[1] != tokens:
                raise ValueError("without a cache, attention_mask must cover exactly the given tokens")
            if deep is not None or (torch.is_grad_enabled() and inputs_embeds.requires_grad):
                # training (or deep prompts): differentiable hop by hop (client/training.py); inference keeps the
                # plain pass
                hidden = self.swarm.train_forward(inputs_embeds, position_ids, attention_mask, deep)
            else:
                hidden = self.swarm.forward(inputs_embeds, position_ids, attention_mask)
        if prompted:
            hidden = hidden[
                :, self.prompt_embeddings.shape[0] :
            ]  # outputs at the prompt's positions are not the model's
        hidden = hidden.to(device=inputs_embeds.device, dtype=self.norm.weight.dtype)
        hidden = self.norm(hidden)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        hidden = hidden[:, keep, :]
        with saved_torch_threads():  # inside generate: the head gets torch's threads back (model/torch_threads.py)
            if torch.is_grad_enabled():
                logits = self.lm_head(hidden)
            elif convoys:  # its next step travels with the other sessions of this product (a convoy)
                logits, cache.session.next_convoy = self.head_calls.combined(hidden, cache.session.arrived_convoy,
                                                                             cache.session)
            else:
                logits = self.head_calls(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    # -- generate ---------------------------------------------------------------------------------
    draft_schedule = "adaptive"  # prompt lookup's draft length: "adaptive" (client/draft.py) or "fixed" (transformers')
    last_draft: AdaptiveDraft | None = None  # the last generate's draft lengths (with prompt lookup, adaptive)

    def _get_candidate_generator(self, generation_config, *args, **kwargs):
        generator = super()._get_candidate_generator(generation_config, *args, **kwargs)
        if self.draft_schedule == "adaptive" and isinstance(generator, PromptLookupCandidateGenerator):
            generator = self.last_draft = AdaptiveDraft(generator, generation_config.prompt_lookup_num_tokens,
                                                        self.calls.alone)
        if _DRAFT_STOPS.get():
            generator = StopAwareDraft(generator, _DRAFT_STOPS.get())
        return generator

    def _get_logits_processor(self, *args, **kwargs):
        """transformers' processors, the same scores at a decode step's cost (client/processors.py)."""
        return LeanProcessors(super()._get_logits_processor(*args, **kwargs))

    @staticmethod
    def _draft_stops(config: GenerationConfig, kwargs: dict) -> tuple:
        """The stop-string criteria of a generate call that drafts (empty if it does not, or has none)."""
        if not (kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens)
                or kwargs.get("assistant_model") is not None):
            return ()
        stops = [c for c in kwargs.get("stopping_criteria") or () if isinstance(c, StopStringCriteria)]
        strings = kwargs.get("stop_strings", config.stop_strings)
        if strings and kwargs.get("tokenizer") is not None:
            stops.append(StopStringCriteria(kwargs["tokenizer"], [strings] if isinstance(strings, str) else strings))
        return tuple(stops)

    @torch.inference_mode()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs):
        """transformers' generate, with an inference session sized for the prompt plus the new tokens; torch's
        small operations run on this thread alone meanwhile, the head on torch's threads
        (common/weights/threads.py)."""
        with one_torch_thread():
            return self._generate(inputs, generation_config, **kwargs)

    def _generate(self, inputs: torch.Tensor | None, generation_config: GenerationConfig | None, **kwargs):
        if kwargs.get("cache") is not None or kwargs.get("use_cache") is False:
            return super().generate(inputs, generation_config, **kwargs)
        config = generation_config or self.generation_config
        num_beams = kwargs.get("num_beams", config.num_beams) or 1
        if num_beams > 1:
            raise NotImplementedError("beam search through the swarm is not supported yet; use greedy or sampling")
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if prompt is None:
            raise ValueError("pass the prompt as input_ids (or inputs_embeds)")
        max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
        max_length = prompt.shape[1] + max_new if max_new is not None else kwargs.get("max_length", config.max_length)
        lookup = kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens) or 0
        max_length += lookup
        offset = (
            self.prompt_embeddings.shape[0] if self.tuning is not None else 0
        )  # ptune: the session holds the prompt
        if self.tuning == "deep_ptune" and self.swarm.config.verify != "off":
            raise NotImplementedError("verify with deep prompts (deep_ptune) is not supported yet; use verify='off'")
        with self.calls.call():
            if lookup and self.draft_schedule == "adaptive" and not self.calls.alone():
                # other sessions of this client run: this one would not draft (draft.py), so it skips the
                # assisted loop's bookkeeping too
                kwargs["prompt_lookup_num_tokens"] = None
            stops = _DRAFT_STOPS.set(self._draft_stops(config, kwargs))  # drafts end before a stop string (draft.py)
            try:
                if self.swarm.config.verify == "off":
                    with self.inference_session(max_length=max_length + offset) as session:
                        self.last_session = session  # its .route and .events (failovers) stay readable after generate
                        return super().generate(inputs, generation_config, cache=RemoteCache(session, offset), **kwargs)
                return self._verified_generate(inputs, generation_config, max_length, offset, **kwargs)
            finally:
                _DRAFT_STOPS.reset(stops)

    def _verified_generate(self, inputs, generation_config, max_length: int, offset: int = 0, **kwargs):
        """generate, verifying the nodes' outputs (client/verify.py). A node caught lying in a step whose
        output was already used is banned and the generation starts again from the same random state; a
        streamer sees the tokens it already got only once, or VerificationError if they turn out wrong."""
        streamer = kwargs.pop("streamer", None)
        guard = _RestartGuard(streamer) if streamer is not None else None
        states = _rng_states(self.device)
        for attempt in range(MAX_RESTARTS + 1):
            with self.inference_session(max_length=max_length + offset) as session:
                self.last_session = session
                try:
                    output = super().generate(
                        inputs, generation_config, cache=RemoteCache(session, offset), streamer=guard, **kwargs
                    )
                    session.settle()  # spot mode: the steps after the last check
                except VerificationRestart as error:
                    if attempt == MAX_RESTARTS:
                        raise
                    log.warning("%s: generating again", error)
                    _set_rng_states(states)
                    if guard is not None:
                        guard.rewind()
                    continue
            if guard is not None:
                guard.finish()
            return output


MAX_RESTARTS = 3  # generations started again after catching a node lying in an already used step
# the stop-string criteria of the generate call running in this thread, for its drafts (StopAwareDraft)
_DRAFT_STOPS: ContextVar[tuple] = ContextVar("draft_stops", default=())


def _rng_states(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None


def _set_rng_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


class _RestartGuard(BaseStreamer):
    """Passes generate's values on to `streamer`. After a restart it holds back what it already passed on,
    as long as the new values repeat it (streamed text cannot be taken back: VerificationError if they do
    not), and `end` waits until the answer is verified (`finish`). Values are compared one by one, not put by
    put: with speculative decoding an attempt may bring the same tokens in other groups."""

    def __init__(self, streamer: BaseStreamer):
        self.streamer = streamer
        self.sent: list[int] = []  # every value passed on, in order (a streamer follows one sequence)
        self.seen = 0              # values this attempt has put so far

    def put(self, value: torch.Tensor) -> None:
        value = value.detach().cpu()
        values = value.reshape(-1).tolist()
        repeated = max(0, min(len(self.sent) - self.seen, len(values)))  # values this put repeats
        if values[:repeated] != self.sent[self.seen : self.seen + repeated]:
            raise VerificationError("a node returned wrong activations and tokens already streamed were wrong")
        self.seen += len(values)
        if repeated == len(values):
            return
        self.sent.extend(values[repeated:])
        self.streamer.put(value if repeated == 0 else value.reshape(-1)[repeated:])

    def end(self) -> None:
        pass

    def rewind(self) -> None:
        self.seen = 0

    def finish(self) -> None:
        self.streamer.end()
