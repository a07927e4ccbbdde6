"""`potluck finetune`: train a soft prompt through the swarm (client/finetune.py) and save it, with a progress bar,
a loss per step and an optional loss plot."""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager

from common.wire.contract import WIRE_FORMATS
from node.cli.args import (
    add_logging,
    add_peers_arg,
    add_swarm_args,
    add_trust_args,
    bootstrap_list,
    discovery_options,
    positive,
    trust_options,
)
from node.config import ConfigError


def add_finetune_parser(commands) -> None:
    parser = commands.add_parser(
        "finetune", help="train a soft prompt through the swarm (the nodes' layers stay frozen)"
    )
    parser.add_argument("--model", required=True, help="model folder, .gguf file or hub id (the one the nodes serve)")
    parser.add_argument(
        "--data",
        required=True,
        help='JSONL file: {"text": ...} or {"prompt": ..., "completion": ...} a line (docs/finetune.md)',
    )
    parser.add_argument("--method", default="ptune", choices=["ptune", "deep_ptune"],
                        help="ptune: prompt embeddings before the input; deep_ptune: also prompts at every layer")
    parser.add_argument("--steps", type=positive, required=True, help="optimizer steps")
    parser.add_argument(
        "--out", required=True, help="where to save the prompt (torch file, for generate --prompt-weights)"
    )
    parser.add_argument("--num-prompt-tokens", type=positive, default=16, help="soft prompt tokens (default 16)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 0.01)")
    parser.add_argument("--batch-size", type=positive, default=4, help="examples per step (default 4)")
    parser.add_argument("--max-length", type=positive, default=256, help="tokens per example at most (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt's initialisation and the shuffling")
    parser.add_argument(
        "--plot", default=None, metavar="PNG", help="also draw the loss curve to this PNG (needs matplotlib)"
    )
    add_peers_arg(parser)
    parser.add_argument("--wire-dtype", default="float32", choices=WIRE_FORMATS,
                        help="activations and gradients on the wire (default float32)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary, not the loss of every step")
    add_swarm_args(parser)
    add_trust_args(parser)
    add_logging(parser)


@contextmanager
def _loss_bar(enabled: bool, total: int):
    """A rich progress bar with the last loss (common/progress.py's style), only when `enabled`."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("training", total=total, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.4f}")


def run_finetune_cli(args: argparse.Namespace) -> None:
    import torch

    from client.config import ClientConfig
    from client.finetune import plot_losses, read_examples, save_prompts, train
    from client.model import DistributedModelForCausalLM
    from client.textgen import load_tokenizer

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib (pip install matplotlib), or leave --plot out") from None
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ConfigError(f"--lr {args.lr}: expected a positive number")
    tokenizer = load_tokenizer(args.model)
    try:
        examples = read_examples(args.data, tokenizer, args.max_length)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    peers = args.peers
    config = ClientConfig(peers=peers, bootstrap=bootstrap_list(args.bootstrap), **discovery_options(args),
                          mdns=not args.no_mdns,
                          mdns_interface=args.mdns_interface, wire_dtype=args.wire_dtype, **trust_options(args))
    model = DistributedModelForCausalLM.from_pretrained(args.model, config=config)
    try:
        torch.manual_seed(args.seed)
        model.add_prompts(args.method, args.num_prompt_tokens)

        with _loss_bar(sys.stderr.isatty(), args.steps) as show:
            def on_step(step: int, loss: float) -> None:
                show(loss)
                if not args.quiet:
                    print(f"step {step:>{len(str(args.steps))}}/{args.steps}  loss {loss:.4f}", flush=True)

            result = train(model, examples, args.steps, args.lr, args.batch_size, pad_id, args.seed, on_step)
        save_prompts(model, args.out, {"losses": result.losses, "steps": args.steps, "lr": args.lr})
    finally:
        model.close()
    losses = result.losses
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps ({len(examples)} examples, "
          f"{result.seconds:.1f} s); per step {result.bytes_sent / len(losses) / 1e6:.2f} MB sent, "
          f"{result.bytes_received / len(losses) / 1e6:.2f} MB received"
          + (f"; {result.failovers} failovers" if result.failovers else ""))
    print(f"saved the {args.method} prompt ({args.num_prompt_tokens} tokens) to {args.out}")
    if args.plot:
        plot_losses(losses, args.plot, f"{args.method}, {args.num_prompt_tokens} prompt tokens, lr {args.lr}")
        print(f"loss curve: {args.plot}")
