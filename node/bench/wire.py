"""`potluck bench-wire`: what each wire format costs in bytes, and what it changes in the output.

A chain of real `potluck join` processes (0:10, 10:20, 20:30 on SmolLM2). For every wire format:

- bytes: a prefill and decode steps are sent through the chain on plain Inference streams, one
  per node, the way a client without push drives them; the size of every step request a hop
  receives and every result it sends back is `len(message.SerializeToString())` (protobuf
  overhead included; gRPC's 5-byte message prefix and HTTP/2 frame headers are not counted).
- error: the same streams carry a few fixed prompts and then `decode_steps` more tokens (the
  float32 wire's greedy tokens, so every format sees the same inputs); the final hidden states
  (the last node's output, before the final norm) are compared with the float32 wire's.
- exactness: the real client (`DistributedModelForCausalLM`, wire format set in its
  ClientConfig) generates `new_tokens` greedy tokens for a few chat prompts; they are compared
  with plain transformers' greedy tokens.

Nothing here is timed, so a busy machine does not change the numbers."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from common.wire import codec, contract
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc

MARK_START = "<!-- bench:wire:start -->"
MARK_END = "<!-- bench:wire:end -->"
FORMATS = contract.WIRE_FORMATS
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about sharing food with neighbours.",
    "Explain photosynthesis in two sentences.",
    "List three uses of a paperclip.",
)
TEXT_PROMPTS = (  # for the error: plain text, no chat template
    "The three primary colours are",
    "def fibonacci(n):",
    "The history of the Roman Empire begins with a small town on the banks of the Tiber, where",
)
CHAIN = 3
NODE_FLAGS = ("--no-mdns",)
START_TIMEOUT = 180.0
STEP_TIMEOUT = 120.0


@dataclass(frozen=True)
class WireSettings:
    model: Path                                     # model folder: config.json + safetensors (+ tokenizer)
    formats: tuple[str, ...] = FORMATS              # wire formats measured; float32 is always added first
    chat_prompts: tuple[str, ...] = CHAT_PROMPTS    # greedy comparison (seeded random ids without a tokenizer)
    text_prompts: tuple[str, ...] = TEXT_PROMPTS    # error of the final hidden states
    new_tokens: int = 32                            # greedy tokens per chat prompt
    decode_steps: int = 8                           # one-token steps after each text prompt (error and decode bytes)
    prefill_tokens: int = 128                       # length of the seeded random prompt whose prefill is measured
    threads: int = 2                                # torch threads per node and here
    out: Path | None = None                         # markdown file whose bench:wire section is (re)written
    command: str = ""                               # the command line, quoted in the report
    seed: int = 0                                   # seed of the random prompts

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ValueError(f"--formats {','.join(self.formats)}: choose from {', '.join(FORMATS)}")
        if min(self.new_tokens, self.decode_steps, self.prefill_tokens, self.threads) < 1:
            raise ValueError("--new-tokens, --decode-steps, --prefill-tokens and --threads must be at least 1")
        if not self.chat_prompts or not self.text_prompts:
            raise ValueError("give at least one chat prompt and one text prompt")
        if self.out is not None and (self.out.is_dir() or not self.out.parent.is_dir()):
            raise ValueError(f"--out {self.out}: give a markdown file in an existing folder")

    @property
    def all_formats(self) -> tuple[str, ...]:
        return ("float32", *(f for f in self.formats if f != "float32"))


@dataclass
class FormatResult:
    wire: str
    decode_in: int = 0                 # bytes of one decode step request, one hop (mean over hops and steps)
    decode_out: int = 0                # bytes of its result
    prefill_in: int = 0                # bytes of the prefill request, one hop
    prefill_out: int = 0
    max_error: float = 0.0             # max |final hidden - float32 wire's| over every measured position
    mean_error: float = 0.0
    tokens: list[list[int]] = field(default_factory=list)   # greedy tokens through the swarm, per chat prompt

    @property
    def decode_per_token(self) -> float:
        return self.decode_in + self.decode_out


@dataclass
class WireResult:
    settings: WireSettings
    spans: list[tuple[int, int]]
    hidden_size: int
    prompts: str                       # how the prompts were made
    prefill_tokens: int
    measured_positions: int            # positions in the error measurement
    max_hidden: float                  # max |final hidden| on the float32 wire, for scale
    reference: list[list[int]]         # plain transformers' greedy tokens, per chat prompt
    formats: list[FormatResult]
    machine: dict[str, str]
    seconds: float = 0.0
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def format(self, wire: str) -> FormatResult:
        return next(f for f in self.formats if f.wire == wire)

    def identical(self, result: FormatResult) -> int:
        return sum(a == b for a, b in zip(result.tokens, self.reference))


# -- a bare chain of Inference streams ------------------------------------------------------------
class Chain:
    """One Inference stream per node, opened with a wire format; steps go hop by hop from here."""

    def __init__(self, addresses: list[str], spans: list[tuple[int, int]], wire: str, max_length: int):
        self.addresses, self.spans, self.wire, self.max_length = addresses, spans, wire, max_length
        self.position = 0
        self.sizes: list[tuple[int, int, int]] = []  # (tokens, request bytes, reply bytes), every hop of every step
        self._channels: list = []
        self._calls: list = []

    async def __aenter__(self) -> "Chain":
        options = [("grpc.max_send_message_length", codec.MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", codec.MAX_MESSAGE_BYTES)]
        session = uuid.uuid4().hex
        for index, (address, (start, end)) in enumerate(zip(self.addresses, self.spans)):
            channel = grpc.aio.insecure_channel(address, options=options)
            self._channels.append(channel)
            call = pb_grpc.PotluckStub(channel).Inference(timeout=STEP_TIMEOUT * 10)
            self._calls.append(call)
            await call.write(pb.SessionRequest(open=pb.OpenSession(
                session_id=f"{session}-{index}", start=start, end=end, max_length=self.max_length, batch_size=1,
                wire_dtype=self.wire)))
            reply = await asyncio.wait_for(call.read(), STEP_TIMEOUT)
            if reply is grpc.aio.EOF or reply.WhichOneof("kind") != "opened":
                raise RuntimeError(f"{address}: no `opened` reply: {await call.details()}")
        return self

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, tokens, hidden_size] -> the last node's output (decoded), recording every message's size."""
        tokens = hidden.shape[1]
        message = codec.encode_hidden(hidden, self.wire)
        for address, call in zip(self.addresses, self._calls):
            request = pb.SessionRequest(step=pb.Step(hidden=message, position=self.position, step_id=len(self.sizes)))
            await call.write(request)
            reply = await asyncio.wait_for(call.read(), STEP_TIMEOUT)
            if reply is grpc.aio.EOF or reply.WhichOneof("kind") != "result":
                raise RuntimeError(f"{address}: no result: {await call.details()}")
            self.sizes.append((tokens, len(request.SerializeToString()), len(reply.SerializeToString())))
            message = reply.result.hidden
        self.position += tokens
        return codec.decode_tensor(message, "hidden").float().clone()

    async def __aexit__(self, *exc) -> None:
        for call in self._calls:
            if not call.done():
                try:
                    await call.write(pb.SessionRequest(close=pb.CloseSession()))
                    await call.done_writing()
                except (
                    grpc.aio.AioRpcError,
                    asyncio.InvalidStateError,
                ):  # the node ended the stream; it frees the session anyway
                    pass
                call.cancel()
        for channel in self._channels:
            await channel.close()


