"""`potluck doctor` and the Probe RPC: real in-process nodes on 127.0.0.1 call the doctor back."""

from __future__ import annotations

import asyncio
import re
import socket

import grpc
import pytest

from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from common.wire.security import PLAINTEXT, SwarmKey, load_security
from node.cli.doctor import FAIL, OK, SKIP, WARN, clock_check, disk_check, memory_check, reach_check, swarm_checks
from node.cli.main import main
from node.rpc.probe import check_probe_target
from node.rpc.ratelimit import RateLimiter
from node.runtime.errors import InvalidRequest

GB = 10**9


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def node(bg_loop, tiny_model_dir):
    node = bg_loop.start_node(tiny_model_dir("llama"), 0, 6)
    yield node
    bg_loop.stop_node(node)


@pytest.fixture(autouse=True)
def fresh_limit(request):
    """Each test starts with the node's real probe limit (one a second per caller), unused."""
    if "node" in request.fixturenames:
        request.getfixturevalue("node").servicer.prober.limiter = RateLimiter(1.0, burst=1.0)


def by_name(checks, prefix):
    found = [c for c in checks if c.name.startswith(prefix)]
    assert len(found) == 1, checks
    return found[0]


# -- against a real node ---------------------------------------------------------------------------------
def test_reachable_address_is_ok(node, capsys):
    port = free_port()
    assert main(["doctor", "--bootstrap", node.address, "--announce", f"127.0.0.1:{port}", "--cache-dir", "/"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^OK +listen: serving a temporary health check on 127\.0\.0\.1:{port}", out, re.M), out
    assert re.search(rf"^OK +reach 127\.0\.0\.1:{port}: {re.escape(node.address)} reached .*SERVING", out, re.M), out
    assert "FAIL" not in out


def test_address_nobody_listens_on_fails_with_a_fix(node, capsys):
    announced, bound = free_port(), free_port()  # the doctor listens on --port; nobody on the announced one
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", "--bootstrap", node.address, "--announce", f"127.0.0.1:{announced}", "--port", str(bound),
              "--cache-dir", "/"])
    assert exit_.value.code == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL"))
    assert f"reach 127.0.0.1:{announced}: {node.address} could not reach 127.0.0.1:{announced}" in line
    assert "UNAVAILABLE" in line
    assert f"fix: --announce's port {announced} is not the bound port {bound}" in line
    assert f"open TCP port {announced}" in line


def test_a_running_node_is_probed_where_it_listens(node):
    checks = asyncio.run(swarm_checks((node.address,), node.address, "127.0.0.1", None, PLAINTEXT))
    assert by_name(checks, "listen").level == OK and "in use" in by_name(checks, "listen").message
    assert by_name(checks, "reach").level == OK


def test_clock_skew_on_one_machine_is_small(node):
    checks = asyncio.run(swarm_checks((node.address,), None, "127.0.0.1", None, PLAINTEXT))
    clock = by_name(checks, "clock vs")
    assert clock.level == OK
    skew = float(re.match(r"([+-]\d+\.\d+) s", clock.message).group(1))
    assert abs(skew) < 1.0
    assert by_name(checks, "reach").level == SKIP  # no --announce: nobody was asked to call back


def test_unreachable_bootstrap_fails():
    checks = asyncio.run(swarm_checks((f"127.0.0.1:{free_port()}",), None, "127.0.0.1", None, PLAINTEXT, timeout=3))
    failed = by_name(checks, "bootstrap")
    assert failed.level == FAIL and "UNAVAILABLE" in failed.message and "a node runs there" in failed.fix


def probe(address: str, request: pb.ProbeRequest):
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.PotluckStub(channel).Probe(request, timeout=10)


@pytest.mark.parametrize("address", ["nonsense", "x" * 300 + ":1", "host:0", "host:99999", "host:", ":80",
                                     "[::1:5", "a b:1", "h\u00e9:1", "host:8o"])
def test_probe_refuses_malformed_addresses(node, address):
    with pytest.raises(grpc.RpcError) as error:
        probe(node.address, pb.ProbeRequest(address=address))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "HOST:PORT" in error.value.details()


def test_probe_is_rate_limited_per_caller(node):
    now = [100.0]
    node.servicer.prober.limiter = RateLimiter(1.0, burst=1.0, clock=lambda: now[0])
    target = f"127.0.0.1:{free_port()}"
    first = probe(node.address, pb.ProbeRequest(address=target))
    assert not first.reachable and first.detail.startswith("UNAVAILABLE")
    with pytest.raises(grpc.RpcError) as error:
        probe(node.address, pb.ProbeRequest(address=target))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert probe(node.address, pb.ProbeRequest()).time > 0  # asking only the time is not a probe
    now[0] += 1.0
    assert not probe(node.address, pb.ProbeRequest(address=target)).reachable  # a second later: allowed again


def test_probe_through_tls_and_swarm_key(bg_loop, tiny_model_dir, tmp_path):
    key = tmp_path / "swarm.key"
    SwarmKey.generate().write(key)
    node = bg_loop.start_node(tiny_model_dir("llama"), 0, 6, swarm_key=str(key), tls="auto")
    try:
        port = free_port()
        security = load_security(str(key), "auto")
        checks = asyncio.run(swarm_checks((node.address,), f"127.0.0.1:{port}", "127.0.0.1", None, security))
        assert by_name(checks, "reach").level == OK, checks
        assert by_name(checks, "clock vs").level == OK
        keyless = asyncio.run(swarm_checks((node.address,), None, "127.0.0.1", None, load_security(None, "auto")))
        refused = by_name(keyless, "bootstrap")
        assert refused.level == FAIL and "UNAUTHENTICATED" in refused.message and "--swarm-key" in refused.fix
    finally:
        bg_loop.stop_node(node)


