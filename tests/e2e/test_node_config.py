"""`potluck join --config node.toml`: file values, command-line overrides, clear errors."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

import pytest

from node.cli.join import join_args
from node.config import ConfigError

EXAMPLE = """
model = "org/name"
blocks = "0:4"
host = "0.0.0.0"
port = 7000
cache_tokens = 4096          # underscores or dashes, as you like
max-length = 2048
memory = "4GB"
heartbeat = 2.5
ttl = 10                     # an integer where a number is expected is fine
no-mdns = true
bootstrap = ["10.0.0.2:7000", "10.0.0.3:7000"]
dtype = "bfloat16"
metrics-port = 9100
log-level = "INFO"
"""


@pytest.fixture()
def config_file(tmp_path):
    def write(text: str):
        path = tmp_path / "node.toml"
        path.write_text(text)
        return str(path)

    return write


def test_the_file_sets_every_value_it_names(config_file):
    args = join_args(["--config", config_file(EXAMPLE)])
    assert (args.model, args.blocks, args.host, args.port) == ("org/name", "0:4", "0.0.0.0", 7000)
    assert (args.cache_tokens, args.max_length, args.memory) == (4096, 2048, "4GB")
    assert (args.heartbeat, args.ttl, args.no_mdns, args.dtype) == (2.5, 10.0, True, "bfloat16")
    assert args.bootstrap == ["10.0.0.2:7000", "10.0.0.3:7000"]
    assert (args.metrics_port, args.log_level, args.command) == (9100, "INFO", "join")
    assert args.threads == 0 and args.no_rebalance is False  # not in the file: the defaults


def test_command_line_flags_override_the_file(config_file):
    path = config_file(EXAMPLE)
    args = join_args(["--port", "7100", "--config", path, "--bootstrap", "10.0.0.9:7000", "--blocks", "4:8"])
    assert (args.port, args.blocks, args.bootstrap) == (7100, "4:8", ["10.0.0.9:7000"])
    assert args.cache_tokens == 4096  # the rest still comes from the file


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('model = "m"\ncache-token = 5\nfrobnicate = true\n', "unknown keys cache-token, frobnicate"),
        ('port = "seven"\n', "port = 'seven': expected an integer"),
        ("cache-tokens = 0\n", "cache-tokens = 0: expected an integer"),
        ("heartbeat = true\n", "heartbeat = True: expected a string or a number"),
        ('no-mdns = "yes"\n', "no-mdns = 'yes': expected true or false"),
        ('dtype = "float64"\n', "expected one of auto, float32"),
        ("bootstrap = [1, 2]\n", "expected a string or a list of strings"),
        ("cache-tokens = 1\ncache_tokens = 2\n", "cache_tokens is given twice"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_bad_files_get_a_clear_error(config_file, text, fragment):
    with pytest.raises(ConfigError) as caught:
        join_args(["--config", config_file(text)])
    assert fragment in str(caught.value)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        join_args(["--config", str(tmp_path / "absent.toml")])


def test_the_cli_prints_config_errors_as_one_line(config_file, capsys):
    from node.cli.main import main

    assert main(["join", "--config", config_file("colour = 'blue'\n")]) == 2
    err = capsys.readouterr().err
    assert "unknown keys colour" in err and len(err.strip().splitlines()) == 1, err


def test_join_from_a_config_file_serves_and_stops(config_file, tiny_model_dir, tmp_path):
    """A private, encrypted node set up from its config file alone (a volunteer's service)."""
    from node.cli.main import main

    key_file = tmp_path / "swarm.key"
    assert main(["swarm-key", "new", str(key_file)]) == 0
    assert main(["swarm-key", "new", str(key_file)]) == 2  # never overwritten
    path = config_file(
        f'model = "{tiny_model_dir("llama")}"\nblocks = "1:3"\nport = 0\nno-mdns = true\n'
        f'identity = "{tmp_path / "id.pem"}"\nthroughput = 10.0\nswarm-key = "{key_file}"\ntls = "auto"\n'
    )
    process = subprocess.Popen([sys.executable, "-m", "node", "join", "--config", path, "--blocks", "2:5"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(120, process.kill)  # never hang the suite on a node that stays silent
    timer.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("potluck node "):
                break
        ready = re.fullmatch(r"potluck node [0-9a-f]{8} serving layers (\d+):(\d+) of .+ on (127\.0\.0\.1:\d+)\n",
                             lines[-1] if lines else "")
        assert ready, "".join(lines)
        assert ready.group(1, 2) == ("2", "5")  # the command line's --blocks over the file's
        _check_private_and_encrypted(ready.group(3), key_file)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        timer.cancel()
        process.kill()
        process.wait()


def _check_private_and_encrypted(address: str, key_file) -> None:
    import grpc

    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc
    from common.wire.security import Security, SwarmKey

    member = Security(swarm_key=SwarmKey.load(key_file), tls="auto")
    with member.sync_channel(address) as channel:
        info = pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=10,
                                                 metadata=member.call_metadata("/potluck.v1.Potluck/Info"))
    assert (info.start, info.end) == (2, 5) and member.pinned_node(address) == info.node_id
    with Security(tls="auto").sync_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:  # plaintext: no TLS
        pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "model, revision, expected",
    [
        ("org/name@v1.0", None, ("org/name", "v1.0")),
        ("org/name@a@b", None, ("org/name@a", "b")),  # the last '@' splits; the hub rejects the rest
        ("org/name", "main", ("org/name", "main")),
        ("org/name@main", "main", ("org/name", "main")),
        ("./models/name@v1", None, ("./models/name@v1", None)),  # local paths are never split
        ("/models/name@v1", None, ("/models/name@v1", None)),
        ("name@v1", None, ("name@v1", None)),  # not org/name: not a hub id
    ],
)
def test_model_at_revision_splits_hub_ids_only(model, revision, expected):
    from common.weights.files import split_revision

    assert split_revision(model, revision) == expected


def test_an_existing_folder_with_an_at_sign_is_a_path(tmp_path):
    from common.weights.files import split_revision

    folder = tmp_path / "org" / "name@v1"
    folder.mkdir(parents=True)
    assert split_revision(str(folder)) == (str(folder), None)


def test_two_different_revisions_are_refused():
    from common.weights.errors import ModelLoadError
    from common.weights.files import split_revision

    with pytest.raises(ModelLoadError, match="pins revision 'v1' but --revision says 'v2'"):
        split_revision("org/name@v1", "v2")


def test_thread_count_follows_the_device_and_the_cores_given():
    import os

    import torch

    from node.server import compute_threads

    cores = len(os.sched_getaffinity(0))
    assert compute_threads(3, torch.device("cpu")) == 3
    assert compute_threads(0, torch.device("cpu")) == cores  # the node computes on every core it may use
    assert compute_threads(0, torch.device("cuda")) == min(2, cores)  # the CPU only feeds the GPU
