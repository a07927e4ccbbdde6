"""The dashboard at `/`: its data (/v1/swarm) and the page itself, driven in headless Chromium
against a real uvicorn server backed by the real three-node SmolLM2 chain."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from transformers import AutoTokenizer

from client import DistributedModelForCausalLM
from client.api import create_app
from client.api.dashboard import PALETTE, SwarmWatch, model_state, node_from_info, node_from_record, unreachable_node
from client.config import ClientConfig
from client.routing import PeerInfo
from client.transport import LoopThread
from common.swarm.records import NodeState, PeerRecord
from tests.e2e.test_api import CHAT_PROMPT, ApiServer

KEY = "dashboard-test-key"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1440,1000")


def node(address: str, start: int, end: int, state: str = "ONLINE", config_hash: str = "h") -> dict:
    return {"address": address, "start": start, "end": end, "state": state, "config_hash": config_hash}


# -- the summary, from plain data ----------------------------------------------------------------
def test_state_reports_gaps_and_unreachable_peers():
    nodes = [node("a:1", 0, 10), node("b:1", 20, 30), node("c:1", 10, 20, state="DRAINING"),
             {**unreachable_node("d:1", "connection refused"), "config_hash": ""}]
    state = model_state("m", 30, "h", nodes, discovery=False)
    assert state["status"] == "incomplete"
    assert state["missing_layers"] == [[10, 20]]
    texts = [w["text"] for w in state["warnings"]]
    assert texts[0] == "no node serves layers 10:20: this model cannot generate now"
    assert any("c:1 is DRAINING" in t for t in texts) and any("d:1 does not answer" in t for t in texts)
    assert [n["address"] for n in state["nodes"]] == ["a:1", "c:1", "b:1", "d:1"]  # by span; unknown spans last


def test_state_notes_layers_without_a_replica():
    nodes = [node("a:1", 0, 20), node("b:1", 10, 30), node("x:1", 0, 30, config_hash="other")]
    state = model_state("m", 30, "h", nodes, discovery=True)
    assert state["status"] == "ready" and state["missing_layers"] == []
    assert [w["level"] for w in state["warnings"]] == ["error", "info"]
    assert "x:1 serves another model" in state["warnings"][0]["text"]
    assert "layers 0:10, 20:30 have one node only" in state["warnings"][1]["text"]


def test_a_nodes_colour_follows_its_id_when_another_node_leaves():
    ids = [f"{i:02x}" * 32 for i in range(1, 7)]
    nodes = [{**node(f"n{i}:1", 5 * i, 5 * i + 5), "node_id": node_id} for i, node_id in enumerate(ids)]
    colours = {n["node_id"]: n["color"] for n in model_state("m", 30, "h", nodes, discovery=True)["nodes"]}
    assert set(colours.values()) <= set(PALETTE) and len(set(colours.values())) > 1
    for leaving in (0, 2):  # the first node (every other shifts position) and one in the middle
        rest = model_state("m", 30, "h", nodes[:leaving] + nodes[leaving + 1:], discovery=True)["nodes"]
        assert {n["node_id"]: n["color"] for n in rest} == {k: v for k, v in colours.items() if k != ids[leaving]}
    unknown = model_state("m", 30, "h", [unreachable_node("d:1", "refused")], discovery=False)["nodes"][0]
    assert unknown["color"] in PALETTE  # no id yet: by its address


def test_the_stored_form_of_the_weights_is_shown_not_only_the_compute_dtype():
    info = PeerInfo("a:1", 0, 10, dtype="float32", exact=(("q8", 12), ("q4", 84)))
    assert node_from_info(info, 0.01)["stored"] == "q4 ×84, q8 ×12 (exact), rest and compute float32"
    now = time.time()
    record = PeerRecord(node_id="ab" * 32, addresses=("b:1",), model_id="m", config_hash="h", num_layers=8,
                        start=0, end=8, dtype="float32", quant="nf4", issued_at=now, expires_at=now + 60)
    shown = node_from_record(record, now)
    assert shown["stored"] == "nf4 (quantised), computes in float32" and shown["quant"] == "nf4"
    assert node_from_info(PeerInfo("c:1", 0, 10, dtype="bfloat16"), None)["stored"] == "bfloat16"


async def test_discovered_records_are_read_on_the_swarm_loop():
    now = time.time()
    record = PeerRecord(node_id="ab" * 20, addresses=("10.0.0.5:7000",), model_id="m", config_hash="h", num_layers=8,
                        start=0, end=8, throughput=12.5, state=NodeState.JOINING, name="kitchen", issued_at=now - 3,
                        expires_at=now + 60, started_at=now - 125)
    loop = LoopThread()
    try:
        membership = SimpleNamespace(live=lambda config_hash: [record] if config_hash == "h" else [])
        swarm = SimpleNamespace(membership=membership, _loop=loop, num_layers=8, config_hash="h", config=ClientConfig())
        state = await SwarmWatch().state("m", SimpleNamespace(swarm=swarm))
    finally:
        loop.close()
    [shown] = state["nodes"]
    assert (shown["name"], shown["address"], shown["state"], shown["throughput"]) == ("kitchen", "10.0.0.5:7000",
                                                                                     "JOINING", 12.5)
    assert 2 <= shown["announced_s_ago"] <= 10
    assert 125 <= shown["uptime_s"] <= 135
    assert state["discovery"] == "swarm" and state["missing_layers"] == [[0, 8]]


# -- a real server over the real chain -----------------------------------------------------------
@pytest.fixture(scope="module")
def server(smollm_dir, smollm_chain):
    model = DistributedModelForCausalLM.from_pretrained(str(smollm_dir), peers=[n.address for n in smollm_chain])
    api = ApiServer(create_app({"smollm": model}, AutoTokenizer.from_pretrained(smollm_dir), api_key=KEY))
    yield api
    api.stop()
    model.close()


def test_swarm_endpoint_is_keyed_and_the_page_is_not(server, smollm_chain):
    root = server.url.removesuffix("/v1")
    page = httpx.get(root + "/")
    assert page.status_code == 200 and "Potluck" in page.text
    assert httpx.get(root + "/dashboard/dashboard.js").status_code == 200
    assert httpx.get(server.url + "/swarm").status_code == 401
    assert httpx.post(root + "/", json={}).status_code == 401  # only GETs of the static files are public
    state = httpx.get(server.url + "/swarm", headers={"Authorization": f"Bearer {KEY}"}).json()
    [model] = state["models"]
    assert model["name"] == "smollm" and model["status"] == "ready" and model["num_layers"] == 30
    assert [(n["address"], n["start"], n["end"], n["state"]) for n in model["nodes"]] == [
        (n.address, n.start_layer, n.end_layer, "ONLINE") for n in smollm_chain]
    assert all(n["rtt_ms"] is not None and n["device"] == "cpu" for n in model["nodes"])
    assert all(0 < n["uptime_s"] < 3600 for n in model["nodes"])  # from the nodes' Info (started_at)


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("the dashboard test needs Chromium and its driver: run `apt-get install chromium chromium-driver`")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the dashboard test needs selenium: run `pip install -e '.[dev]'`")
    with tempfile.TemporaryDirectory(prefix="potluck-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
        try:
            yield driver
        finally:
            driver.quit()


def test_dashboard_shows_the_chain_and_streams_a_chat_answer(browser, server, smollm_chain):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    find = browser.find_element
    wait = WebDriverWait(browser, 20, poll_frequency=0.1)
    browser.get(server.url.removesuffix("/v1") + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait.until(lambda b: find(By.ID, "auth-banner").is_displayed())  # no key yet: the page says so

    find(By.ID, "api-key").send_keys(KEY)
    find(By.CSS_SELECTOR, "#key-form button").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".node-row")) == 3)
    assert not find(By.ID, "auth-banner").is_displayed()
    assert browser.execute_script("return localStorage.getItem('potluck.apiKey')") == KEY
    rows = {r.get_attribute("data-address"): r.text for r in browser.find_elements(By.CSS_SELECTOR, ".node-row")}
    assert rows == {n.address: f"{n.address}\n{n.start_layer}:{n.end_layer}" for n in smollm_chain}
    cards = browser.find_elements(By.CSS_SELECTOR, ".node-card")
    assert [c.get_attribute("data-address") for c in cards] == [n.address for n in smollm_chain]
    assert all("ONLINE" in c.text and "cpu" in c.text and "weights" in c.text for c in cards)
    listed = httpx.get(server.url + "/swarm", headers={"Authorization": f"Bearer {KEY}"}).json()["models"][0]["nodes"]
    colours = {n["address"]: n["color"] for n in listed}
    colour_of = "return arguments[0].style.getPropertyValue('--c')"
    shown = {c.get_attribute("data-address"): browser.execute_script(colour_of, c) for c in cards}
    assert shown == colours  # each card in its node's own colour (by id), not its position's

    # record every text the answer shows while it streams
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const m = document.querySelector('.msg.assistant');
          if (m && m.textContent && window.seen.at(-1) !== m.textContent) window.seen.push(m.textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)
    for field, value in (("temperature", "0"), ("max-tokens", "24")):
        find(By.ID, field).clear()
        find(By.ID, field).send_keys(value)
    find(By.ID, "chat-input").send_keys(CHAT_PROMPT)
    find(By.ID, "chat-send").click()
    answer = WebDriverWait(browser, 60, poll_frequency=0.1).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))[0]
    assert "Paris" in answer.text, answer.text
    meta = find(By.CSS_SELECTOR, ".msg-meta").text
    assert " tokens in " in meta and "tokens/s" in meta and "piece" not in meta, meta
    assert "error" not in answer.get_attribute("class")
    seen = browser.execute_script("return window.seen")
    assert len(seen) >= 3 and seen[-1].strip() == answer.text.strip(), f"the answer did not stream in pieces: {seen}"

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
