"""One completion through the swarm: sampling settings in, text deltas and a finish reason out.

Blocking (it calls `generate`); the HTTP layer runs it on one of its generation threads. Stop
strings are cut here, on the decoded text, so the streamed deltas and the whole text
always agree: both are what `TextTracker` let through.

Requests generate side by side (their steps travel the chain as convoys and share head
products), except a request with a seed: torch's random generator is one per process, so a
seeded generation runs alone (`GATE`), which keeps it reproducible."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from client.model import DistributedModelForCausalLM


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0    # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None     # seeds torch's global RNG: such a generation runs alone (GATE)
    stop: tuple[str, ...] = ()  # the text ends before the first of these; generation stops there
    prompt_lookup: int = 0      # speculative decoding by prompt lookup, drafts of up to this many tokens (0: off)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    prompt_tokens: int
    completion_tokens: int  # every token generated, EOS and the tokens of a stop string included


def visible_text(text: str, stops: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """The part of `text` that may be shown, and whether a stop string was found.

    Cut at the earliest stop string. Unless `final`, also hold back an incomplete character
    and any tail that could still grow into a stop string."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], True
    if final:
        return text, False
    if text.endswith("\ufffd"):  # a multi-byte character the next token completes
        text = text[: text.rfind("\ufffd")]
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False


class TextTracker(BaseStreamer, StoppingCriteria):
    """Streamer and stopping criterion of one generation: decodes the new tokens, passes on
    text as it becomes safe to show, and stops at a stop string or when `cancelled` is set.

    `on_start` is called when generate() has its route and begins the prefill."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...], cancelled: threading.Event,
                 on_start: Callable[[], None] | None = None, on_text: Callable[[str], None] | None = None):
        self.tokenizer = tokenizer
        self.stops = stops
        self.cancelled = cancelled
        self.on_start = on_start
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""  # what has been let through so far
        self.stopped = False  # a stop string was found
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() sends the prompt first
            self._prompt_seen = True
            if self.on_start is not None:
                self.on_start()
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._advance(final=False)

    def end(self) -> None:
        self._advance(final=True)

    def _advance(self, final: bool) -> None:
        if self.stopped:
            return
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        shown, self.stopped = visible_text(decoded, self.stops, final)
        if len(shown) > len(self.text):
            delta = shown[len(self.text) :]
            self.text = shown
            if self.on_text is not None:
                self.on_text(delta)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = self.stopped or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def eos_ids(model: DistributedModelForCausalLM, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class GenerationGate:
    """Generations run side by side (`shared`), but one that needs torch's global RNG to itself (`alone`) waits
    until the others are done, and holds back new ones until it is (so it is not starved)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.running = 0
        self.most_running = 0  # the most generations seen running at once (for tests and curious operators)
        self._alone = False
        self._waiting_alone = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            while self._alone or self._waiting_alone:
                self._changed.wait()
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            yield
        finally:
            with self._changed:
                self.running -= 1
                self._changed.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._waiting_alone += 1
            while self._alone or self.running:
                self._changed.wait()
            self._waiting_alone -= 1
            self._alone = True
            self.most_running = max(self.most_running, 1)
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()


GATE = GenerationGate()  # one per process, as torch's RNG


def complete(
    model: DistributedModelForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    params: SamplingParams,
    cancelled: threading.Event | None = None,
    on_start: Callable[[], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Completion:
    """Generate for `input_ids` (shape 1 x prompt); `on_text` gets each new piece of text."""
    tracker = TextTracker(tokenizer, params.stop, cancelled or threading.Event(), on_start, on_text)
    kwargs = dict(max_new_tokens=params.max_new_tokens, attention_mask=torch.ones_like(input_ids))
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if params.prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = params.prompt_lookup
        if params.stop:  # drafts then end before a stop string (client/draft.py): no tokens generated past it
            kwargs.update(stop_strings=list(params.stop), tokenizer=tokenizer)
    if model.generation_config.pad_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    with GATE.alone() if params.seed is not None else GATE.shared():
        if params.seed is not None:
            torch.manual_seed(params.seed)
        output = model.generate(
            input_ids, streamer=tracker, stopping_criteria=StoppingCriteriaList([tracker]), **kwargs
        )
    new_ids = output[0, input_ids.shape[1] :].tolist()
    if tracker.stopped or (new_ids and new_ids[-1] in eos_ids(model, tokenizer)):
        finish = "stop"
    else:
        finish = "length" if len(new_ids) >= params.max_new_tokens else "stop"
    return Completion(tracker.text, finish, input_ids.shape[1], len(new_ids))
