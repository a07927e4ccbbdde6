"""`potluck join` / `python -m node join` lifecycle and the CLI's error messages."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest

from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.launcher import NodeProcess


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_join_prints_its_address_serves_and_exits_cleanly(tiny_model_dir, sig):
    node = NodeProcess(tiny_model_dir("llama"), 2, 5).start()
    try:
        address = node.wait_ready(120)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
        with grpc.insecure_channel(address) as channel:
            info = pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert (info.start, info.end) == (2, 5)
        node.process.send_signal(sig)
        assert node.process.wait(30) == 0, node.log()
        deadline = time.monotonic() + 5  # the launcher's reader thread takes the last lines after the exit
        while not node.log().endswith("potluck node: done") and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = node.log().splitlines()
        # the drain is never silent: it says what it waits for, and when it is over
        assert lines[-3].startswith("potluck node: draining 0 sessions (at most 30s"), node.log()
        assert lines[-2:] == ["potluck node: leaving the swarm, finishing calls in flight...", "potluck node: done"]
        assert "Traceback" not in node.log()
    finally:
        node.kill()


def test_potluck_entry_point_is_installed():
    potluck = shutil.which("potluck", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert potluck is not None, "the `potluck` script is not installed next to this Python"
    done = subprocess.run([potluck, "join", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--blocks" in done.stdout


def run_cli(capsys, *args) -> tuple[int, str]:
    """`potluck ARGS` in this process (the same `main` the script runs, without its ~10 s of imports):
    the exit code and what went to stderr. An uncaught exception fails the test, as a traceback would."""
    from node.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["join", "--model", "{tiny}", "--blocks", "0:9"], "not within the model's 6 layers"),
        (["join", "--model", "/nonexistent/model", "--blocks", "0:1"], "neither a model folder nor a hub id"),
        (["join", "--model", "{tiny}", "--blocks", "0:1", "--device", "cuda"], "CUDA is not available"),
        (["generate", "--model", "{tiny}", "--peers", "127.0.0.1:1", "--prompt", "hi"], "peer 127.0.0.1:1"),
    ],
)
def test_user_errors_are_one_clear_line(tiny_model_dir, args, fragment, capsys):
    args = [a.replace("{tiny}", str(tiny_model_dir("llama"))) for a in args]
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert fragment in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_generate_names_missing_layers(tiny_model_dir, bg_loop, capsys):
    folder = tiny_model_dir("llama")
    nodes = [bg_loop.start_node(folder, 0, 2), bg_loop.start_node(folder, 4, 6)]
    try:
        code, err = run_cli(capsys, "generate", "--model", str(folder), "--peers", ",".join(n.address for n in nodes),
                            "--prompt", "x")
    finally:
        for node in nodes:
            bg_loop.stop_node(node)
    assert code == 2
    assert "no peer serves layers 2:4 of the model's 6 layers" in err
    assert len(err.strip().splitlines()) == 1, err


def test_generate_refuses_a_peer_serving_another_model(tiny_model_dir, bg_loop, capsys):
    node = bg_loop.start_node(tiny_model_dir("qwen2"), 0, 6)
    try:
        code, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir("llama")), "--peers", node.address,
                            "--prompt", "x")
    finally:
        bg_loop.stop_node(node)
    assert code == 2
    assert "serves another model" in err


def test_join_refuses_a_port_another_node_listens_on(tiny_model_dir, bg_loop):
    """gRPC binds with SO_REUSEPORT by default: a second node on the port would share it with the first."""
    folder = tiny_model_dir("llama")
    node = bg_loop.start_node(folder, 0, 2)
    port = node.address.rpartition(":")[2]
    try:
        done = subprocess.run([sys.executable, "-m", "node", "join", "--model", str(folder), "--blocks", "2:4",
                               "--port", port, "--no-mdns"], capture_output=True, text=True, timeout=90)
    finally:
        bg_loop.stop_node(node)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (f"potluck join: error: port {port} on 127.0.0.1 is in use (another node or "
                                   f"program listens there); choose another --port, or --port 0 for a free one")
    assert "serving layers" not in done.stdout


def test_api_refuses_a_port_in_use(tiny_model_dir, bg_loop, capsys):
    folder = tiny_model_dir("llama")
    node = bg_loop.start_node(folder, 0, 6)
    port = node.address.rpartition(":")[2]
    try:
        code, err = run_cli(capsys, "api", "--model", str(folder), "--peers", node.address, "--port", port)
    finally:
        bg_loop.stop_node(node)
    assert code == 2
    assert err.strip() == (f"potluck api: error: port {port} on 127.0.0.1 is in use (another node or program "
                           f"listens there); choose another --port, or --port 0 for a free one")


def test_a_peer_that_is_down_is_said_once_in_plain_words(tiny_model_dir):
    """Not gRPC's `[UNAVAILABLE] failed to connect to all addresses; ... ipv4:...`, and not twice (a warning first)."""
    done = subprocess.run([sys.executable, "-m", "node", "generate", "--model", str(tiny_model_dir("llama")),
                           "--peers", "127.0.0.1:1", "--prompt", "hi", "--no-mdns"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("potluck generate: error: peer 127.0.0.1:1: connection refused: no node listens "
                                   "there (is it running, and is this the port it printed?)"), done.stderr


# What `potluck ARGS` imports before it answers: measured in a fresh process, as a user's shell would start it
IMPORTS_AT_PARSE = """
import sys
from node.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
heavy = sorted(name for name in ("torch", "transformers", "grpc") if name in sys.modules)
print("IMPORTED", code, ",".join(heavy) or "-", file=sys.stderr)
"""


@pytest.mark.parametrize("args, code, fragment", [
    (["--help"], 0, "serve a span of a model's layers"),  # the commands' summaries, no command's module
    (["join", "--help"], 0, "--blocks"),
    (["join", "--blocks", "10:5", "--model", "x"], 2, "argument --blocks: '10:5': need 0 <= START < END"),
    (["join", "--blocks", "ten", "--model", "x"], 2, "argument --blocks: 'ten': expected START:END"),
    (["nonsense"], 2, "invalid choice: 'nonsense'"),
    (["generate", "--help"], 0, "--prompt-lookup"),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "-1"], 2, "--temperature"),
    (["api", "--help"], 0, "--default-max-tokens"),
    (["eval", "--help"], 0, "--window"),
    (["finetune", "--help"], 0, "--num-prompt-tokens"),
    (["status", "--help"], 0, "--wait"),
    (["demo", "--help"], 0, "--nodes"),
])
def test_help_and_argument_errors_import_nothing_heavy(args, code, fragment):
    """`potluck --help`, `potluck join --help` and argument errors answer in a fraction of a second: without
    torch, transformers or grpc (5-10 s of imports on a small machine)."""
    done = subprocess.run([sys.executable, "-c", IMPORTS_AT_PARSE, *args], capture_output=True, text=True, timeout=60)
    assert fragment in done.stdout + done.stderr, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"IMPORTED {code} -", done.stderr
