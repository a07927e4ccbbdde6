"""client/processors.py: transformers' logits processors, the same scores at a decode step's cost."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
)

from client.processors import LeanProcessors, MinLength, MinNewTokensLength


class _TakesKwargs(LogitsProcessor):
    """A user's processor that needs an extra argument."""

    def __call__(self, input_ids, scores, boost):
        return scores + boost


@pytest.mark.parametrize("eos", [2, [2, 7], [2, 500]])  # 500: not a column of a 100-word vocabulary
def test_lean_processors_give_transformers_scores(eos):
    processors = [MinLengthLogitsProcessor(12, eos), MinNewTokensLengthLogitsProcessor(4, 3, eos),
                  RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7)]
    theirs, ours = LogitsProcessorList(processors), LeanProcessors(processors)
    assert [type(p) for p in ours][:2] == [MinLength, MinNewTokensLength]  # the two replaced, the rest kept
    assert ours[2] is processors[2] and ours[3] is processors[3]
    torch.manual_seed(0)
    for length in (5, 6, 7, 11, 12, 13):  # below and past both minimums
        ids = torch.randint(0, 100, (3, length))
        scores = torch.randn(3, 100)
        expected, got = theirs(ids, scores), ours(ids, scores)
        assert torch.equal(got, expected)
        assert got is not scores  # a new tensor, as transformers returns
    blocked = ours(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 100))
    columns = [i for i in ([eos] if isinstance(eos, int) else eos) if i < 100]
    assert torch.isinf(blocked[0, columns]).all() and torch.isfinite(blocked[0]).sum().item() == 100 - len(columns)


def test_lean_processors_pass_extra_arguments_and_refuse_missing_ones():
    ours = LeanProcessors([_TakesKwargs()])
    scores = torch.zeros(1, 4)
    assert torch.equal(ours(torch.zeros(1, 2, dtype=torch.long), scores, boost=1.5), scores + 1.5)
    with pytest.raises(ValueError, match="boost"):
        ours(torch.zeros(1, 2, dtype=torch.long), scores)