def _sizes(chains: list[Chain], prefill: bool) -> tuple[int, int]:
    """Mean request and reply bytes per hop: of the prefill steps (tokens > 1) or the decode steps."""
    rows = [(i, o) for chain in chains for tokens, i, o in chain.sizes if (tokens > 1) == prefill]
    return round(sum(i for i, _ in rows) / len(rows)), round(sum(o for _, o in rows) / len(rows))


async def probe_format(
    addresses,
    spans,
    wire: str,
    embed,
    prefill: torch.Tensor,
    texts: list[tuple[torch.Tensor, list[int]]],
    max_length: int,
) -> tuple[list[torch.Tensor], list[Chain]]:
    """Final hidden states of every text prompt (+ its forced continuation), and the chains that carried them."""
    outputs, chains = [], []
    async with Chain(addresses, spans, wire, max_length) as chain:
        await chain.step(embed(prefill))
        chains.append(chain)
    for ids, forced in texts:
        async with Chain(addresses, spans, wire, max_length) as chain:
            hidden = [await chain.step(embed(ids))]
            for token in forced:
                hidden.append(await chain.step(embed(torch.tensor([[token]]))))
            outputs.append(torch.cat(hidden, dim=1))
            chains.append(chain)
    return outputs, chains


# -- measuring ------------------------------------------------------------------------------------
def _prompts(settings: WireSettings, config) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """(chat prompt ids, text prompt ids, how they were made): the tokenizer's, or seeded random ids."""
    from node.bench.basic import prompt_ids

    if any((settings.model / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        from client.textgen import encode_prompt

        tokenizer = AutoTokenizer.from_pretrained(settings.model)
        chat = [encode_prompt(tokenizer, p, bool(tokenizer.chat_template)) for p in settings.chat_prompts]
        text = [encode_prompt(tokenizer, p, False) for p in settings.text_prompts]
        return chat, text, "the model's tokenizer" + (" and chat template" if tokenizer.chat_template else "")
    chat = [prompt_ids(config, 8 + 4 * i, settings.seed + i) for i in range(len(settings.chat_prompts))]
    text = [prompt_ids(config, 6 + 4 * i, settings.seed + 100 + i) for i in range(len(settings.text_prompts))]
    return chat, text, f"seeded random ids (seed {settings.seed}; the folder has no tokenizer)"


def _greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                            temperature=None, top_p=None, top_k=None)
    return output[0, ids.shape[1]:].tolist()


def run_wire_bench(settings: WireSettings, console: Console | None = None) -> WireResult:
    """Reference tokens locally, then every format through one chain of node processes (stopped at the end)."""
    from transformers import AutoModelForCausalLM

    from client import ClientConfig, DistributedModelForCausalLM
    from common.weights.files import ModelFiles
    from node.bench.basic import machine_info, prompt_ids
    from node.bench.recovery import NodePool
    from node.launcher import even_spans

    console = console or Console(stderr=True)
    began = time.monotonic()
    config = ModelFiles.open(str(settings.model)).config()
    spans = even_spans(config.num_hidden_layers, CHAIN)
    machine = machine_info(settings.threads)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    chat, texts, how = _prompts(settings, config)
    prefill = prompt_ids(config, settings.prefill_tokens, settings.seed)
    longest = max(max(i.shape[1] for i in chat) + settings.new_tokens,
                  max(i.shape[1] for i in texts) + settings.decode_steps, settings.prefill_tokens)
    formats = settings.all_formats
    results = [FormatResult(wire) for wire in formats]
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, refresh_per_second=4) as progress, \
                tempfile.TemporaryDirectory(prefix="potluck-bench-wire-") as scratch, torch.no_grad():
            task = progress.add_task("local transformers: reference tokens", total=2 + 2 * len(formats))

            def tick(message: str) -> None:
                progress.update(task, advance=1, description=message)

            local = AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32).eval()
            reference = [_greedy(local, ids, settings.new_tokens) for ids in chat]
            forced = [(ids, _greedy(local, ids, settings.decode_steps)) for ids in texts]
            embed = local.get_input_embeddings()
            tick(f"starting the chain {', '.join(f'{a}:{b}' for a, b in spans)}")
            pool = NodePool(settings.model, settings.threads, Path(scratch))
            try:
                pool.start(spans)
                addresses = [n.address for n in pool.live()]
                finals: dict[str, list[torch.Tensor]] = {}
                for result in results:
                    tick(f"{result.wire}: steps through the chain")
                    finals[result.wire], chains = asyncio.run(
                        probe_format(addresses, spans, result.wire, embed, prefill, forced, longest))
                    result.prefill_in, result.prefill_out = _sizes(chains[:1], prefill=True)
                    result.decode_in, result.decode_out = _sizes(chains, prefill=False)
                    errors = torch.cat(
                        [(a - b).abs().flatten() for a, b in zip(finals[result.wire], finals["float32"])]
                    )
                    result.max_error, result.mean_error = errors.max().item(), errors.mean().item()
                    tick(f"{result.wire}: greedy generation with the client")
                    client = DistributedModelForCausalLM.from_pretrained(
                        str(settings.model),
                        config=ClientConfig(peers=tuple(addresses), mdns=False, wire_dtype=result.wire),
                    )
                    try:
                        result.tokens = [_greedy(client, ids, settings.new_tokens) for ids in chat]
                    finally:
                        client.close()
            finally:
                codes = pool.stop_all()
            progress.update(task, completed=progress.tasks[0].total, description="done")
            if any(code not in (0, None) for code in codes):
                console.print(f"[yellow]nodes exited with codes {codes}[/]")
    finally:
        torch.set_num_threads(threads_before)
    positions = sum(f.shape[1] for f in finals["float32"])
    max_hidden = max(f.abs().max().item() for f in finals["float32"])
    return WireResult(settings, spans, config.hidden_size, how, settings.prefill_tokens, positions, max_hidden,
                      reference, results, machine, seconds=time.monotonic() - began)


