"""Text in, text out: tokenizer, chat template, streaming and timing around `generate`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from client.model import DistributedModelForCausalLM
from common.weights import gguf
from common.weights.errors import ModelLoadError
from common.weights.files import ModelFiles


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_seconds: float  # prompt in, first new token(s) out
    decode_seconds: float   # the remaining tokens
    total_seconds: float
    first_tokens: int = 1   # tokens that came with the prompt's pass (more than one when a draft was accepted)
    passes: int | None = None  # passes through the swarm, prompt included (None: not known)

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = len(self.token_ids) - self.first_tokens
        return decoded / self.decode_seconds if decoded > 0 and self.decode_seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.total_seconds if self.total_seconds > 0 else 0.0

    def as_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids}


@dataclass
class _TimingStreamer(BaseStreamer):
    """Records when tokens arrive and, if `out` is set, prints the text as it grows."""

    tokenizer: PreTrainedTokenizerBase
    out: TextIO | None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    first_tokens: int = 0
    _prompt_seen: bool = False
    _ids: list[int] = field(default_factory=list)
    _printed: int = 0

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first sends the prompt
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.first_tokens = value.numel()
        self._ids.extend(value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        if self.out is None:
            return
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        # hold back an incomplete multi-byte character until the next token completes it
        stable = text if final or not text.endswith("\ufffd") else text[: text.rfind("\ufffd")]
        if len(stable) > self._printed:
            self.out.write(stable[self._printed :])
            self.out.flush()
            self._printed = len(stable)


def load_tokenizer(model: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    files = ModelFiles.open(model, revision=revision)
    if files.gguf is not None:  # transformers' conversion of the file's vocabulary, written next to its config once
        gguf.ensure_tokenizer(gguf.read_header(files.gguf), files.root)
    try:
        return AutoTokenizer.from_pretrained(files.root)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the tokenizer of {files.model_id}: {str(error).splitlines()[0]}") from error


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("--chat: this model's tokenizer has no chat template")
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generate_text(
    model: DistributedModelForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    chat: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    out: TextIO | None = None,
    prompt_lookup: int = 0,
) -> GenerationResult:
    """Generate from `prompt` (the chat template around it with `chat`). `prompt_lookup` > 0: speculative decoding
    by prompt lookup, each pass through the swarm also checking up to that many tokens that followed the last
    tokens earlier in the text; exact (greedy output unchanged), faster when the answer repeats the text."""
    input_ids = encode_prompt(tokenizer, prompt, chat)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = temperature > 0
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sampling, attention_mask=torch.ones_like(input_ids))
    if sampling:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop:
        kwargs.update(stop_strings=stop, tokenizer=tokenizer)
    if prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup
    if model.generation_config.pad_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id
    streamer = _TimingStreamer(tokenizer, out)
    started = time.perf_counter()
    output = model.generate(input_ids, streamer=streamer, **kwargs)
    finished = time.perf_counter()
    new_ids = output[0, input_ids.shape[1] :].tolist()
    first = streamer.first_token_at or finished
    return GenerationResult(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        token_ids=new_ids,
        prompt_tokens=input_ids.shape[1],
        prefill_seconds=first - started,
        decode_seconds=finished - first,
        total_seconds=finished - started,
        first_tokens=max(streamer.first_tokens, 1),
        passes=model.last_session.steps if model.last_session is not None else None,
    )
