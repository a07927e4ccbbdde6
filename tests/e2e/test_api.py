"""The OpenAI-compatible API, driven by the official `openai` package against a real uvicorn
server on port 0, backed by the real SmolLM2 chain; results compared to plain transformers."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial

import httpx
import openai
import pytest
import torch
import uvicorn

from client import ClientConfig, DistributedModelForCausalLM
from client.api import create_app
from client.api.engine import visible_text
from client.textgen import encode_prompt

CHAT_PROMPT = "What is the capital of France?"
CHAT = [{"role": "user", "content": CHAT_PROMPT}]


class ApiServer:
    """uvicorn in a background thread, listening on 127.0.0.1 on a free port."""

    def __init__(self, app):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d/v1" % self.listener.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.listener.close()


@pytest.fixture(scope="module")
def server(remote, tokenizer, smollm_dir, smollm_chain):
    """`smollm` is covered; `smollm-gap` (a factory) is given the first and last node only."""
    gap = partial(DistributedModelForCausalLM.from_pretrained, str(smollm_dir),
                  peers=[smollm_chain[0].address, smollm_chain[2].address])
    api = ApiServer(create_app({"smollm": remote, "smollm-gap": gap}, tokenizer))
    yield api
    api.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def local_greedy(reference, input_ids, max_new_tokens):
    out = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, input_ids.shape[1]:].tolist()


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_models_lists_only_covered_models(client):
    assert [m.id for m in client.models.list().data] == ["smollm"]
    assert client.models.retrieve("smollm").id == "smollm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("smollm-gap")


def test_chat_greedy_equals_transformers_with_usage(client, tokenizer, smollm_reference):
    reply = client.chat.completions.create(model="smollm", messages=CHAT, temperature=0, max_tokens=40)
    input_ids = encode_prompt(tokenizer, CHAT_PROMPT, chat=True)
    expected = local_greedy(smollm_reference, input_ids, 40)
    assert expected[-1] == tokenizer.eos_token_id and len(expected) < 40
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.message.content.strip() == "The capital of France is Paris."
    assert reply.object == "chat.completion" and reply.model == "smollm"
    assert reply.usage.prompt_tokens == input_ids.shape[1]
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == input_ids.shape[1] + len(expected)


def test_chat_streaming_concatenates_to_the_same_text(client):
    whole = client.chat.completions.create(model="smollm", messages=CHAT, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model="smollm", messages=CHAT, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3  # token by token, not one lump at the end
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert not chunks[-1].choices and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_completions_endpoint_streaming_and_not(client, tokenizer, smollm_reference):
    prompt = "The three primary colours are"
    reply = client.completions.create(model="smollm", prompt=prompt, temperature=0, max_tokens=8)
    input_ids = encode_prompt(tokenizer, prompt, chat=False)
    expected = local_greedy(smollm_reference, input_ids, 8)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.choices[0].finish_reason == "length"  # max_tokens reached
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (input_ids.shape[1], 8)
    stream = client.completions.create(model="smollm", prompt=prompt, temperature=0, max_tokens=8, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    by_ids = client.completions.create(model="smollm", prompt=input_ids[0].tolist(), temperature=0, max_tokens=8)
    assert by_ids.choices[0].text == reply.choices[0].text


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": "smollm", "prompt": "The three primary colours are", "max_tokens": 3, "stream": True}
    raw = httpx.post(f"{server.url}/completions", json=body, timeout=60).text
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2]) and len(events) >= 5


def test_stop_strings_cut_the_text_and_end_generation(client):
    reply = client.chat.completions.create(model="smollm", messages=CHAT, temperature=0, max_tokens=40,
                                           stop=["France", "never appears"])
    assert reply.choices[0].message.content == "The capital of "
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 8  # it stopped there, it did not run to EOS
    chunks = list(client.chat.completions.create(model="smollm", messages=CHAT, temperature=0, max_tokens=40,
                                                 stop="France", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The capital of "


def test_max_tokens_ends_with_length(client):
    reply = client.chat.completions.create(model="smollm", messages=CHAT, temperature=0, max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_seeded_sampling_is_reproducible_and_matches_transformers(client, tokenizer, smollm_reference):
    messages = [{"role": "user", "content": "Tell me a story about a dragon."}]
    ask = partial(client.chat.completions.create, model="smollm", messages=messages, temperature=0.9, top_p=0.95,
                  max_tokens=12)
    first, second, other = ask(seed=1234), ask(seed=1234), ask(seed=99)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    torch.manual_seed(1234)
    input_ids = encode_prompt(tokenizer, messages[0]["content"], chat=True)
    expected = smollm_reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=12,
                                         do_sample=True, temperature=0.9, top_p=0.95, top_k=0)
    assert first.choices[0].message.content == tokenizer.decode(expected[0, input_ids.shape[1]:],
                                                                skip_special_tokens=True)


def test_concurrent_requests_generate_together_and_a_seeded_one_alone(client):
    """Three requests at once generate side by side (each answer as if alone); a seeded sampling request sent
    among them runs alone, so that it still gives what it gives by itself."""
    from client.api import engine

    ask = partial(client.chat.completions.create, model="smollm", messages=CHAT, temperature=0, max_tokens=40)
    story = [{"role": "user", "content": "Tell me a story about a dragon."}]
    seeded = partial(client.chat.completions.create, model="smollm", messages=story, temperature=0.9, top_p=0.95,
                     max_tokens=12, seed=77)
    alone = seeded().choices[0].message.content
    engine.GATE.most_running = 0
    results: list = [None] * 4

    def run(i: int) -> None:
        results[i] = (seeded() if i == 3 else ask()).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert [r.strip() for r in results[:3]] == ["The capital of France is Paris."] * 3
    assert results[3] == alone
    assert engine.GATE.most_running >= 2, "the greedy requests should have generated at the same time"


def test_disconnect_stops_generation_and_the_loop_stays_responsive(server, client, remote, tokenizer):
    messages = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
    body = {"model": "smollm", "messages": messages, "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(4):
            next(events)
        session = remote.last_session  # the stream's own inference session
        assert [m.id for m in client.models.list().data] == ["smollm"]  # answered while it generates
        next(events)
    # the client is gone; this request waits for the generation thread, then runs
    client.chat.completions.create(model="smollm", messages=CHAT, temperature=0, max_tokens=1)
    prompt_tokens = encode_prompt(tokenizer, messages[0]["content"], chat=True).shape[1]
    assert 4 <= session.position - prompt_tokens < 100


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert raised.value.status_code == 404 and raised.value.code == "model_not_found"
    error = error_of(httpx.post(f"{server.url}/completions", json={"model": "gpt-4", "prompt": "hi"}))
    assert error["param"] == "model" and "gpt-4" in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"stop": ""}, "stop"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"model": 7}, "model"),
])
def test_bad_parameters_are_400_in_openai_shape(server, body, param):
    response = httpx.post(f"{server.url}/chat/completions", json={"model": "smollm", "messages": CHAT, **body})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_bad_requests_through_the_sdk_and_raw(client, server):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="smollm", prompt="hi", n=2)
    assert "n=1" in raised.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm", prompt=["one", "two"])
    response = httpx.post(
        f"{server.url}/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and error_of(response)["type"] == "invalid_request_error"
    response = httpx.post(
        f"{server.url}/chat/completions", json={"model": "smollm", "messages": CHAT, "max_tokens": 9000}
    )
    assert response.status_code == 400 and error_of(response)["code"] == "context_length_exceeded"
    assert error_of(httpx.get(f"{server.url}/nowhere"))["message"] == "Not Found"


def test_api_key_is_required_when_set(remote, tokenizer):
    api = ApiServer(create_app({"smollm": remote}, tokenizer, api_key="sekret"))
    try:
        with pytest.raises(openai.AuthenticationError) as raised:
            api.client("wrong").models.list()
        assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
        response = httpx.post(f"{api.url}/chat/completions", json={"model": "smollm", "messages": CHAT})
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
        assert [m.id for m in api.client("sekret").models.list().data] == ["smollm"]
    finally:
        api.stop()


def test_missing_layers_are_503_naming_them(client):
    with pytest.raises(openai.InternalServerError) as raised:  # a factory whose peers leave a gap
        client.chat.completions.create(model="smollm-gap", messages=CHAT, max_tokens=4)
    assert raised.value.status_code == 503 and raised.value.code == "missing_layers"
    assert "10:20" in raised.value.message


def test_stopped_middle_node_fails_the_stream_then_is_503_and_unlisted(bg_loop, smollm_dir, smollm_chain, tokenizer):
    """Our own in-process middle node (the shared chain's nodes stay up), stopped mid-stream."""
    middle = bg_loop.start_node(smollm_dir, 10, 20, throughput=100.0)
    stopped = False
    peers = (smollm_chain[0].address, middle.address, smollm_chain[2].address)
    model = DistributedModelForCausalLM.from_pretrained(
        str(smollm_dir), config=ClientConfig(peers=peers, missing_wait=1.0)
    )
    api = ApiServer(create_app({"smollm": model}, tokenizer))
    try:
        client = api.client()
        assert [m.id for m in client.models.list().data] == ["smollm"]
        story = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
        chunks = iter(client.chat.completions.create(model="smollm", messages=story, max_tokens=200, temperature=0,
                                                     stream=True))
        for _ in range(3):
            next(chunks)
        bg_loop.stop_node(middle)
        stopped = True
        with pytest.raises(openai.APIError) as raised:  # an error event in the stream (the status was 200)
            list(chunks)
        assert "10:20" in raised.value.message and raised.value.code == "missing_layers"
        assert client.models.list().data == []
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as raised:
                client.chat.completions.create(model="smollm", messages=CHAT, max_tokens=4, stream=stream)
            assert raised.value.status_code == 503 and "10:20" in raised.value.message
    finally:
        api.stop()
        model.close()
        if not stopped:
            bg_loop.stop_node(middle)


def test_cli_serves_until_terminated(smollm_dir, smollm_chain):
    peers = ",".join(n.address for n in smollm_chain)
    process = subprocess.Popen(
        [sys.executable, "-m", "node", "api", "--model", str(smollm_dir), "--peers", peers, "--port", "0",
         "--api-key", "k"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"potluck api serving SmolLM2-135M-Instruct on (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line + process.stdout.read() if process.poll() is not None else line
        client = openai.OpenAI(base_url=match.group(1), api_key="k", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=CHAT, temperature=0,
                                               max_tokens=40)
        assert reply.choices[0].message.content.strip() == "The capital of France is Paris."
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert "Traceback" not in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("text, stops, final, shown, hit", [
    ("Hello wor", ("world",), False, "Hello ", False),
    ("Hello world!", ("world",), False, "Hello ", True),
    ("Hello wor", ("world",), True, "Hello wor", False),
    ("abc", ("x", "bc", "c"), False, "a", True),
    ("caf\ufffd", (), False, "caf", False),
    ("plain", (), False, "plain", False),
])
def test_visible_text_holds_back_possible_stops(text, stops, final, shown, hit):
    assert visible_text(text, stops, final) == (shown, hit)


def test_one_api_serves_several_models(smollm_dir, smollm_chain, bg_loop, tmp_path):
    """`potluck api --model A --model B`: both listed, each routed through its own nodes."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = tmp_path / "tiny-chat"
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tiny)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm_dir / name).exists():
            shutil.copy(smollm_dir / name, tiny / name)
    nodes = [bg_loop.start_node(tiny, 0, 2), bg_loop.start_node(tiny, 2, 4)]
    peers = ",".join([n.address for n in smollm_chain] + [n.address for n in nodes])
    process = subprocess.Popen(
        [sys.executable, "-m", "node", "dashboard", "--model", str(smollm_dir), "--model", str(tiny), "--peers", peers,
         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line
        client = openai.OpenAI(base_url=match.group(1), api_key="none", max_retries=0, timeout=120)
        deadline = time.monotonic() + 60
        while sorted(m.id for m in client.models.list().data) != ["SmolLM2-135M-Instruct", "tiny-chat"]:
            assert time.monotonic() < deadline, "both models should be listed once their layers are covered"
            time.sleep(0.5)
        smol = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=CHAT, temperature=0, max_tokens=40
        )
        assert smol.choices[0].message.content.strip() == "The capital of France is Paris."
        other = client.chat.completions.create(model="tiny-chat", messages=CHAT, temperature=0, max_tokens=5)
        assert other.usage.completion_tokens == 5 and other.choices[0].finish_reason == "length"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for node in nodes:
            bg_loop.stop_node(node)


def test_models_the_swarm_covers_are_discovered_listed_and_served(smollm_dir, smollm_chain, bg_loop, tmp_path):
    """Without --peers, /v1/models lists every model the discovered swarm covers, not only --model ones;
    each is loaded on first use from --models-dir (or the hub), with a clear 503 when it cannot be."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    from client.api.catalog import SwarmCatalog

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / smollm_dir.name).symlink_to(smollm_dir.resolve())
    folders = {}
    for seed, name in enumerate(("tiny-discovered", "tiny-bare", "tiny-partial")):
        # different shapes: nodes are matched by config hash (records carry no weights fingerprint yet)
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128 + 32 * seed,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
        torch.manual_seed(seed)
        folders[name] = models_dir / name
        AutoModelForCausalLM.from_config(config).save_pretrained(folders[name])
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # tiny-bare has no tokenizer
        if (smollm_dir / file).exists():
            shutil.copy(smollm_dir / file, folders["tiny-discovered"] / file)
    nodes = [bg_loop.start_node(folders["tiny-discovered"], 0, 2), bg_loop.start_node(folders["tiny-discovered"], 2, 4),
             bg_loop.start_node(folders["tiny-bare"], 0, 4), bg_loop.start_node(folders["tiny-partial"], 0, 3)]
    bootstrap = tuple(n.address for n in smollm_chain) + tuple(n.address for n in nodes)
    catalog = SwarmCatalog(ClientConfig(bootstrap=bootstrap, mdns=False), models_dir)
    api = ApiServer(create_app({}, {}, catalog=catalog))
    try:
        client = api.client()
        assert sorted(m.id for m in client.models.list().data) == [smollm_dir.name, "tiny-bare", "tiny-discovered"]
        smol = client.chat.completions.create(model=smollm_dir.name, messages=CHAT, temperature=0, max_tokens=40)
        assert smol.choices[0].message.content.strip() == "The capital of France is Paris."
        prompt = [5, 17, 99, 1024]
        tiny = client.completions.create(model="tiny-discovered", prompt=prompt, temperature=0, max_tokens=6)
        reference = AutoModelForCausalLM.from_pretrained(folders["tiny-discovered"], dtype=torch.float32)
        ids = torch.tensor([prompt])
        expected = local_greedy(reference, ids, 6)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folders["tiny-discovered"])
        assert tiny.choices[0].text == tokenizer.decode(expected) and tiny.usage.completion_tokens == 6
        bare = httpx.post(f"{api.url}/chat/completions", json={"model": "tiny-bare", "messages": CHAT}, timeout=60)
        assert bare.status_code == 503
        error = error_of(bare)
        assert (
            error["code"] == "model_unavailable"
            and "tiny-bare" in error["message"]
            and "--models-dir" in error["message"]
        )
        missing = httpx.post(
            f"{api.url}/chat/completions", json={"model": "tiny-partial", "messages": CHAT}, timeout=60
        )
        assert missing.status_code == 404
    finally:
        api.stop()
        for node in nodes:
            bg_loop.stop_node(node)