# -- reporting ------------------------------------------------------------------------------------
def _first_difference(tokens: list[int], reference: list[int]) -> int | None:
    for index, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return index
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def render_markdown(result: WireResult) -> str:
    s, m = result.settings, result.machine
    base = result.format("float32")
    n = len(result.reference)
    lines = [
        "## Hidden states on the wire: bytes per token and exactness, per wire format",
        "",
        f"- date: {result.date}; the whole bench took {result.seconds:.0f} s (nothing is timed)",
        f"- machine: {m['cpu']}; {m['os']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}",
        f"- command: `{s.command or 'potluck bench-wire --model ' + str(s.model)}`",
        f"- settings: model `{s.model.name}` fp32 (hidden size {result.hidden_size}); {CHAIN} `potluck join` processes "
        f"on loopback serving {', '.join(f'{a}:{b}' for a, b in result.spans)}. Bytes: `len(SerializeToString())` "
        "of the step request a hop receives (in) and the result it sends back (out), protobuf overhead included "
        "(gRPC's 5-byte prefix and HTTP/2 frame headers are not), on real steps sent hop by hop from the client; "
        f"decode = one-token steps (mean over {len(s.text_prompts)} prompt(s) x {s.decode_steps} steps x "
        f"{CHAIN} hops), prefill = a {result.prefill_tokens}-token prompt. Error: the last node's output (final "
        f"hidden states, before the norm) against the float32 wire's, over {result.measured_positions} positions "
        f"({len(s.text_prompts)} text prompts, each followed by {s.decode_steps} decode steps fed the same tokens); "
        f"max |hidden| there is {result.max_hidden:.4g}. Greedy: {s.new_tokens} new tokens for {n} chat prompt(s), "
        f"made with {result.prompts}, through `DistributedModelForCausalLM` with that `wire_dtype`, against plain "
        "transformers' `generate` on the same weights.",
        "",
        "| wire format | decode: in + out bytes per hop | **decode bytes / token / hop** | prefill bytes / token / hop "
        "| vs float32 | max abs error (mean) vs float32 wire | greedy tokens = transformers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in result.formats:
        prefill = (f.prefill_in + f.prefill_out) / result.prefill_tokens
        base_prefill = (base.prefill_in + base.prefill_out) / result.prefill_tokens
        same = result.identical(f)
        lines.append(
            f"| {f.wire} | {f.decode_in:,} + {f.decode_out:,} | **{f.decode_per_token:,}** | {prefill:,.0f} "
            f"| {f.decode_per_token / base.decode_per_token:.2f} / {prefill / base_prefill:.2f} "
            f"| {f.max_error:.3g} ({f.mean_error:.2g}) | "
            f"{'**' if same == n else ''}{same}/{n}{'**' if same == n else ''} |"
        )
    lines += ["", "\"vs float32\" is decode / prefill. " + _differences(result), "", _interpretation(result), ""]
    return "\n".join(lines)


def _differences(result: WireResult) -> str:
    notes = []
    for f in result.formats:
        firsts = [_first_difference(t, r) for t, r in zip(f.tokens, result.reference)]
        if any(i is not None for i in firsts):
            notes.append(f"{f.wire}: " + ", ".join("same" if i is None else f"from token {i + 1}" for i in firsts))
    if not notes:
        return "Every format gave plain transformers' greedy tokens on every prompt."
    return "Where greedy tokens part from plain transformers' (per chat prompt, in order): " + "; ".join(notes) + "."


def _interpretation(result: WireResult) -> str:
    h = result.hidden_size
    blocks = -(-h // codec.BLOCK)
    scale = codec.SCALE_DTYPE.itemsize
    text = (
        f"How to read it: a decode step carries one token's hidden states, {h} values, each way; float32 takes 4 "
        f"bytes a value, bfloat16 and float16 2, int8 1 plus a {scale}-byte scale per block of {codec.BLOCK} values "
        f"({h} + {blocks * scale} bytes). The rest of each message (shape, dtype name, step id, position, field tags) "
        "is a few dozen bytes, so at one token it still shows in the ratios; over a prefill it vanishes. With push "
        "(nodes forwarding steps along the chain) a hop also sends its output on to the next node: one more message "
        "of the same size. Error: float32 is the reference (0 by definition); bfloat16 keeps 8 bits of mantissa, "
        "float16 11 (but overflows above 65504), int8 7 bits of its block's largest value, so small values in a block "
        "with a large one lose the most. Each node's input is already rounded, so the error compounds over the hops. "
    )
    int8 = next((f for f in result.formats if f.wire == "int8"), None)
    bf16 = next((f for f in result.formats if f.wire == "bfloat16"), None)
    if int8 is not None and result.max_hidden > 0:
        text += (
            f"Here int8's largest error is {int8.max_error / result.max_hidden:.1%} of the largest hidden value"
            + (
                f", and its mean error {int8.mean_error / bf16.mean_error:.0f}x bfloat16's"
                if bf16 and bf16.mean_error
                else ""
            )
            + ". "
        )
    return text + ("Whether an error flips a greedy token depends on how close the top two logits are, so the table "
                   "counts prompts: equality on these prompts is a measurement, not a promise.")


def write_section(path: Path, section: str) -> None:
    from node.bench.basic import write_section as write_marked

    write_marked(path, section, MARK_START, MARK_END)


# -- command line ---------------------------------------------------------------------------------
def _formats(value: str) -> tuple[str, ...]:
    formats = tuple(v.strip() for v in value.split(",") if v.strip())
    if not formats or any(f not in FORMATS for f in formats):
        raise argparse.ArgumentTypeError(f"{value!r}: comma-separated wire formats from {', '.join(FORMATS)}")
    return formats


def add_wire_bench_parser(commands) -> None:
    bench = commands.add_parser("bench-wire", help="benchmark wire formats: bytes per token per hop, error, exactness")
    bench.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    bench.add_argument("--formats", type=_formats, default=FORMATS,
                       help=f"comma-separated wire formats (default {','.join(FORMATS)}; float32 is always measured)")
    bench.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per chat prompt (default 32)")
    bench.add_argument("--decode-steps", type=int, default=8, help="decode steps after each text prompt (default 8)")
    bench.add_argument("--prefill-tokens", type=int, default=128, help="length of the measured prefill (default 128)")
    bench.add_argument("--threads", type=int, default=2, help="torch threads per node and here (default 2)")
    bench.add_argument("--out", default=None, help="markdown file to write the results into (default: print only)")
    bench.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_wire_bench_cli(args: argparse.Namespace) -> None:
    model = Path(args.model).expanduser()
    if not model.is_dir():
        raise ValueError(f"--model {args.model}: not a folder (bench-wire needs a local model folder)")
    settings = WireSettings(
        model=model, formats=tuple(args.formats), new_tokens=args.new_tokens, decode_steps=args.decode_steps,
        prefill_tokens=args.prefill_tokens, threads=args.threads, out=Path(args.out) if args.out else None,
        command=shlex.join(["potluck", *sys.argv[1:]]),
    )
    section = render_markdown(run_wire_bench(settings))
    if settings.out is not None:
        write_section(settings.out, section)
        Console(stderr=True).print(f"wrote {settings.out}")
    print(section)
