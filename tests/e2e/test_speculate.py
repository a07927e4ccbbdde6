"""Speculative decoding through the swarm: a draft (prompt lookup, an assistant model) is checked in one pass
through the chain, the rejected tokens are taken back (a session rewind), and the tokens stay plain
transformers' greedy ones (or, sampling, transformers' own samples with the same seed)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client.model import RemoteCache
from client.routing import Hop
from client.session import HopStream, _merged_history
from client.textgen import encode_prompt
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb

# The answer repeats the prompt: prompt lookup's drafts are right most of the time.
COPY_PROMPT = ("Repeat this sentence exactly, word for word: the village school shares one computer between "
               "forty children, so every lesson starts with a queue.")
NEW_TOKENS = 32


def greedy(model, input_ids, **kwargs) -> list[int]:
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, **kwargs)
    return out[0, input_ids.shape[1]:].tolist()


def test_prompt_lookup_gives_transformers_greedy_tokens_in_fewer_passes(remote, smollm_reference, tokenizer,
                                                                         chain_cache_freed):
    input_ids = encode_prompt(tokenizer, COPY_PROMPT, True)
    expected = greedy(smollm_reference, input_ids)
    assert greedy(remote, input_ids, prompt_lookup_num_tokens=6) == expected
    session = remote.last_session
    assert session.pushed_steps == session.steps  # drafts and rewinds keep the chain pushing
    assert remote.last_draft is not None and remote.last_draft.lengths  # drafts were checked (adaptive lengths)
    # the answer is mostly a copy: several tokens accepted per pass
    assert session.steps <= 0.6 * len(expected), f"{session.steps} passes for {len(expected)} tokens"


def test_a_stop_string_completed_inside_a_draft_stops_generation_as_without_drafts(remote, smollm_reference,
                                                                                   tokenizer):
    """transformers' own prompt lookup looks for stop strings only after a pass's last token, so one completed by a
    drafted token mid-pass goes unseen and generation runs on (measured with transformers 5.24: the whole sentence
    and <|im_end|> instead of stopping at "forty"). Drafts through the swarm end before such a token."""
    input_ids = encode_prompt(tokenizer, COPY_PROMPT, True)
    stop = {"stop_strings": ["forty"], "tokenizer": tokenizer}
    expected = greedy(smollm_reference, input_ids, **stop)  # no drafts: stops at the stop string
    assert tokenizer.decode(expected).endswith("forty")
    assert greedy(remote, input_ids, prompt_lookup_num_tokens=7, **stop) == expected
    assert remote.last_session.steps < len(expected)  # drafts were still accepted before the stop


def test_a_generate_call_beside_another_of_the_same_client_does_not_draft(remote, smollm_reference, tokenizer):
    input_ids = encode_prompt(tokenizer, COPY_PROMPT, True)
    expected = greedy(smollm_reference, input_ids)
    with remote.calls.call():  # another generate call of this client is running
        assert greedy(remote, input_ids, prompt_lookup_num_tokens=7) == expected
    assert remote.last_session.steps == len(expected)  # one pass per token
    assert greedy(remote, input_ids, prompt_lookup_num_tokens=7) == expected
    assert remote.last_session.steps < len(expected)  # alone again: drafts


def test_an_assistant_model_drafts_through_the_swarm(remote, smollm_dir, smollm_reference, tokenizer,
                                                     chain_cache_freed):
    """transformers' assisted generation with a local draft model: here the same weights, so every draft is right."""
    assistant = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    input_ids = encode_prompt(tokenizer, "Write a haiku about sharing food with neighbours.", True)
    expected = greedy(smollm_reference, input_ids)
    assert greedy(remote, input_ids, assistant_model=assistant) == expected
    assert remote.last_session.steps <= len(expected) / 3


def test_cli_generate_with_prompt_lookup(smollm_dir, smollm_chain, smollm_reference, tokenizer, capsys,
                                         chain_cache_freed):
    from node.cli.main import main

    peers = ",".join(n.address for n in smollm_chain)
    code = main(["generate", "--model", str(smollm_dir), "--peers", peers, "--prompt", COPY_PROMPT, "--chat",
                 "--max-new-tokens", str(NEW_TOKENS), "--prompt-lookup", "6"])
    done = capsys.readouterr()
    assert code == 0, done.err
    expected = greedy(smollm_reference, encode_prompt(tokenizer, COPY_PROMPT, True))
    assert done.out.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
    passes = int(done.err.split(" passes")[0].rsplit(" ", 1)[1])  # "[19 tokens in 6 passes, ... tokens/s decode]"
    assert passes < len(expected) and " 0.0 tokens/s" not in done.err
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--model", str(smollm_dir), "--prompt", "hi", "--prompt-lookup", "-1"])
    assert exited.value.code == 2 and "not a non-negative integer" in capsys.readouterr().err


