"""Mistakes a newcomer makes on the command line, refused when the arguments are parsed, in one clear line."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from client.finetune import load_prompts
from node.cli.main import build_parser

REQUIRED = {"generate": ["--model", "m", "--prompt", "p"], "api": ["--model", "m"],
            "eval": ["--model", "m", "--text", "t"], "finetune": ["--model", "m", "--data", "d"]}


def refused(capsys, argv: list[str]) -> str:
    """The error line argparse printed for `potluck ARGV` (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        build_parser(argv[0]).parse_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", sorted(REQUIRED))
@pytest.mark.parametrize("peers, fragment", [
    ("127.0.0.1", "'127.0.0.1' is not HOST:PORT"),  # gRPC would dial port 443
    ("127.0.0.1:5001,node2", "'node2' is not HOST:PORT"),
    ("::1:5001", "'::1:5001' is not HOST:PORT"),  # IPv6 needs brackets
    ("127.0.0.1:http", "the port 'http' is not a number"),
])
def test_peers_need_a_port(capsys, command, peers, fragment):
    line = refused(capsys, [command, *REQUIRED[command], "--peers", peers])
    assert line.startswith(f"potluck {command}: error: argument --peers: ") and fragment in line, line


def test_peers_are_parsed_into_addresses():
    args = build_parser("generate").parse_args(["generate", *REQUIRED["generate"], "--peers", " a:1, [::1]:2 ,"])
    assert args.peers == ("a:1", "[::1]:2")
    assert build_parser("generate").parse_args(["generate", *REQUIRED["generate"]]).peers == ()


@pytest.mark.parametrize("flag, value, fragment", [
    ("--temperature", "-1", "-1 is not 0 (greedy) or a positive number"),
    ("--temperature", "nan", "nan is not 0 (greedy) or a positive number"),
    ("--top-p", "0", "0 is not within (0, 1]"),
    ("--top-p", "1.5", "1.5 is not within (0, 1]"),
])
def test_sampling_flags_out_of_range(capsys, flag, value, fragment):
    line = refused(capsys, ["generate", *REQUIRED["generate"], f"{flag}={value}"])
    assert line == f"potluck generate: error: argument {flag}: {fragment}", line


@pytest.mark.parametrize("content, fragment", [
    (lambda path: torch.save({"tensors": {"x": Fraction(1, 2)}}, path), "it holds a fractions.Fraction"),
    (lambda path: path.write_text("hello world\n"), "not a file written by torch.save"),  # torch: KeyError '101'
    (lambda path: path.write_bytes(b""), "not a file written by torch.save"),  # torch: EOFError with no message
    (lambda path: None, "cannot read it (No such file or directory)"),
])
def test_a_bad_prompt_file_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "prompt.pt"
    content(path)
    with pytest.raises(ValueError) as error:
        load_prompts(object(), str(path))  # refused before the model is looked at
    message = str(error.value)
    assert message.startswith(f"--prompt-weights {path}: ") and fragment in message, message
    assert "\n" not in message and "\x1b" not in message and "weights only" not in message.lower(), message


def test_each_commands_summary_is_the_same_in_the_table_and_in_its_parser():
    """`potluck --help` lists COMMANDS' summaries without loading the commands; each command's own parser
    carries its help too: the two must not drift apart."""
    import argparse

    from node.cli.main import COMMANDS, build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {action.dest: action.help for action in commands._choices_actions}
    assert {entry.names[0]: entry.summary for entry in COMMANDS} == {name: helps[name] for name in helps}
