"""Server-to-server push: the client sends each step to the first hop, nodes forward it along the chain.

The chain here is three in-process SmolLM2 nodes (0:10, 10:20, 20:30), so the tests can read each
node's step counter; tokens are compared with plain transformers on the same weights."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
import torch
from transformers import AutoTokenizer

from client import ClientConfig, DistributedModelForCausalLM
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.launcher import NodeProcess
from tests.e2e.test_fault_tolerance import FAST, AtToken, node_on
from tests.support.swarm_fixtures import node_info

NEW_TOKENS = 12
HIDDEN = 576  # SmolLM2-135M


@pytest.fixture(scope="module")
def chain(bg_loop, smollm_dir):
    nodes = [
        bg_loop.start_node(smollm_dir, a, b, metrics_port=0, throughput=50.0) for a, b in [(0, 10), (10, 20), (20, 30)]
    ]
    yield nodes
    for node in nodes:
        bg_loop.stop_node(node)


@pytest.fixture(scope="module")
def prompt_ids(smollm_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    return tokenizer("The three primary colours are", return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def expected(smollm_reference, prompt_ids):
    out = smollm_reference.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return out[0].tolist()


def generate(model, prompt_ids, new_tokens=NEW_TOKENS, streamer=None) -> list[int]:
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=streamer)
    return out[0].tolist()


def steps_served(node) -> float:
    registry = node.metrics.registry
    return sum(
        registry.get_sample_value("potluck_steps_total", {"kind": kind}) or 0.0 for kind in ("prefill", "decode")
    )


def handovers(node, outcome: str = "ok") -> float:
    return node.metrics.registry.get_sample_value("potluck_push_handovers_total", {"outcome": outcome}) or 0.0


def client(smollm_dir, addresses, **overrides) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        str(smollm_dir), config=ClientConfig(peers=tuple(addresses), **overrides)
    )


@pytest.fixture(scope="module")
def model(smollm_dir, chain):
    model = client(smollm_dir, [n.address for n in chain])
    yield model
    model.close()


def test_nodes_advertise_push(chain):
    extra = codec.unpack_metadata(node_info(chain[0].address).metadata)
    assert extra["push"] is True


def test_push_generation_matches_transformers(model, chain, prompt_ids, expected):
    before = [steps_served(node) for node in chain]
    handed = [handovers(node) for node in chain]
    assert generate(model, prompt_ids) == expected
    session = model.last_session
    steps = NEW_TOKENS  # the prefill and NEW_TOKENS - 1 decode steps
    assert session.pushed_steps == steps and not session.events
    assert session.sent_steps == [steps, 0, 0]  # the client wrote only to the first hop
    assert [steps_served(node) - b for node, b in zip(chain, before)] == [steps] * 3  # every node ran every step
    # the first two nodes handed every output on (metrics); the last one answers the client only
    assert [handovers(node) - h for node, h in zip(chain, handed)] == [steps, steps, 0]


def test_generate_runs_torch_on_one_thread_but_the_head_on_all(model, prompt_ids, expected, monkeypatch):
    """common/weights/threads.py: during generate the token path's small operations see one torch thread, the head
    products torch's count from before; afterwards the count is as it was."""
    from transformers.generation.streamers import BaseStreamer

    class Threads(BaseStreamer):
        def __init__(self):
            self.seen: list[int] = []

        def put(self, value):
            self.seen.append(torch.get_num_threads())

        def end(self):
            pass

    head_threads: list[int] = []
    product = type(model.head_calls.fn).__call__

    def counting(self, rows):
        head_threads.append(torch.get_num_threads())
        return product(self, rows)

    monkeypatch.setattr(type(model.head_calls.fn), "__call__", counting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        streamer = Threads()
        assert generate(model, prompt_ids, streamer=streamer) == expected
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert streamer.seen and set(streamer.seen) == {1}
    assert head_threads and set(head_threads) == {2}


def test_no_push_is_client_driven_and_identical(smollm_dir, chain, prompt_ids, expected):
    model = client(smollm_dir, [n.address for n in chain], push=False)
    try:
        assert generate(model, prompt_ids) == expected
        assert model.last_session.pushed_steps == 0
        assert model.last_session.sent_steps == [NEW_TOKENS] * 3
    finally:
        model.close()


def test_a_node_without_push_makes_the_client_drive(model, chain, prompt_ids, expected):
    chain[1].servicer.push_enabled = False  # as an older node would: no Push, none offered at open
    try:
        assert generate(model, prompt_ids) == expected
        assert model.last_session.pushed_steps == 0
        assert model.last_session.sent_steps == [NEW_TOKENS] * 3
        with grpc.insecure_channel(chain[1].address) as channel, pytest.raises(grpc.RpcError) as caught:
            pb_grpc.PotluckStub(channel).Push(pb.PushRequest(session_id="x", step=pb.Step()), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        chain[1].servicer.push_enabled = True
    assert generate(model, prompt_ids) == expected
    assert model.last_session.pushed_steps == NEW_TOKENS


def test_a_refused_handover_is_driven_by_the_client_without_a_failover(model, chain, prompt_ids, expected):
    """The middle node stops taking pushes mid-session (its stream is fine): the first node's notice
    makes the client send that hop the step itself, with no ban and no replay."""
    def refuse(_):
        chain[1].servicer.push_enabled = False

    try:
        assert generate(model, prompt_ids, streamer=AtToken({4}, refuse)) == expected
    finally:
        chain[1].servicer.push_enabled = True
    session = model.last_session
    assert session.events == [] and session.pushed_steps == 4
    sent = session.sent_steps
    assert sent[0] == NEW_TOKENS and sent[1] == sent[2] == NEW_TOKENS - 4  # every later step, from hop 2 on
    assert generate(model, prompt_ids) == expected  # a new session pushes again
    assert model.last_session.pushed_steps == NEW_TOKENS


# -- the Push RPC itself, on a stream opened by hand -------------------------------------------------

class HandStream:
    """An Inference stream on one node, driven request by request (a sync gRPC bidirectional call)."""

    def __init__(self, stub, session_id: str, start: int, end: int):
        self._requests: queue.Queue = queue.Queue()
        self._replies = stub.Inference(iter(self._requests.get, None), timeout=60)
        self.send(pb.SessionRequest(open=pb.OpenSession(session_id=session_id, start=start, end=end, max_length=64,
                                                        batch_size=1, wire_dtype="float32")))
        self.opened = next(self._replies).opened

    def send(self, request: pb.SessionRequest) -> None:
        self._requests.put(request)

    def result(self) -> pb.StepResult:
        return next(self._replies).result

    def finish(self) -> None:
        """No more requests (the call may have ended already)."""
        self._requests.put(None)


def a_step(hidden: torch.Tensor, position: int, step_id: int, **push) -> pb.Step:
    step = pb.Step(hidden=codec.encode_tensor(hidden), position=position, step_id=step_id)
    if push:
        step.push.add(**push)
    return step


def test_bad_pushes_get_a_clear_status_and_the_node_keeps_serving(chain):
    node = chain[1]
    torch.manual_seed(0)
    with grpc.insecure_channel(node.address) as channel:
        stub = pb_grpc.PotluckStub(channel)
        stream = HandStream(stub, "hand-push", 10, 20)
        assert stream.opened.push
        stream.send(pb.SessionRequest(step=a_step(torch.randn(1, 3, HIDDEN), 0, 1)))
        by_client = stream.result()
        assert by_client.position == 3

        def push(session_id, step):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Push(pb.PushRequest(session_id=session_id, step=step), timeout=10)
            return caught.value

        error = push("no-such-session", a_step(torch.randn(1, 1, HIDDEN), 3, 2))
        assert error.code() == grpc.StatusCode.NOT_FOUND and "no-such-session" in error.details()
        error = push("hand-push", a_step(torch.randn(1, 1, HIDDEN + 1), 3, 2))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"hidden size {HIDDEN + 1} does not match the model's {HIDDEN}" in error.details()
        error = push("hand-push", pb.Step(hidden=pb.Tensor(data=b"\0" * 8, shape=[1, 1, HIDDEN], dtype="float32")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not hold shape" in error.details()
        error = push("hand-push", a_step(torch.randn(1, 1, HIDDEN), 3, 1))  # step 1 was the client's
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "stale step 1" in error.details()

        # a good push runs in the session; its result comes out on the client's stream
        hidden = torch.randn(1, 1, HIDDEN)
        stub.Push(pb.PushRequest(session_id="hand-push", step=a_step(hidden, 3, 2)), timeout=10)
        pushed = stream.result()
        assert (pushed.step_id, pushed.position, pushed.push_error) == (2, 4, "")
        # the same token again from the client (a rewind to 3): the same output
        stream.send(pb.SessionRequest(step=a_step(hidden, 3, 3)))
        again = stream.result()
        assert again.position == 4
        torch.testing.assert_close(codec.decode_tensor(again.hidden), codec.decode_tensor(pushed.hidden))

        # a next hop that is not there: the result comes at once, then a notice of where the chain broke
        stream.send(pb.SessionRequest(step=a_step(torch.randn(1, 1, HIDDEN), 4, 4, address="127.0.0.1:9",
                                                  session_id="elsewhere", timeout=2.0)))
        result, notice = stream.result(), stream.result()
        assert (result.step_id, result.position, result.push_error) == (4, 5, "")
        assert (notice.step_id, notice.position, notice.HasField("hidden")) == (4, 5, False)
        assert notice.push_error.startswith("push to 127.0.0.1:9 failed [UNAVAILABLE]")
        stream.send(pb.SessionRequest(step=a_step(torch.randn(1, 1, HIDDEN), 5, 5, address="", session_id="x")))
        with pytest.raises(grpc.RpcError) as caught:
            stream.result()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "push[0] needs both an address and a session_id" in caught.value.details()
        stream.finish()


@pytest.mark.slow
def test_a_hop_answers_its_client_while_the_next_node_accepts_the_step(chain):
    """The client reads every hop's result before its next step: a reply held until the next node accepted the
    handover added a whole one-way delay per token over a WAN. Behind a 2 s latency proxy the handover takes 4 s
    to be accepted; the first node's result must not wait for it, and the pushed step still runs downstream."""
    from node.cli.proxy import ThreadedProxy

    first, second = chain[0], chain[1]
    torch.manual_seed(0)
    with grpc.insecure_channel(first.address) as one, grpc.insecure_channel(second.address) as two, \
            ThreadedProxy(second.address, 2.0) as slow:
        upstream = HandStream(pb_grpc.PotluckStub(one), "answer-first", 0, 10)
        downstream = HandStream(pb_grpc.PotluckStub(two), "answer-first-next", 10, 20)
        upstream.send(pb.SessionRequest(step=a_step(torch.randn(1, 3, HIDDEN), 0, 1)))
        downstream.send(pb.SessionRequest(step=a_step(torch.randn(1, 3, HIDDEN), 0, 1)))
        upstream.result(), downstream.result()
        started = time.monotonic()
        upstream.send(pb.SessionRequest(step=a_step(torch.randn(1, 1, HIDDEN), 3, 2, address=slow.address,
                                                    session_id="answer-first-next", timeout=30.0)))
        result = upstream.result()
        answered = time.monotonic() - started
        pushed = downstream.result()  # accepted and run after the proxy's delay
        arrived = time.monotonic() - started
        assert (result.step_id, result.position, result.push_error) == (2, 4, "")
        assert (pushed.step_id, pushed.position) == (2, 4) and arrived >= 2.0
        assert answered < 1.5, f"the first hop answered after {answered:.1f} s: it waited for the handover"
        upstream.finish()
        downstream.finish()


def test_push_many_accepts_or_refuses_each_step_on_its_own(chain):
    """The steps of one PushMany are taken one by one, in order, as Push would take them: a refused one does not
    stop the others, and each outcome says the status Push would have answered."""
    node = chain[1]
    torch.manual_seed(1)
    with grpc.insecure_channel(node.address) as channel:
        stub = pb_grpc.PotluckStub(channel)
        streams = {name: HandStream(stub, name, 10, 20) for name in ("many-a", "many-b")}
        for stream in streams.values():
            stream.send(pb.SessionRequest(step=a_step(torch.randn(1, 2, HIDDEN), 0, 1)))
            assert stream.result().position == 2
        steps = [
            pb.PushRequest(session_id="many-a", step=a_step(torch.randn(1, 1, HIDDEN), 2, 2)),
            pb.PushRequest(session_id="no-such-session", step=a_step(torch.randn(1, 1, HIDDEN), 2, 2)),
            pb.PushRequest(session_id="many-b", step=a_step(torch.randn(1, 1, HIDDEN), 2, 1)),  # stale: 1 was seen
            pb.PushRequest(session_id="many-b", step=a_step(torch.randn(1, 1, HIDDEN), 2, 2)),
        ]
        reply = stub.PushMany(pb.PushManyRequest(steps=steps), timeout=10)
        assert [o.code for o in reply.outcomes] == ["", "NOT_FOUND", "FAILED_PRECONDITION", ""]
        assert "no-such-session" in reply.outcomes[1].message and "stale step 1" in reply.outcomes[2].message
        for name, stream in streams.items():
            result = stream.result()  # each accepted step ran in its session
            assert (result.step_id, result.position, result.push_error) == (2, 3, ""), name
            stream.finish()


def test_the_node_still_serves_after_bad_pushes(model, prompt_ids, expected):
    assert generate(model, prompt_ids) == expected
    assert model.last_session.pushed_steps == NEW_TOKENS


# -- a node dies mid-generation -------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_of_the_middle_node_with_push(smollm_dir, chain, prompt_ids, smollm_reference, tmp_path):
    """The middle hop is one of two node processes; SIGKILL the one in use, the other takes over."""
    new_tokens = 24
    expected = smollm_reference.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                         max_new_tokens=new_tokens, min_new_tokens=new_tokens)[0].tolist()
    middles = [NodeProcess(smollm_dir, 10, 20, extra_args=(*FAST, "--identity", str(tmp_path / f"m{i}.pem"))).start()
               for i in range(2)]
    try:
        for process in middles:
            process.wait_ready(180)
        model = client(smollm_dir, [chain[0].address, *(p.address for p in middles), chain[2].address])
        killed, pushed_before = [], []
        try:
            def kill(_):
                victim = node_on(model, 10, middles)
                victim.kill()
                killed.append(victim)
                pushed_before.append(model.last_session.pushed_steps)

            assert generate(model, prompt_ids, new_tokens, AtToken({8}, kill)) == expected
            session = model.last_session
            [event] = session.events
            assert event.address == killed[0].address and (event.start, event.end) == (10, 20)
            [(address, start, end)] = event.replacement
            assert address != killed[0].address and (start, end) == (10, 20)
            assert pushed_before == [8]  # every step before the kill went by push ...
            assert session.pushed_steps == new_tokens - 1  # ... and every one after the broken one
        finally:
            model.close()
    finally:
        for process in middles:
            process.kill()


@pytest.mark.slow
@pytest.mark.parametrize("convoys", [True, False])
def test_concurrent_generations_travel_as_convoys_and_match_transformers(smollm_dir, chain, smollm_reference, convoys,
                                                                         monkeypatch):
    """Four generations in threads of one client: each equals transformers' own. With convoys (common/wire/convoy.py)
    their decode steps share the nodes' passes: the four sessions travel as one convoy, or as two that stay apart
    (the prefills start apart), so at least 2 steps a pass; without convoys they mostly get a pass each (~1.3 here;
    tests/test_convoy.py checks that the node and the head need the convoys for it)."""
    for bound in ("node.runtime.window.CONVOY_WAIT", "client.combine.HEAD_WAIT", "client.combine.GATE_WAIT"):
        monkeypatch.setattr(bound, 0.5)  # the nodes run in this process: a slow CI machine must not split convoys
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    texts = ["The three primary colours are", "Paris is the capital of", "Water boils at", "My favourite food is"]
    prompts = [tokenizer(text, return_tensors="pt")["input_ids"] for text in texts]
    expected = [
        smollm_reference.generate(
            p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        )[0].tolist()
        for p in prompts
    ]
    model = client(smollm_dir, [n.address for n in chain], convoys=convoys)
    results: list = [None] * len(prompts)
    batching = [codec.unpack_metadata(node_info(node.address).metadata) for node in chain]
    calls, handed = [n.servicer.pusher.calls for n in chain[:2]], [handovers(n) for n in chain[:2]]

    def run(i):
        results[i] = generate(model, prompts[i])

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        model.close()
    assert results == expected
    after = [codec.unpack_metadata(node_info(node.address).metadata) for node in chain]
    per_pass = [
        (a["batched_steps"] - b["batched_steps"]) / (a["passes"] - b["passes"]) for a, b in zip(after, batching)
    ]
    if convoys:
        assert min(per_pass) >= 1.9, f"steps per pass at each node: {per_pass}"
        # the outputs of a pass go on to the next node in one PushMany call
        calls = sum(n.servicer.pusher.calls for n in chain[:2]) - sum(calls)
        handed = sum(handovers(n) for n in chain[:2]) - sum(handed)
        assert calls <= 0.7 * handed, f"{calls} push calls for {handed} steps handed over"
