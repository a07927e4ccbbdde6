"""Training prompts through the swarm (issue 11): gradients through three nodes equal local transformers'."""

from __future__ import annotations

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc

PROMPT = 4  # prompt tokens
TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tiny_swarm):
    """(family, tuning) -> (local transformers model, frozen; distributed model over 3 nodes)."""
    made = {}

    def get(family: str, tuning: str | None):
        if (family, tuning) not in made:
            folder = tiny_model_dir(family)
            local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
            remote = DistributedModelForCausalLM.from_pretrained(
                str(folder), peers=[n.address for n in tiny_swarm(family)], tuning=tuning, num_prompt_tokens=PROMPT)
            if tuning == "deep_ptune":  # zeros at first: make them matter
                torch.manual_seed(5)
                with torch.no_grad():
                    remote.intermediate_prompts.normal_(0, 0.05)
            made[(family, tuning)] = (local, remote)
        return made[(family, tuning)]

    yield get
    for _, remote in made.values():
        remote.close()


def local_loss(local, prompt, deep, ids, labels):
    """The same model run locally: prompt in front, deep prompts added at each layer's input, prompt outputs dropped."""
    hidden = local_hidden(local, prompt, deep, ids)
    return local.loss_function(logits=local.lm_head(hidden), labels=labels, vocab_size=local.config.vocab_size)


def local_hidden(local, prompt, deep, ids):
    """local_loss's pass up to the head: the last hidden states of the input's positions."""
    embeds = local.get_input_embeddings()(ids)
    x = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
    handles = []
    if deep is not None:
        for index, layer in enumerate(local.model.layers):
            def hook(module, args, kwargs, index=index):
                add = lambda h: torch.cat([h[:, :PROMPT] + deep[index], h[:, PROMPT:]], dim=1)  # noqa: E731
                if args:
                    return (add(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])}
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return local.model(inputs_embeds=x).last_hidden_state[:, PROMPT:]
    finally:
        for handle in handles:
            handle.remove()


def trainable(remote) -> list[torch.nn.Parameter]:
    return [p for p in remote.parameters() if p.requires_grad]


def local_copies(remote) -> tuple[torch.Tensor, torch.Tensor | None]:
    prompt = remote.prompt_embeddings.detach().clone().requires_grad_(True)
    deep = getattr(remote, "intermediate_prompts", None)
    return prompt, (deep.detach().clone().requires_grad_(True) if deep is not None else None)


@pytest.mark.parametrize("family,tuning", [("llama", "ptune"), ("llama", "deep_ptune"), ("qwen2", "ptune"),
                                           ("mixtral", "deep_ptune")])
def test_prompt_gradients_match_local(family, tuning, pair, tiny_swarm):
    local, remote = pair(family, tuning)
    assert len(remote.swarm.route()) == 3
    lean = {node.executor.span.lean is not None for node in tiny_swarm(family)}
    assert lean == {family != "mixtral"}  # both node paths: the lean runtime and transformers' layers (mixtral)
    torch.manual_seed(1)
    ids = torch.randint(3, 512, (2, 9))
    remote.zero_grad()
    loss = remote(ids, labels=ids).loss
    loss.backward()
    prompt, deep = local_copies(remote)
    expected = local_loss(local, prompt, deep, ids, ids)
    expected.backward()
    torch.testing.assert_close(loss, expected, **TOL)
    assert [p.shape for p in trainable(remote)] == [p.shape for p in (prompt, deep) if p is not None]
    torch.testing.assert_close(remote.prompt_embeddings.grad, prompt.grad, **TOL)
    assert prompt.grad.abs().sum() > 0
    if deep is not None:
        torch.testing.assert_close(remote.intermediate_prompts.grad, deep.grad, **TOL)
        assert deep.grad[0].abs().sum() > 0 and deep.grad[-1].abs().sum() > 0


