"""transformers' text-generation pipeline over the swarm: it works, and says nothing about it."""

from __future__ import annotations

import logging

from transformers import pipeline

from client import DistributedModelForCausalLM


def test_text_generation_pipeline_runs_without_complaints(tiny_model_dir, tiny_swarm, tokenizer, caplog):
    """Not `The model 'DistributedModelForCausalLM' is not supported for text-generation. Supported models are
    [~200 names]`, which transformers logs as an error for a class outside its own list."""
    nodes = tiny_swarm("llama")
    model = DistributedModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), peers=[n.address for n in nodes])
    library = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root's handlers
    library.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
            # the SmolLM2 tokenizer: these words' ids lie within the tiny model's vocabulary
            out = generator("a b c d", max_new_tokens=3, do_sample=False, return_full_text=False)
    finally:
        library.removeHandler(caplog.handler)
        model.close()
    assert isinstance(out[0]["generated_text"], str)
    noise = [record.getMessage()[:200] for record in caplog.records if record.levelno >= logging.ERROR]
    assert not noise, noise