def test_api_serves_greedy_requests_with_prompt_lookup(remote, tokenizer, smollm_reference, chain_cache_freed):
    """`potluck api --prompt-lookup 6`: the same text as transformers' greedy one, in fewer passes, also for
    requests running at once (their steps travel as convoys)."""
    from concurrent.futures import ThreadPoolExecutor

    from client.api import create_app
    from client.api.settings import ApiSettings
    from tests.e2e.test_api import ApiServer

    expected = tokenizer.decode(greedy(smollm_reference, encode_prompt(tokenizer, COPY_PROMPT, True)),
                                skip_special_tokens=True)
    api = ApiServer(create_app({"smollm": remote}, tokenizer, settings=ApiSettings(prompt_lookup=6)))
    try:
        client = api.client()

        def ask(_=None) -> tuple[str, int]:
            reply = client.chat.completions.create(model="smollm", messages=[{"role": "user", "content": COPY_PROMPT}],
                                                   temperature=0, max_tokens=NEW_TOKENS)
            return reply.choices[0].message.content, reply.usage.completion_tokens

        text, tokens = ask()
        assert text == expected and remote.last_session.steps < tokens
        with ThreadPoolExecutor(3) as pool:
            assert [text for text, _ in pool.map(ask, range(3))] == [expected] * 3
        # a stop string: the text ends before it, and no token was generated past the one that completed it
        stopped = greedy(smollm_reference, encode_prompt(tokenizer, COPY_PROMPT, True), stop_strings=["forty"],
                         tokenizer=tokenizer)
        reply = client.chat.completions.create(model="smollm", messages=[{"role": "user", "content": COPY_PROMPT}],
                                               temperature=0, max_tokens=NEW_TOKENS, stop=["forty"])
        assert reply.choices[0].message.content == tokenizer.decode(stopped, skip_special_tokens=True)[:-len("forty")]
        assert reply.usage.completion_tokens == len(stopped) and reply.choices[0].finish_reason == "stop"
    finally:
        api.stop()


def test_api_samples_with_prompt_lookup_as_transformers_does(remote, tokenizer, smollm_reference, chain_cache_freed,
                                                              monkeypatch):
    """A sampled request (temperature > 0, a seed) with prompt lookup: transformers' rule keeps a drafted token while
    it equals the token sampled at its place, so the text follows the model's distribution. With transformers'
    fixed draft length, the same seed gives the same text as transformers' own generate with prompt lookup."""
    from client.api import create_app
    from client.api.settings import ApiSettings
    from tests.e2e.test_api import ApiServer

    monkeypatch.setattr(remote, "draft_schedule", "fixed")  # as transformers drafts: the same random draws
    input_ids = encode_prompt(tokenizer, COPY_PROMPT, True)
    torch.manual_seed(11)
    out = smollm_reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                    temperature=0.5, top_p=0.9, top_k=0, prompt_lookup_num_tokens=6,
                                    max_new_tokens=NEW_TOKENS)
    expected = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    api = ApiServer(create_app({"smollm": remote}, tokenizer, settings=ApiSettings(prompt_lookup=6)))
    try:
        reply = api.client().chat.completions.create(
            model="smollm", messages=[{"role": "user", "content": COPY_PROMPT}], temperature=0.5, top_p=0.9,
            seed=11, max_tokens=NEW_TOKENS)
        assert reply.choices[0].message.content == expected
        assert remote.last_session.steps < reply.usage.completion_tokens
    finally:
        api.stop()


def test_rewind_then_new_tokens_match_transformers(remote, smollm_reference):
    """Step 6 tokens, take 3 back, step 3 others: the logits are transformers' for the sequence actually kept."""
    torch.manual_seed(3)
    first, other = torch.randint(0, 49152, (1, 6)), torch.randint(0, 49152, (1, 3))
    kept = torch.cat([first[:, :3], other], dim=1)
    with torch.inference_mode(), remote.inference_session(max_length=16) as session:
        cache = RemoteCache(session)
        remote(input_ids=first, cache=cache)
        cache.crop(-3)
        assert session.position == 3
        logits = remote(input_ids=other, cache=cache).logits
        assert session.position == 6 and session.pushed_steps == 2
        expected = smollm_reference(kept).logits[:, 3:]
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="holds 6"):
        session.rewind(7)


