"""Under load: one client's cancel never strands another's step, the cache budget is released only once no pass
uses a cache, a rate-limited step keeps its session, pushed steps never overtake a client's, streams stop when
their client leaves, and a session's answers are the same bits alone and batched (issue 30)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.combine import Combiner
from common.wire import codec
from common.wire.convoy import Convoy
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.model.compact import exact_span
from node.rpc import servicer as servicer_module
from node.runtime.executor import Executor
from tests.unit.test_lean import LEAN_FAMILIES, all_layers, lean_span

FAMILIES = LEAN_FAMILIES  # llama, mistral, qwen2, qwen3: every family the lean runtime serves


def _reference(folder, sequences: int = 3, length: int = 6):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (sequences, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.model.embed_tokens(ids), all_layers(model, ids)


async def _prefilled(executor: Executor, embeds: torch.Tensor, tokens: int):
    sessions = [executor.open(f"s{i}", 0, 6, 1, 64, torch.float32) for i in range(embeds.shape[0])]
    for i, session in enumerate(sessions):
        await executor.step(session, embeds[i : i + 1, :tokens], None, None, 0)
    return sessions


async def _wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


# -- 1. a cancelled step never strands the others of its pass ----------------------------------------------------
@pytest.mark.parametrize("grouping", ["convoy", "batch-window"])
def test_a_step_cancelled_while_its_pass_waits_strands_no_other_step(tiny_model_dir, monkeypatch, grouping):
    """Three sessions' steps wait for one pass (a convoy of 3, or the batch window of recently active sessions);
    the first one's stream goes away meanwhile. The other two get transformers' outputs, the cancelled step never
    runs (its session's cache holds what it held), and the cache budget is whole again after closing."""
    monkeypatch.setattr("node.runtime.window.CONVOY_WAIT", 2.0)
    folder = tiny_model_dir("llama")
    embeds, expected = _reference(folder)

    async def run():
        executor = Executor(lean_span(folder, 0, 6), cache_tokens=4096, max_length=64,
                            batch_wait=1.0 if grouping == "batch-window" else 0.002)
        sessions = await _prefilled(executor, embeds, 4)
        convoy = (lambda: Convoy.of(77, 3, "a")) if grouping == "convoy" else (lambda: None)
        first = asyncio.ensure_future(executor.step(sessions[0], embeds[0:1, 4:5], None, None, 4, convoy=convoy()))
        await _wait_until(lambda: len(executor._pending) == 1)  # queued; the pass waits for the others
        first.cancel()
        others = [asyncio.ensure_future(executor.step(s, embeds[i : i + 1, 4:5], None, None, 4, convoy=convoy()))
                  for i, s in enumerate(sessions) if i]
        done, hanging = await asyncio.wait(others, timeout=3.0)
        outcome = (len(done), len(hanging), [s.position for s in sessions])
        for task in hanging:
            task.cancel()
        outs = [task.result() for task in others if task in done and not task.exception()]
        for session in sessions:
            executor.close(session.session_id)
        await executor.settled()
        reserved = executor.sessions.reserved_tokens
        executor.shutdown()
        return outcome, outs, reserved

    (finished, hanging, positions), outs, reserved = asyncio.run(run())
    assert (finished, hanging) == (2, 0), f"finished: {finished}, still hanging after 3 s: {hanging}"
    assert positions == [4, 5, 5], f"sessions' position: {positions}"
    for i, out in enumerate(outs, start=1):
        torch.testing.assert_close(out, expected[i : i + 1, 4:5], rtol=1e-5, atol=1e-5)
    assert reserved == 0


def test_any_failure_on_the_compute_thread_fails_its_steps_and_is_logged(tiny_model_dir, monkeypatch, caplog):
    """Something that escapes a pass (here a BaseException from the model) fails every step of it with a clear
    error and a log line; the next pass runs normally."""
    folder = tiny_model_dir("llama")
    embeds, expected = _reference(folder)

    class Interrupted(BaseException):
        pass

    async def run():
        executor = Executor(lean_span(folder, 0, 6), cache_tokens=4096, max_length=64, batch_wait=0.002)
        sessions = await _prefilled(executor, embeds, 4)
        original = executor.lean.run
        monkeypatch.setattr(executor.lean, "run", lambda *a: (_ for _ in ()).throw(Interrupted("stop")))
        steps = [executor.step(s, embeds[i : i + 1, 4:5], None, None, 4, convoy=Convoy.of(5, 3, "a"))
                 for i, s in enumerate(sessions)]
        results = await asyncio.wait_for(asyncio.gather(*steps, return_exceptions=True), 5)
        monkeypatch.setattr(executor.lean, "run", original)
        session = executor.open("after", 0, 6, 1, 64, torch.float32)
        after = await executor.step(session, embeds[0:1, :5], None, None, 0)
        executor.close("after")
        executor.shutdown()
        return results, after

    results, after = asyncio.run(run())
    assert all(isinstance(r, RuntimeError) and "Interrupted" in str(r) for r in results), results
    assert "the compute thread failed" in caplog.text
    torch.testing.assert_close(after, expected[0:1, :5], rtol=1e-5, atol=1e-5)


# -- 4. the cache budget comes back only once no pass writes the cache ------------------------------------------
def test_a_closed_sessions_cache_is_released_only_after_its_pass(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llama")
    embeds, expected = _reference(folder)
    running, go_on = threading.Event(), threading.Event()

    async def run():
        executor = Executor(lean_span(folder, 0, 6), cache_tokens=3 * 64, max_length=64, batch_wait=0.002)
        sessions = await _prefilled(executor, embeds, 4)
        original = executor.lean.run

        def slow_run(*args):
            running.set()
            assert go_on.wait(10)
            return original(*args)

        monkeypatch.setattr(executor.lean, "run", slow_run)
        steps = [asyncio.ensure_future(executor.step(s, embeds[i : i + 1, 4:5], None, None, 4))
                 for i, s in enumerate(sessions)]
        await asyncio.to_thread(running.wait, 5)  # the pass is running and writing every session's cache
        steps[0].cancel()
        executor.close("s0")  # as a cancelled handler's `finally` does
        held_during_pass = executor.sessions.reserved_tokens
        assert executor.sessions.free_tokens == 3 * 64 - 3 * 5  # the closing session's tokens are not free yet
        go_on.set()
        outs = await asyncio.gather(*steps[1:])
        await executor.settled()
        await _wait_until(lambda: executor.sessions.reserved_tokens == 2 * 5)  # reserved as far as they stepped
        for session in sessions[1:]:
            executor.close(session.session_id)
        executor.shutdown()
        return held_during_pass, outs, executor.sessions.reserved_tokens

    held, outs, reserved = asyncio.run(run())
    assert held == 3 * 5, "a session's cache tokens were released while a pass still wrote its cache"
    for i, out in enumerate(outs, start=1):
        torch.testing.assert_close(out, expected[i : i + 1, 4:5], rtol=1e-5, atol=1e-5)
    assert reserved == 0


# -- 1 (on a real node): a client that disconnects mid-stream under concurrent load ------------------------------
def _open(session_id: str) -> pb.SessionRequest:
    return pb.SessionRequest(open=pb.OpenSession(session_id=session_id, start=0, end=6, max_length=32, batch_size=1,
                                                 wire_dtype="float32"))


def _step(hidden: torch.Tensor, position: int, step_id: int) -> pb.SessionRequest:
    return pb.SessionRequest(step=pb.Step(hidden=codec.encode_hidden(hidden, "float32"), position=position,
                                          step_id=step_id))


@pytest.mark.slow
def test_a_client_leaving_mid_stream_strands_no_other_session(bg_loop, tiny_model_dir, monkeypatch):
    """Four sessions decode side by side on one node (a long batch window: their steps share passes). One client
    goes away while its step waits for the pass; the three others decode to the end with transformers' outputs,
    and the node's cache accounting is back to zero."""
    folder = tiny_model_dir("llama")
    embeds, expected = _reference(folder, sequences=4, length=8)
    monkeypatch.setattr("node.runtime.window.RECENT", 30.0)  # every session counts as active throughout
    node = bg_loop.start_node(folder, 0, 6, throughput=10.0, batch_wait=0.5)

    async def session(index: int, gone: asyncio.Event, together: asyncio.Barrier, leaves: bool):
        async with grpc.aio.insecure_channel(node.address) as channel:
            call = pb_grpc.PotluckStub(channel).Inference(timeout=30)
            await call.write(_open(f"load-{index}"))
            await call.read()
            await call.write(_step(embeds[index : index + 1, :4], 0, 1))
            outs = [codec.decode_tensor((await call.read()).result.hidden, "hidden")]
            for position in range(4, 8):
                if position < 6:
                    await together.wait()  # in step: prefills done, then every step 4 done
                if position == 5 and not leaves:
                    await gone.wait()  # the others' steps come once the leaving client's step waits for the pass
                await call.write(_step(embeds[index : index + 1, position : position + 1], position, position))
                if leaves and position == 5:
                    await _wait_until(lambda: any(w.session.session_id == f"load-{index}"
                                                  for w in node.executor._pending))
                    call.cancel()  # the client goes away while its step waits for the pass
                    await _wait_until(
                        lambda: all(s.session_id != f"load-{index}" for s in node.executor.sessions.all())
                    )
                    gone.set()
                    return None
                outs.append(codec.decode_tensor((await call.read()).result.hidden, "hidden"))
            await call.done_writing()
            return torch.cat(outs, dim=1)

    async def run():
        gone, together = asyncio.Event(), asyncio.Barrier(4)
        return await asyncio.wait_for(asyncio.gather(*(session(i, gone, together, i == 0) for i in range(4))), 15)

    try:
        results = bg_loop.run(run(), timeout=20)
        assert results[0] is None
        for index, got in enumerate(results[1:], start=1):
            torch.testing.assert_close(got, expected[index : index + 1], rtol=1e-5, atol=1e-5)
        assert node.executor.batched_steps > node.executor.passes, "the sessions' steps never shared a pass"
        assert not bg_loop.leaked_cache(), "cache tokens still reserved"
    finally:
        bg_loop.stop_node(node)


# -- 2. a session's answer is the same bits alone and batched --------------------------------------------------
@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory):
    """family -> a tiny random model whose float32 weights are bfloat16 values (as most published checkpoints are),
    so that nodes and the client hold them in exact compact form (common/weights/exact.py)."""
    from tests.support.families import tiny_config

    made = {}

    def get(family: str):
        if family not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.copy_(parameter.to(torch.bfloat16).float())
            made[family] = tmp_path_factory.mktemp(f"bf16-{family}")
            model.save_pretrained(made[family])
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_a_steps_output_is_the_same_bits_alone_and_batched(bf16_model_dir, family):
    """Every family the lean runtime serves, exact weights: a session's prefill and one-token steps give the same
    bits alone as in passes shared with three other sessions of other lengths."""
    folder = bf16_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lengths = [5, 11, 17, 3]
    ids = torch.randint(3, model.config.vocab_size, (len(lengths), 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
    span = lean_span(folder, 0, 6)
    assert exact_span(span).formats.get("bf16") == 24  # every matrix held exactly: the path whose bits are kept

    async def run(together: bool):
        executor = Executor(span, cache_tokens=8192, max_length=64, batch_wait=0.002)
        sessions = [executor.open(f"s{i}", 0, 6, 1, 64, torch.float32) for i in range(len(lengths))]
        outs: list[list[torch.Tensor]] = [[] for _ in lengths]
        plan = [(0, n) for n in lengths]  # (position, tokens) per session: its prefill, then 6 one-token steps
        for k in range(7):
            steps = [(i, s, pos, count) for i, (s, (pos, count)) in enumerate(zip(sessions, plan))]
            if together:
                group = [executor.step(s, embeds[i : i + 1, pos : pos + count], None, None, pos,
                                       convoy=Convoy.of(100 + k, len(steps), "a")) for i, s, pos, count in steps]
                results = await asyncio.gather(*group)
            else:
                results = [await executor.step(s, embeds[i : i + 1, pos : pos + count], None, None, pos)
                           for i, s, pos, count in steps]
            for (i, _, pos, count), out in zip(steps, results):
                outs[i].append(out)
                plan[i] = (pos + count, 1)
        for session in sessions:
            executor.close(session.session_id)
        passes, steps_run = executor.passes, executor.batched_steps
        executor.shutdown()
        return [torch.cat(o, dim=1) for o in outs], passes, steps_run

    alone, passes, steps_run = asyncio.run(run(together=False))
    assert passes == steps_run  # one step a pass
    batched, passes, steps_run = asyncio.run(run(together=True))
    assert passes < steps_run, "the sessions' steps never shared a pass"
    for i, (a, b) in enumerate(zip(alone, batched)):
        assert torch.equal(a, b), f"session {i}: batched differs from alone by {float((a - b).abs().max()):.3g}"
        if family != "mistral" or lengths[i] + 6 <= 16:  # all_layers has no sliding window (mistral's is 16)
            torch.testing.assert_close(a, all_layers(model, ids[i : i + 1, : lengths[i] + 6]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_and_logits_are_the_same_alone_and_among_other_clients(bg_loop, bf16_model_dir, family):
    """Through a real node and the client (its head products combined across generate threads): one prompt's
    greedy tokens and logits alone equal those it gets while three other prompts generate at once, and the
    tokens are plain transformers'."""
    folder = bf16_model_dir(family)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [torch.randint(3, reference.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
               for n in (6, 9, 13, 4)]
    node = bg_loop.start_node(folder, 0, 6, throughput=10.0, batch_wait=0.05)
    remote = DistributedModelForCausalLM.from_pretrained(str(folder), peers=[node.address])
    try:
        def generate(ids):
            out = remote.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True, pad_token_id=0)
            return out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits)

        alone_tokens, alone_logits = generate(prompts[0])
        passes, steps = node.executor.passes, node.executor.batched_steps
        results = [None] * len(prompts)

        def worker(i):
            results[i] = generate(prompts[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert node.executor.batched_steps - steps > node.executor.passes - passes, "no pass carried two sessions"
        tokens, logits = results[0]
        assert tokens == alone_tokens
        assert torch.equal(logits, alone_logits), f"logits differ by {float((logits - alone_logits).abs().max()):.3g}"
        expected = reference.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), max_new_tokens=8,
                                      do_sample=False, pad_token_id=0)
        assert alone_tokens == expected[0, prompts[0].shape[1]:].tolist()
    finally:
        remote.close()
        bg_loop.stop_node(node)


# -- 3. a rate-limited step keeps its session ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_rate_limited_client_backs_off_and_keeps_its_session_on_the_same_node(bg_loop, tiny_model_dir):
    """A node allowing 8 requests a second (bursts of 16); a client generating 24 greedy tokens through it asks
    for more. Its steps are refused, it waits as told and sends them again on the same node: the answer is
    transformers', with no failover and no replay."""
    folder = tiny_model_dir("llama")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    node = bg_loop.start_node(folder, 0, 6, throughput=10.0, rate_limit=8.0)
    remote = DistributedModelForCausalLM.from_pretrained(str(folder), peers=[node.address])
    ids = torch.randint(3, reference.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    try:
        got = remote.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              pad_token_id=0)
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                      pad_token_id=0)
        assert got.tolist() == expected.tolist()
        session = remote.last_session
        assert node.servicer.limiter.refused > 0, "the client never went over the limit"
        assert session.events == [], f"the session failed over: {session.events}"
    finally:
        remote.close()
        bg_loop.stop_node(node)


# -- 5. a pushed step never overtakes a client's step waiting for room ------------------------------------------
def test_a_pushed_step_cannot_overtake_a_clients_step_waiting_for_a_full_inbox(tiny_model_dir, monkeypatch):
    folder = tiny_model_dir("llama")
    monkeypatch.setattr(servicer_module, "MAX_QUEUED_STEPS", 1)
    hidden = torch.zeros(1, 1, AutoModelForCausalLM.from_pretrained(folder).config.hidden_size)

    async def run():
        executor = Executor(lean_span(folder, 0, 6), cache_tokens=4096, max_length=64)
        serving = servicer_module.Serving(executor=executor, state="ONLINE")
        identity = servicer_module.NodeIdentity("n", "n", "m", "h", 6, "float32", "cpu")
        servicer = servicer_module.PotluckServicer(serving, identity)
        session = executor.open("s", 0, 6, 1, 64, torch.float32)
        stream = servicer_module._Stream("127.0.0.1")
        stream.session = session
        servicer._streams["s"] = stream
        stream.inbox.put_nowait(("request", _step(hidden, 0, 1)))  # the inbox is full
        stream.next_position, stream.last_step_id = 1, 1

        async def requests():
            yield _step(hidden, 1, 2)  # the client's next step: waits for room

        reader = asyncio.ensure_future(servicer_module._read(requests(), stream))
        await _wait_until(lambda: stream.inbox._putters)  # the reader waits for room
        stream.inbox.get_nowait()  # the handler takes the first step: room for one
        pushed = pb.PushRequest(session_id="s", step=pb.Step(hidden=codec.encode_hidden(hidden, "float32"),
                                                              position=2, step_id=3))
        try:
            servicer._accept_push(executor, pushed)
            refused = None
        except Exception as error:
            refused = error
        order = []
        await asyncio.sleep(0)
        while not stream.inbox.empty():
            kind, item = stream.inbox.get_nowait()
            if kind != "end":
                order.append((kind, item.step.step_id if kind == "request" else item.step_id))
            await asyncio.sleep(0)
        await reader
        executor.close("s")
        executor.shutdown()
        return refused, order

    refused, order = asyncio.run(run())
    assert order[0] == ("request", 2), f"a pushed step went before the client's step 2: {order}"
    assert refused is not None and getattr(refused, "kind", "") == "RESOURCE_EXHAUSTED", refused


# -- 6. a stream whose client leaves before its first byte stops generating --------------------------------------
def test_a_stream_whose_client_leaves_at_once_stops_generating(monkeypatch):
    from client.api import app as app_module
    from client.api.engine import Completion

    produced, stopped = [], threading.Event()

    def fake_complete(model, tokenizer, input_ids, params, cancelled, on_start=None, on_text=None):
        on_start()
        for _ in range(params.max_new_tokens):
            if cancelled.is_set():
                break
            produced.append(1)
            on_text("x")
            time.sleep(0.01)
        stopped.set()
        return Completion("x" * len(produced), "length", input_ids.shape[1], len(produced))

    monkeypatch.setattr(app_module, "complete", fake_complete)
    served = type("Served", (), {"name": "m", "tokenizer": None})()
    params = app_module.SamplingParams(max_new_tokens=500, temperature=0.0, top_p=1.0, seed=None, stop=(),
                                       prompt_lookup=0)
    run = app_module._Run(served, torch.ones(1, 3, dtype=torch.long), params, chat=True, include_usage=False)

    async def main():
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            response = await run.stream(pool, model=None)

            async def receive():
                return {"type": "http.disconnect"}  # the client is gone before the first byte

            async def send(message):
                raise OSError("connection reset")

            scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
            with pytest.raises(Exception):
                await response(scope, receive, send)
            assert await asyncio.to_thread(stopped.wait, 5), "the generation did not stop"

    asyncio.run(main())
    assert len(produced) < 100, f"{len(produced)} tokens generated for a client that had left"


# -- 7. a head product's leader that dies does not block the others ---------------------------------------------
def test_a_head_leader_dying_from_a_base_exception_does_not_block_other_generations(monkeypatch):
    monkeypatch.setattr("client.combine.HEAD_WAIT", 0.5)

    class Killed(BaseException):
        pass

    weight = torch.randn(20, 8)
    combiner = Combiner(lambda rows: rows @ weight.t())
    original = Combiner._wait_left
    leader_in, follower_queued = threading.Event(), threading.Event()

    def wait_left(self, started, now):
        if threading.current_thread().name == "leader":
            leader_in.set()
            self._lock.release()
            try:
                follower_queued.wait(5)
            finally:
                self._lock.acquire()
            raise Killed()  # e.g. an interrupt while the leader waits for its convoy
        return original(self, started, now)

    monkeypatch.setattr(Combiner, "_wait_left", wait_left)
    outcome = {}

    def leader():
        try:
            combiner.combined(torch.randn(1, 8), (9, 2), _Session())
        except Killed:
            outcome["leader"] = "killed"

    def follower():
        x = torch.randn(1, 8)
        outcome["follower"] = torch.equal(combiner(x), x @ weight.t())

    lead = threading.Thread(target=leader, name="leader")
    lead.start()
    assert leader_in.wait(5)
    follow = threading.Thread(target=follower, name="follower", daemon=True)
    follow.start()
    deadline = time.monotonic() + 5
    while len(combiner._queue) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    follower_queued.set()
    lead.join(5)
    follow.join(5)
    assert outcome.get("leader") == "killed"
    assert not follow.is_alive(), "the other generation waits forever for a leader that is gone"
    assert outcome.get("follower") is True


class _Session:  # what the client's head product keys sessions by (weakly)
    pass
