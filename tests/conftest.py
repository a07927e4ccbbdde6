"""Session-scoped fixtures: model folders, in-process nodes and real node processes; and the `slow` marker.

`slow` marks every test that starts a process (node processes, the CLI, browsers, fuzzers) and every test that
starts in-process nodes: the tests under swarm/, e2e/ and bench/ and every test using the SmolLM2 chain of node
processes get it here; a test elsewhere that starts a process without it fails (`_no_processes_unless_slow`), so
`pytest -m "not slow"` stays the sub-minute inner loop of unit tests (about 30 s on 2 cores; with the in-process
swarms of tests/swarm/ it took about 2 minutes)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from common.weights.embedded import prepare_embedded_model
from node.launcher import start_chain
from tests.support.families import tiny_config
from tests.support.swarm_fixtures import BackgroundLoop, wait_for_full_cache

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

TINY_SPANS = [(0, 2), (2, 4), (4, 6)]
SLOW_FOLDERS = ("swarm", "e2e", "bench")  # tests/<folder>/: nodes in-process or in processes, or benchmarks
PROCESS_FIXTURES = ("smollm_chain",)  # fixtures that start node processes
# processes any test may start: the C compiler that builds the exact kernels once per machine
# (common/weights/exact.py), and what it runs to name the machine
ALLOWED_PROGRAMS = ("cc", "gcc", "clang", "uname")


def pytest_collection_modifyitems(items):
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in SLOW_FOLDERS or any(name in item.fixturenames for name in PROCESS_FIXTURES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_processes_unless_slow(request, monkeypatch):
    """A test not marked slow may not start a process (beyond ALLOWED_PROGRAMS)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    real = subprocess.Popen

    class Guarded(real):
        def __init__(self, args, *rest, **kwargs):
            program = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]))
            if not program.endswith(ALLOWED_PROGRAMS):  # test-made compilers too (broken-cc)
                raise AssertionError(f"{request.node.nodeid} starts a process ({program}): mark it @pytest.mark.slow")
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Guarded)
    yield


@pytest.fixture(scope="session")
def bg_loop(request):
    loop = BackgroundLoop()
    request.session.potluck_bg_loop = loop  # for the cache-accounting check after every test
    yield loop
    loop.close()


@pytest.fixture(autouse=True)
def cache_accounting(request):
    """After every test, every in-process node's KV-cache accounting is back to zero."""
    yield
    loop = getattr(request.session, "potluck_bg_loop", None)
    if loop is not None:
        leaked = loop.leaked_cache()
        assert not leaked, f"cache tokens still reserved after the test: {leaked}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """family -> folder with a tiny random model of that family (built once per session)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).save_pretrained(folder)
            made[family] = folder
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_swarm(bg_loop, tiny_model_dir):
    """family -> three in-process nodes serving 0:2, 2:4, 4:6 of the tiny model."""
    swarms: dict[str, list] = {}

    def get(family: str):
        if family not in swarms:
            folder = tiny_model_dir(family)
            swarms[family] = [bg_loop.start_node(folder, a, b) for a, b in TINY_SPANS]
        return swarms[family]

    yield get
    for nodes in swarms.values():
        for node in nodes:
            leaked = node.executor.sessions.reserved_tokens
            bg_loop.stop_node(node)
            assert leaked == 0, f"node {node.address} still reserves {leaked} cache tokens after the tests"


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder (the Makefile's copy if there is one)."""
    configured = os.environ.get("POTLUCK_TEST_MODEL")
    if configured:
        return prepare_embedded_model(Path(configured))
    return prepare_embedded_model(tmp_path_factory.mktemp("smollm") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smollm_reference(smollm_dir):
    return AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="module")
def remote(smollm_dir, smollm_chain):
    """A client over the SmolLM2 chain, with explicit peers."""
    from client import DistributedModelForCausalLM

    model = DistributedModelForCausalLM.from_pretrained(str(smollm_dir), peers=[n.address for n in smollm_chain])
    yield model
    model.close()


@pytest.fixture()
def chain_cache_freed(smollm_chain):
    """After the test, the three SmolLM2 nodes' caches are free again (checked through Info)."""
    yield
    for node in smollm_chain:
        wait_for_full_cache(node.address, timeout=5)


@pytest.fixture(scope="session")
def smollm_chain(smollm_dir):
    """Three real `python -m node join` processes serving 0:10, 10:20, 20:30."""
    nodes = start_chain(smollm_dir, 30, 3, threads=2)
    yield nodes
    codes = [node.stop() for node in nodes]
    assert codes == [0, 0, 0], "nodes did not exit cleanly on SIGTERM:\n" + "\n".join(n.log() for n in nodes)