def _step(position: int, hidden: torch.Tensor, wire: str, mask: bool) -> pb.Step:
    step = pb.Step(hidden=codec.encode_hidden(hidden, wire), position=position)
    tokens = hidden.shape[1]
    step.position_ids.CopyFrom(codec.encode_tensor(torch.arange(position, position + tokens).expand(2, tokens) + 100))
    if mask:
        step.attention_mask.CopyFrom(codec.encode_tensor(torch.ones(2, tokens, dtype=torch.int64)))
    return step


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
@pytest.mark.parametrize("cut_at, kept_steps", [(7, 3), (6, 2), (2, 1), (0, 0), (9, 3)])
def test_a_cut_history_replays_exactly_the_tokens_kept(wire, cut_at, kept_steps):
    """HopStream.cut: the replay (the merged history) is the first `cut_at` tokens of what the hop was sent."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8).to(codec.wire_dtype(wire)).float()
    stream = HopStream(None, Hop(None, 0, 2), "s", 16, 2, wire)
    stream.history = [_step(0, hidden[:, :5], wire, False), _step(5, hidden[:, 5:6], wire, True),
                      _step(6, hidden[:, 6:], wire, False)]
    stream.position = 9
    full_hidden, full_positions, full_mask = _merged_history(stream.history)
    stream.cut(cut_at)
    assert stream.position == cut_at and len(stream.history) == kept_steps
    if not cut_at:
        return
    cut_hidden, cut_positions, cut_mask = _merged_history(stream.history)
    assert torch.equal(cut_hidden, full_hidden[:, :cut_at]) and torch.equal(cut_positions, full_positions[:, :cut_at])
    assert (cut_mask is None) == (cut_at <= 5)
    if cut_mask is not None:
        assert torch.equal(cut_mask, full_mask[:, :cut_at])


def _lookup_draft(most: int):
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    from client.draft import AdaptiveDraft

    lookup = PromptLookupCandidateGenerator(num_output_tokens=most, max_matching_ngram_size=2, max_length=200,
                                            vocab_size=100)
    return AdaptiveDraft(lookup, most=most)


def test_adaptive_draft_follows_how_many_tokens_are_accepted():
    draft = _lookup_draft(8)
    text = torch.tensor([list(range(10, 40)) + [10, 11]])  # the last two tokens occurred before: 28 follow them

    def drafts(matches_of, count: int) -> list[int]:
        lengths = []
        for _ in range(count):
            candidates, _ = draft.get_candidates(text)
            assert torch.equal(candidates[0, text.shape[1]:], torch.arange(12, 12 + draft.drafted))  # the continuation
            lengths.append(draft.drafted)
            draft.update_candidate_strategy(text, None, matches_of(draft.drafted))
        return lengths

    assert drafts(lambda n: n, 3) == [8, 8, 8]        # accepted whole: full drafts
    assert drafts(lambda n: n - 3, 1) == [8]          # one miss amid copying ...
    assert drafts(lambda n: n, 1)[0] >= 6             # ... keeps long drafts
    assert drafts(lambda n: 0, 6)[-1] == 1            # wrong drafts: down to one token
    assert draft.p < 0.2
    assert drafts(lambda n: n, 5)[-1] == 8            # right again: back to full drafts within a few passes
    assert draft.requires_model_outputs is False      # the rest of the interface is the inner generator's


def test_drafts_stop_while_other_generate_calls_of_the_client_run():
    """Several sessions of one client already fill the nodes' passes: drafts would lengthen them for everyone."""
    from client.draft import Calls

    calls = Calls()
    draft = _lookup_draft(8)
    draft.alone = calls.alone
    text = torch.tensor([list(range(10, 40)) + [10, 11]])
    with calls.call():
        assert draft.get_candidates(text)[0].shape[1] == text.shape[1] + 8  # alone: a full draft
        with calls.call():
            candidates, logits = draft.get_candidates(text)
            assert torch.equal(candidates, text) and logits is None and draft.drafted == 0  # a plain step
            p = draft.p
            draft.update_candidate_strategy(text, None, 0)
            assert draft.p == p  # a step without a draft says nothing about drafts
        assert draft.get_candidates(text)[0].shape[1] == text.shape[1] + 8
    assert calls.running == 0


def test_best_length_grows_with_the_acceptance_rate():
    from client.draft import best_length

    lengths = [best_length(p / 20, 8) for p in range(21)]
    assert lengths[0] == 1 and lengths[-1] == 8 and lengths == sorted(lengths)


def test_stop_aware_drafts_end_before_the_token_that_completes_a_stop():
    from client.draft import StopAwareDraft

    class Fixed:
        def get_candidates(self, input_ids):
            return torch.cat([input_ids, torch.tensor([[5, 6, 7, 8]])], dim=1), None

        def update_candidate_strategy(self, *args):
            pass

    def ends_with_7(ids, scores):
        return ids[:, -1] == 7

    prompt = torch.tensor([[1, 2]])
    candidates, _ = StopAwareDraft(Fixed(), (ends_with_7,)).get_candidates(prompt)
    assert candidates.tolist() == [[1, 2, 5, 6]]  # 7 would complete the stop: the model must say it itself
    candidates, _ = StopAwareDraft(Fixed(), (lambda ids, s: ids[:, -1] == 9,)).get_candidates(prompt)
    assert candidates.tolist() == [[1, 2, 5, 6, 7, 8]]


def test_no_draft_found_leaves_the_length_alone():
    draft = _lookup_draft(4)
    text = torch.arange(10, 30).unsqueeze(0)  # no repeated n-gram: nothing to draft
    candidates, _ = draft.get_candidates(text)
    assert candidates.shape == text.shape and draft.drafted == 0
    draft.update_candidate_strategy(text, None, 0)
    assert draft.length == 4 and draft.lengths == []
