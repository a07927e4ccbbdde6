"""PushMany: a node hands the outputs of one pass that go to the same next node over in one call.

The Pusher here talks to a real grpc.aio server on 127.0.0.1 whose servicer records what it gets: one that knows
PushMany, and an older one that answers it UNIMPLEMENTED (tests/test_push.py runs PushMany on real nodes)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.rpc import push


class Recorder(pb_grpc.PotluckServicer):
    """Records every Push and PushMany; refuses the steps whose session id starts with "refuse"."""

    def __init__(self, knows_push_many: bool = True, answer_after: float = 0.0):
        self.knows_push_many = knows_push_many
        self.answer_after = answer_after  # seconds each call is held before its answer
        self.calls: list[tuple[str, list[str]]] = []  # (method, session ids)

    async def Push(self, request, context):
        self.calls.append(("Push", [request.session_id]))
        await asyncio.sleep(self.answer_after)
        if request.session_id.startswith("refuse"):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no room for {request.session_id}")
        return pb.PushReply()

    async def PushMany(self, request, context):
        if not self.knows_push_many:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.calls.append(("PushMany", [one.session_id for one in request.steps]))
        await asyncio.sleep(self.answer_after)
        reply = pb.PushManyReply()
        for one in request.steps:
            refused = one.session_id.startswith("refuse")
            reply.outcomes.add(code="FAILED_PRECONDITION" if refused else "",
                               message=f"no room for {one.session_id}" if refused else "")
        return reply


async def serve(recorder: Recorder) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_PotluckServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def step_to(address: str, session_id: str, step_id: int = 1) -> pb.Step:
    step = pb.Step(hidden=codec.encode_tensor(torch.zeros(1, 1, 4)), position=3, step_id=step_id)
    step.push.add(address="placeholder", session_id="here")  # this hop's own entry is dropped by forward
    step.push[0].address, step.push[0].session_id = address, session_id
    return step


async def forward_all(pusher: push.Pusher, address: str, sessions: list[str], convoy: tuple[int, int] | None):
    hidden = codec.encode_tensor(torch.ones(1, 1, 4))
    return await asyncio.gather(*(pusher.forward(hidden, step_to(address, s), convoy) for s in sessions))


async def test_a_convoy_goes_in_one_call_and_each_step_gets_its_own_outcome():
    recorder = Recorder()
    server, address = await serve(recorder)
    pusher = push.Pusher()
    try:
        errors = await forward_all(pusher, address, ["a", "refuse-b", "c"], (7, 3))
        # one call carrying the convoy's steps (in the order they were handed over, which the dial check's
        # resolution may shuffle: every step carries its own session)
        assert [(name, sorted(ids)) for name, ids in recorder.calls] == [("PushMany", ["a", "c", "refuse-b"])]
        assert errors[0] == errors[2] == ""
        assert errors[1] == f"push to {address} failed [FAILED_PRECONDITION]: no room for refuse-b"
        # steps in no convoy, or in a convoy of one, go one Push each
        assert await forward_all(pusher, address, ["d"], None) == [""]
        assert await forward_all(pusher, address, ["e"], (8, 1)) == [""]
        assert recorder.calls[1:] == [("Push", ["d"]), ("Push", ["e"])]
        assert pusher.calls == 3
    finally:
        await pusher.close()
        await server.stop(None)


async def test_a_convoy_that_misses_steps_goes_without_them(monkeypatch):
    monkeypatch.setattr(push, "CONVOY_FLUSH", 0.05)
    recorder = Recorder()
    server, address = await serve(recorder)
    pusher = push.Pusher()
    try:
        started = asyncio.get_running_loop().time()
        errors = await forward_all(pusher, address, ["a", "b"], (9, 4))  # two of the convoy's four never come
        waited = asyncio.get_running_loop().time() - started
        assert errors == ["", ""]
        assert [(name, sorted(ids)) for name, ids in recorder.calls] == [("PushMany", ["a", "b"])]
        assert 0.05 <= waited < 2.0
    finally:
        await pusher.close()
        await server.stop(None)


async def test_a_node_without_push_many_gets_one_push_per_step_from_then_on():
    recorder = Recorder(knows_push_many=False)
    server, address = await serve(recorder)
    pusher = push.Pusher()
    try:
        errors = await forward_all(pusher, address, ["a", "refuse-b"], (1, 2))
        assert errors == ["", f"push to {address} failed [FAILED_PRECONDITION]: no room for refuse-b"]
        assert sorted(recorder.calls) == [("Push", ["a"]), ("Push", ["refuse-b"])]
        recorder.calls.clear()
        assert await forward_all(pusher, address, ["c", "d"], (2, 2)) == ["", ""]
        assert sorted(recorder.calls) == [("Push", ["c"]), ("Push", ["d"])]  # no second PushMany attempt
    finally:
        await pusher.close()
        await server.stop(None)


async def test_an_unreachable_node_fails_every_step_of_the_convoy():
    pusher = push.Pusher()
    try:
        hidden = codec.encode_tensor(torch.ones(1, 1, 4))
        steps = [step_to("127.0.0.1:9", s) for s in ("a", "b")]
        for step in steps:
            step.push[0].timeout = 2.0
        errors = await asyncio.gather(*(pusher.forward(hidden, step, (3, 2)) for step in steps))
        assert all(error.startswith("push to 127.0.0.1:9 failed [UNAVAILABLE]") for error in errors)
    finally:
        await pusher.close()


async def test_a_handover_is_under_way_before_the_next_node_answers():
    """`started` tells the servicer when to send its own reply to the client: once the handover (on the token's
    path) has set off, a convoy's once all of its steps are ready, without waiting for the next node's answer."""
    recorder = Recorder(answer_after=1.5)
    server, address = await serve(recorder)
    pusher = push.Pusher()
    loop = asyncio.get_running_loop()
    hidden = codec.encode_tensor(torch.ones(1, 1, 4))
    try:
        started = loop.create_future()
        handover = asyncio.ensure_future(pusher.forward(hidden, step_to(address, "a"), None, started))
        begun = loop.time()
        await asyncio.wait_for(started, 1.0)
        assert loop.time() - begun < 1.0 and not handover.done()  # the next node holds its answer 1.5 s
        assert await handover == "" and recorder.calls == [("Push", ["a"])]

        first, second = loop.create_future(), loop.create_future()
        one = asyncio.ensure_future(pusher.forward(hidden, step_to(address, "b"), (5, 2), first))
        await asyncio.sleep(0.001)
        assert not first.done()  # the convoy leaves with its second step
        two = asyncio.ensure_future(pusher.forward(hidden, step_to(address, "c"), (5, 2), second))
        await asyncio.wait_for(asyncio.gather(first, second), 1.0)
        assert not one.done() and not two.done()
        assert await asyncio.gather(one, two) == ["", ""]
        assert recorder.calls[1:] == [("PushMany", ["b", "c"])]

        failed = loop.create_future()  # a handover that cannot set off does not hold the reply either
        assert (await pusher.forward(hidden, step_to("127.0.0.1:9", "d"), None, failed)).startswith("push to")
        assert failed.done()
    finally:
        await pusher.close()
        await server.stop(None)


def test_the_node_refuses_an_oversized_push_many(tiny_swarm):
    count = push.MAX_PUSH_MANY + 1
    with grpc.insecure_channel(tiny_swarm("llama")[0].address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.PotluckStub(channel).PushMany(
                pb.PushManyRequest(steps=[pb.PushRequest(session_id="x") for _ in range(count)]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{count} steps in one PushMany exceed the limit of {push.MAX_PUSH_MANY}" in caught.value.details()