def test_input_gradients_with_padding_match_local(pair):
    """No tuning: a model is differentiable w.r.t. inputs_embeds (left padding and the mask travel to Backward)."""
    local, remote = pair("llama", None)
    torch.manual_seed(2)
    ids = torch.randint(3, 512, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100  # predicted from a padding position, whose output is not defined (lean and transformers differ)
    embeds = remote.embed_tokens(ids).detach().requires_grad_(True)
    calls = remote.swarm.train_stats.backward_calls
    remote(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.backward()
    assert remote.swarm.train_stats.backward_calls == calls + 3
    reference = embeds.detach().clone().requires_grad_(True)
    local(inputs_embeds=reference, attention_mask=mask, labels=labels).loss.backward()
    torch.testing.assert_close(embeds.grad, reference.grad, **TOL)
    before = remote.swarm.train_stats.forward_calls
    with torch.no_grad():  # inference keeps the plain stateless pass
        remote(ids)
    remote(ids)  # grad mode on, but nothing to differentiate: the plain pass too
    assert remote.swarm.train_stats.forward_calls == before


def test_optimizer_steps_match_local_and_nodes_stay_frozen(pair, tiny_swarm):
    local, remote = pair("llama", "deep_ptune")
    torch.manual_seed(3)
    probe = torch.randn(1, 6, 64)
    with torch.no_grad():
        before = remote.swarm.forward(probe)
    ids = torch.randint(3, 512, (2, 7))
    prompt, deep = local_copies(remote)
    remote_opt = torch.optim.Adam(trainable(remote), lr=1e-2)
    local_opt = torch.optim.Adam([prompt, deep], lr=1e-2)
    losses = []
    for _ in range(3):
        remote_opt.zero_grad()
        local_opt.zero_grad()
        loss = remote(ids, labels=ids).loss
        loss.backward()
        remote_opt.step()
        expected = local_loss(local, prompt, deep, ids, ids)
        expected.backward()
        local_opt.step()
        torch.testing.assert_close(loss, expected, **TOL)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    torch.testing.assert_close(remote.prompt_embeddings, prompt, **TOL)
    torch.testing.assert_close(remote.intermediate_prompts, deep, **TOL)
    with torch.no_grad():
        assert torch.equal(remote.swarm.forward(probe), before)  # the nodes' weights did not move
    for node in tiny_swarm("llama"):
        for parameter in node.executor.span.parameters():
            assert not parameter.requires_grad and parameter.grad is None
    stats = remote.swarm.train_stats
    assert stats.bytes_sent > 0 and stats.bytes_received > 0 and stats.failovers == 0


def test_malformed_backward_is_refused_and_node_keeps_serving(tiny_swarm):
    node = tiny_swarm("llama")[1]  # serves 2:4
    hidden = codec.encode_tensor(torch.randn(1, 5, 64))
    with grpc.insecure_channel(node.address) as channel:
        stub = pb_grpc.PotluckStub(channel)
        bad = [
            (
                dict(grad_output=codec.encode_tensor(torch.randn(1, 4, 64)), start=2, end=4),
                "grad_output must have the shape",
            ),
            (dict(grad_output=hidden, start=1, end=4), "not served here"),
            (
                dict(grad_output=hidden, start=2, end=4, prompts=codec.encode_tensor(torch.randn(1, 1, 2, 64))),
                "prompts must be [2 layers",
            ),
            (
                dict(grad_output=hidden, start=2, end=4, prompts=codec.encode_tensor(torch.randn(2, 1, 6, 64))),
                "prompts cover 6 tokens",
            ),
        ]
        for fields, message in bad:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Backward(pb.BackwardRequest(hidden=hidden, wire_dtype="float32", **fields), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert message in caught.value.details()
        prompts = codec.encode_tensor(torch.randn(2, 1, 2, 64))
        reply = stub.Backward(pb.BackwardRequest(start=2, end=4, hidden=hidden, grad_output=hidden, prompts=prompts,
                                                 wire_dtype="float32"), timeout=10)
        assert list(reply.grad_input.shape) == [1, 5, 64] and list(reply.grad_prompts.shape) == [2, 1, 2, 64]
        reply = stub.Forward(pb.ForwardRequest(start=2, end=4, hidden=hidden, wire_dtype="float32"), timeout=10)
        assert list(reply.hidden.shape) == [1, 5, 64]


def test_node_lost_before_backward_is_replaced(bg_loop, tiny_model_dir):
    """The node serving the second hop stops between forward and backward: the step re-routes, recomputes
    on the spare node, and ends with the same gradients."""
    folder = tiny_model_dir("llama")
    nodes = [bg_loop.start_node(folder, 0, 3), bg_loop.start_node(folder, 3, 6), bg_loop.start_node(folder, 3, 6)]
    remote = DistributedModelForCausalLM.from_pretrained(str(folder), peers=[n.address for n in nodes],
                                                         tuning="ptune", num_prompt_tokens=PROMPT)
    try:
        local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
        ids = torch.randint(3, 512, (1, 6))
        loss = remote(ids, labels=ids).loss
        used = remote.swarm.train_stats.route[1]
        victim = next(n for n in nodes[1:] if n.address == used)
        bg_loop.stop_node(victim)
        nodes.remove(victim)
        loss.backward()
        assert remote.swarm.train_stats.failovers == 1
        prompt, _ = local_copies(remote)
        local_loss(local, prompt, None, ids, ids).backward()
        torch.testing.assert_close(remote.prompt_embeddings.grad, prompt.grad, **TOL)
    finally:
        remote.close()
        for node in nodes:
            bg_loop.stop_node(node)


def test_generate_with_a_trained_prompt_matches_local(pair):
    """ptune: the session's first step carries the prompt; greedy tokens equal transformers' on the same embeddings."""
    local, remote = pair("llama", "ptune")
    torch.manual_seed(4)
    ids = torch.randint(3, 512, (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = remote.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    with torch.no_grad():
        prompt = remote.prompt_embeddings.unsqueeze(0).expand(2, -1, -1)
        embeds = torch.cat([prompt, local.get_input_embeddings()(ids)], dim=1)
    expected = local.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              **kwargs)
    assert got[:, :5].tolist() == ids.tolist()
    assert got[:, 5:].tolist() == expected[:, -8:].tolist()


def test_node_process_killed_during_backward_is_replaced(tiny_model_dir, bg_loop, monkeypatch):
    """The node process serving the second hop gets SIGKILL as its Backward call is sent. The step re-routes to
    the spare node serving the same layers, recomputes there, and ends with the same gradients."""
    from client.training import RemoteSpan
    from node.launcher import NodeProcess

    folder = tiny_model_dir("llama")
    # one real process to SIGKILL (preferred by routing: it publishes more throughput); the rest in-process
    victim = NodeProcess(folder, 3, 6, threads=1, extra_args=("--throughput", "1000", "--no-mdns")).start()
    inproc = [bg_loop.start_node(folder, 0, 3), bg_loop.start_node(folder, 3, 6, throughput=0.01)]
    remote = None
    try:
        victim.wait_ready(120)
        remote = DistributedModelForCausalLM.from_pretrained(
            str(folder),
            peers=[inproc[0].address, victim.address, inproc[1].address],
            tuning="ptune",
            num_prompt_tokens=PROMPT,
        )
        local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
        ids = torch.randint(3, 512, (1, 6))
        loss = remote(ids, labels=ids).loss
        assert remote.swarm.train_stats.route[1] == victim.address
        call = RemoteSpan._call

        async def killing_call(self, method, hop, request):
            if method == "Backward" and hop.peer.address == victim.address:
                victim.kill()  # SIGKILL: the process is gone while its Backward is on the way
            return await call(self, method, hop, request)

        monkeypatch.setattr(RemoteSpan, "_call", killing_call)
        loss.backward()
        assert victim.process.returncode == -9
        assert remote.swarm.train_stats.failovers == 1
        prompt, _ = local_copies(remote)
        local_loss(local, prompt, None, ids, ids).backward()
        torch.testing.assert_close(remote.prompt_embeddings.grad, prompt.grad, **TOL)
    finally:
        if remote is not None:
            remote.close()
        victim.kill()
        for node in inproc:
            bg_loop.stop_node(node)


def test_transformers_trainer_trains_the_prompt_as_local_adamw(tiny_model_dir, tiny_swarm, tmp_path):
    """The transformers `Trainer` drives the distributed model as any PreTrainedModel: its steps equal plain AdamW
    on the same prompt computed locally (constant learning rate, no clipping, one batch a step)."""
    from transformers import Trainer, TrainingArguments

    folder = tiny_model_dir("qwen2")
    remote = DistributedModelForCausalLM.from_pretrained(str(folder), peers=[n.address for n in tiny_swarm("qwen2")],
                                                         tuning="ptune", num_prompt_tokens=PROMPT)
    try:
        local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
        torch.manual_seed(8)
        ids = torch.randint(3, 512, (2, 7))
        data = [{"input_ids": row, "labels": row} for row in ids]
        prompt, _ = local_copies(remote)
        initial = prompt.detach().clone()
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            weight_decay=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            logging_strategy="no",
            disable_tqdm=True,
        )
        Trainer(model=remote, args=args, train_dataset=data).train()
        optimizer = torch.optim.AdamW([prompt], lr=1e-2, weight_decay=0.0)
        for _ in range(3):
            optimizer.zero_grad()
            local_loss(local, prompt, None, ids, ids).backward()
            optimizer.step()
        torch.testing.assert_close(remote.prompt_embeddings.detach(), prompt.detach(), rtol=1e-4, atol=1e-5)
        assert (remote.prompt_embeddings.detach() - initial).abs().max() > 1e-3  # three steps moved it
    finally:
        remote.close()


@pytest.mark.parametrize("family", ["llama", "mixtral"])  # the lean runtime (static cache) and transformers' layers
def test_generate_with_deep_prompts_matches_local(family, pair):
    """deep_ptune: the session's first step carries each hop's slice of the deep prompts; greedy tokens equal a
    local greedy loop (full sequences, no cache) with the same prompts added at each layer's input."""
    local, remote = pair(family, "deep_ptune")
    assert remote.intermediate_prompts.abs().sum() > 0
    torch.manual_seed(6)
    ids = torch.randint(3, 512, (2, 5))
    got = remote.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    prompt, deep = local_copies(remote)

    def greedy(deep_prompts):
        tokens = ids
        with torch.no_grad():
            for _ in range(6):
                logits = local.lm_head(local_hidden(local, prompt, deep_prompts, tokens)[:, -1])
                tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
        return tokens.tolist()

    expected = greedy(deep)
    assert expected != greedy(None)  # the deep prompts change the tokens
    assert got.tolist() == expected
    assert remote.last_session.pushed_steps >= 1  # the prompted first step is client-driven, later ones pushed


def test_step_with_prompts_after_position_zero_is_refused(tiny_swarm):
    node = tiny_swarm("llama")[1]  # serves 2:4
    prompts = codec.encode_tensor(torch.randn(2, 1, 2, 64))

    def requests():
        yield pb.SessionRequest(open=pb.OpenSession(session_id="deep-refused", start=2, end=4, max_length=16,
                                                    batch_size=1, wire_dtype="float32"))
        yield pb.SessionRequest(step=pb.Step(hidden=codec.encode_tensor(torch.randn(1, 3, 64)), position=0, step_id=1,
                                             prompts=prompts))
        yield pb.SessionRequest(step=pb.Step(hidden=codec.encode_tensor(torch.randn(1, 1, 64)), position=3, step_id=2,
                                             prompts=prompts))

    with grpc.insecure_channel(node.address) as channel:
        replies = pb_grpc.PotluckStub(channel).Inference(requests(), timeout=20)
        assert next(replies).WhichOneof("kind") == "opened"
        assert list(next(replies).result.hidden.shape) == [1, 3, 64]  # prompts on the prefill: accepted
        with pytest.raises(grpc.RpcError) as caught:
            next(replies)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "only allowed on a step at position 0" in caught.value.details()

        pushed = pb.Step(hidden=codec.encode_tensor(torch.randn(1, 3, 64)), position=0, step_id=1, prompts=prompts)
        pushed.push.add(address=tiny_swarm("llama")[2].address, session_id="elsewhere")
        opened = pb.SessionRequest(open=pb.OpenSession(session_id="deep-pushed", start=2, end=4, max_length=16,
                                                       batch_size=1, wire_dtype="float32"))
        replies = pb_grpc.PotluckStub(channel).Inference(iter([opened, pb.SessionRequest(step=pushed)]), timeout=20)
        assert next(replies).WhichOneof("kind") == "opened"
        with pytest.raises(grpc.RpcError) as caught:
            next(replies)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert "a step with prompts cannot be pushed" in caught.value.details()


def test_generate_with_deep_prompts_survives_a_lost_node(bg_loop, tiny_model_dir):
    """The node serving the second hop stops mid-generation: the spare replays the hop's history, the prefill with
    its slice of the deep prompts first, and the tokens stay those of the local greedy loop."""
    from transformers.generation.streamers import BaseStreamer

    folder = tiny_model_dir("llama")
    nodes = [bg_loop.start_node(folder, 0, 3), bg_loop.start_node(folder, 3, 6), bg_loop.start_node(folder, 3, 6)]
    remote = DistributedModelForCausalLM.from_pretrained(str(folder), peers=[n.address for n in nodes],
                                                         tuning="deep_ptune", num_prompt_tokens=PROMPT)

    class StopSecondHop(BaseStreamer):
        calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls == 3:  # the prompt, then two new tokens
                used = remote.last_session.route[1].peer.address
                victim = next(n for n in nodes[1:] if n.address == used)
                bg_loop.stop_node(victim)
                nodes.remove(victim)

        def end(self):
            pass

    try:
        torch.manual_seed(9)
        with torch.no_grad():
            remote.intermediate_prompts.normal_(0, 0.05)
        local = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
        ids = torch.randint(3, 512, (1, 5))
        got = remote.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                              streamer=StopSecondHop())
        events = remote.last_session.events
        assert len(events) == 1 and events[0].start == 3 and events[0].replayed_tokens >= PROMPT + 5, events
        prompt, deep = local_copies(remote)
        expected = ids
        with torch.no_grad():
            for _ in range(6):
                logits = local.lm_head(local_hidden(local, prompt, deep, expected)[:, -1])
                expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
        assert got.tolist() == expected.tolist()
    finally:
        remote.close()
        for node in nodes:
            bg_loop.stop_node(node)
