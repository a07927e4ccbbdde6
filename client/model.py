"""A transformers-compatible causal LM whose decoder layers live on remote nodes.

The client holds the embeddings, the final norm and the LM head; `generate` works as in
transformers (sampling, stopping criteria, streamers, logits processors), with the KV
caches kept on the nodes of an inference session."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import CausalLMOutputWithPast

from client.config import ClientConfig
from client.swarm import SwarmClient, SyncSession
from client.verify import VerificationError, VerificationRestart
from node.model.fast_linear import TransposedLinear
from node.model.loader import ModelFiles, config_hash, load_client_parts, parse_dtype, resolve_device

log = logging.getLogger(__name__)

# A tied head needs its own transposed copy: worth it below this size (SmolLM2's is 113 MB).
FAST_HEAD_COPY_BYTES = 512 * 2**20


class RemoteCache:
    """Stands where transformers expects a Cache: the real caches are on the nodes of `session`."""

    is_compileable = False
    is_linear = (False,)

    def __init__(self, session: SyncSession):
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.session.max_length


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
        self.swarm = swarm
        self.last_session: SyncSession | None = None

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
        config: ClientConfig | None = None,
    ) -> "DistributedModelForCausalLM":
        """Load the client's parts of `model` and find the nodes serving the rest.

        With `peers`, route through exactly those nodes; without, discover the swarm through the
        `bootstrap` nodes and/or mDNS (on `mdns_interface`). With `push` (the default), nodes forward
        each step along the chain themselves; `push=False` sends every hop its step from the client.
        A private swarm needs its `swarm_key` file; `tls="auto"` (or `"ca"` with `tls_ca`) encrypts every hop.
        `verify="spot"` or `"full"` recomputes hops on other nodes and bans nodes caught lying (client/verify.py)."""
        config = config or ClientConfig(
            peers=tuple(peers), bootstrap=tuple(bootstrap), mdns=mdns, mdns_interface=mdns_interface, device=device,
            dtype=dtype, wire_dtype=wire_dtype, push=push, swarm_key=swarm_key, tls=tls, tls_ca=tls_ca, verify=verify,
        )
        files = ModelFiles.open(model, revision=revision)
        parts = load_client_parts(files, resolve_device(config.device), parse_dtype(config.dtype))
        swarm = SwarmClient(config, parts.config.num_hidden_layers, parts.config.hidden_size, config_hash(parts.config))
        try:
            swarm.route()  # fail now, with a clear message, if the peers do not cover the model
        except BaseException:
            swarm.close()
            raise
        head = parts.lm_head
        if head.weight.device.type == "cpu" and type(head) is torch.nn.Linear and (
            head.weight is not parts.embed_tokens.weight or head.weight.numel() * head.weight.element_size() <= FAST_HEAD_COPY_BYTES
        ):
            head = TransposedLinear.from_linear(head)  # ~2x faster one-token logits on CPU
        instance = cls(parts.config, parts.embed_tokens, parts.norm, head, swarm)
        instance.name_or_path = files.model_id
        try:
            instance.generation_config = GenerationConfig.from_pretrained(files.root)
        except OSError:
            instance.generation_config = GenerationConfig.from_model_config(parts.config)
        return instance.eval()

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
        tokens = inputs_embeds.shape[1]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: nothing to send (the nodes assume all ones)
        if cache is not None:
            new_mask = attention_mask[:, -tokens:] if attention_mask is not None else None
            hidden = cache.session.step(inputs_embeds, position_ids, new_mask)
        else:
            if attention_mask is not None and attention_mask.shape[1] != tokens:
                raise ValueError("without a cache, attention_mask must cover exactly the given tokens")
            hidden = self.swarm.forward(inputs_embeds, position_ids, attention_mask)
        hidden = hidden.to(device=inputs_embeds.device, dtype=self.norm.weight.dtype)
        hidden = self.norm(hidden)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    # -- generate ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs):
        """transformers' generate, with an inference session sized for the prompt plus the new tokens."""
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
        if self.swarm.config.verify == "off":
            with self.inference_session(max_length=max_length) as session:
                self.last_session = session  # its .route and .events (failovers) stay readable after generate
                return super().generate(inputs, generation_config, cache=RemoteCache(session), **kwargs)
        return self._verified_generate(inputs, generation_config, max_length, **kwargs)

    def _verified_generate(self, inputs, generation_config, max_length: int, **kwargs):
        """generate, verifying the nodes' outputs (client/verify.py). A node caught lying in a step whose
        output was already used is banned and the generation starts again from the same random state; a
        streamer sees the tokens it already got only once, or VerificationError if they turn out wrong."""
        streamer = kwargs.pop("streamer", None)
        guard = _RestartGuard(streamer) if streamer is not None else None
        states = _rng_states(self.device)
        for attempt in range(MAX_RESTARTS + 1):
            with self.inference_session(max_length=max_length) as session:
                self.last_session = session
                try:
                    output = super().generate(inputs, generation_config, cache=RemoteCache(session), streamer=guard,
                                              **kwargs)
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


def _rng_states(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None


def _set_rng_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


class _RestartGuard(BaseStreamer):
    """Passes generate's values on to `streamer`. After a restart it holds back what it already passed on,
    as long as the new values repeat it (streamed text cannot be taken back: VerificationError if they do
    not), and `end` waits until the answer is verified (`finish`)."""

    def __init__(self, streamer: BaseStreamer):
        self.streamer = streamer
        self.sent: list[torch.Tensor] = []
        self.seen = 0

    def put(self, value: torch.Tensor) -> None:
        value = value.detach().cpu()
        if self.seen < len(self.sent):
            if not torch.equal(value, self.sent[self.seen]):
                raise VerificationError("a node returned wrong activations and tokens already streamed were wrong")
            self.seen += 1
            return
        self.sent.append(value.clone())
        self.seen += 1
        self.streamer.put(value)

    def end(self) -> None:
        pass

    def rewind(self) -> None:
        self.seen = 0

    def finish(self) -> None:
        self.streamer.end()