# -- pure checks --------------------------------------------------------------------------------------------
def test_probe_targets_on_the_nodes_own_loopback_are_for_local_callers_only():
    assert asyncio.run(check_probe_target("127.0.0.1:5000", "127.0.0.1")) == "127.0.0.1:5000"
    assert asyncio.run(check_probe_target("10.1.2.3:5000", "10.0.0.9")) == "10.1.2.3:5000"  # a lab swarm's LAN
    for target in ("127.0.0.1:5000", "localhost:5000", "[::1]:5000", "169.254.169.254:80", "0.0.0.0:22",
                   "[::ffff:127.0.0.1]:22", "127.1:22", "0:22", "2130706433:22", "0x7f000001:22", "0177.0.0.1:22",
                   "[::127.0.0.1]:22"):
        with pytest.raises(InvalidRequest):
            asyncio.run(check_probe_target(target, "10.0.0.9"))


def test_clock_check_flags_a_simulated_skew():
    assert clock_check("n:1", 0.2, 0.01).level == OK
    assert clock_check("n:1", 45.0, 0.01).level == WARN  # behind the node: tokens look 45 s old, still valid
    assert clock_check("n:1", -25.0, 0.01).level == WARN
    ahead = clock_check("n:1", -45.0, 0.01)  # ahead of the node by more than the 30 s a token may come early
    assert ahead.level == FAIL and "30 s" in ahead.message
    late = clock_check("n:1", 300.0, 0.01)
    assert late.level == FAIL and "+300.00 s" in late.message and "NTP" in late.fix
    assert clock_check("n:1", -121.0, 0.01).level == FAIL


def test_memory_check():
    assert memory_check("CPU RAM", 16 * GB, 32 * GB).level == OK
    assert memory_check("CPU RAM", 1 * GB, 32 * GB).level == WARN
    assert memory_check("CPU RAM", 100 * 2**20, 32 * GB).level == FAIL
    fits = memory_check("cuda:0", 20 * GB, 24 * GB, layer_bytes=2 * GB, num_layers=80)
    assert fits.level == OK and "room for about 10 of 80 layers" in fits.message
    none = memory_check("cuda:0", 3 * GB, 24 * GB, layer_bytes=4 * GB, num_layers=80)
    assert none.level == FAIL and "not even one layer" in none.message


def test_disk_check():
    assert disk_check("/cache", 100 * GB).level == OK
    assert disk_check("/cache", 5 * GB).level == WARN
    assert disk_check("/cache", 100 * GB, need=50 * GB).level == OK
    assert disk_check("/cache", 52 * GB, need=50 * GB).level == WARN
    short = disk_check("/cache", 40 * GB, need=50 * GB)
    assert short.level == FAIL and "50.0 GB" in short.message and "HF_HOME" in short.fix


def test_device_checks_list_each_cuda_device(monkeypatch):
    """The CUDA branch on a CPU-only machine: torch.cuda's answers stubbed with two GPUs."""
    import torch

    from node.cli.doctor import device_checks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU{i}")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((40 * GB, 80 * GB), (GB // 4, 80 * GB))[i])
    checks = device_checks("cuda:1", layer_bytes=GB, num_layers=32)
    assert checks[0].level == OK and "2 CUDA device(s)" in checks[0].message
    assert [(c.name, c.level) for c in checks[2:]] == [("cuda:0 GPU0", OK), ("cuda:1 GPU1", FAIL)]
    assert "room for about 32 of 32 layers" in checks[2].message
    assert device_checks("cuda:2")[0].level == FAIL  # no such device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = device_checks("cuda")[0]
    assert missing.level == FAIL and "CUDA_VISIBLE_DEVICES" in missing.fix


def test_reach_check_names_the_bind_problem():
    found = reach_check("b:1", "203.0.113.7:31330", False, "DEADLINE_EXCEEDED", host="127.0.0.1", port=31330)
    assert found.level == FAIL and "--host 0.0.0.0" in found.fix and "open TCP port 31330" in found.fix
    assert reach_check("b:1", "a:2", True, "health: SERVING").level == OK


def test_doctor_checks_disk_against_a_local_model(tiny_model_dir, capsys):
    assert main(["doctor", "--model", str(tiny_model_dir("llama")), "--cache-dir", "/"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^OK +model: .*, 6 layers", out, re.M), out
    assert re.search(r"^OK +CPU RAM: .* room for about 6 of 6 layers", out, re.M), out
    assert re.search(r"^\w+ +disk: .* the model needs 0\.0 GB", out, re.M), out
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", "--need", "1000000TB", "--cache-dir", "/"])
    assert exit_.value.code == 1
    assert re.search(r"^FAIL +disk: .* the model needs 1000000000\.0 GB", capsys.readouterr().out, re.M)


def test_doctor_says_whether_the_exact_kernels_build():
    from node.cli.doctor import kernel_check

    built = kernel_check()
    assert built.level == OK and "built (" in built.message
    missing = kernel_check(compilers=("potluck-no-such-cc",))
    assert missing.level == WARN and "no C compiler found" in missing.message and "apt install gcc" in missing.fix
