"""Answers during training (train.sample_prompts, train.sample_every) under the cpu profile: written to samples.jsonl
and TensorBoard at the right steps, equal to `generate` on the exported model at the last step, and never changing
the training numbers (the same stage with sampling on and off). Under cpu-fsdp-2: tests/test_trackers.py."""
from __future__ import annotations

import pytest

from dpo_dist.config.profiles import Profile
from dpo_dist.config.recipe import recipe_from_dict
from tests.helpers import read_samples, sampling_recipe, training_numbers, untied_base


@pytest.mark.e2e
def test_samples_are_written_at_their_steps_match_generate_and_leave_training_unchanged(tiny_base, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpo_dist.data.render import Renderer
    from dpo_dist.inference.loader import load_model
    from dpo_dist.inference.scoring import generate
    from dpo_dist.training.run import run_recipe

    base = untied_base(tiny_base, tmp_path / "base")
    recipe = recipe_from_dict(sampling_recipe(base, tmp_path, sample={"sample_every": 2, "sample_max_new_tokens": 12},
                                              report_to=["tensorboard"]))
    lines = []
    results = {r.name: r for r in run_recipe(recipe, Profile(name="cpu", micro_batch_size=2, precision="fp32",
                                                             attn_implementation="sdpa"), log=lines.append)}

    assert training_numbers(results["sft"].run_dir) == training_numbers(results["plain"].run_dir)
    assert len(training_numbers(results["sft"].run_dir)) == 4
    assert not (results["plain"].run_dir / "samples.jsonl").exists()
    assert "[samples] step 2: 2 answers → " + str(results["sft"].run_dir / "samples.jsonl") in lines

    from transformers import AutoTokenizer

    for name in ("sft", "dpo"):
        result = results[name]
        rows = read_samples(result.run_dir)
        assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (2, 4) for p in
                                                            ("Describe the owl 3.", "Describe a cat.")], name
        assert rows[1]["messages"][1] == {"role": "assistant", "content": "Hello."}
        assert any(r["response"] for r in rows), name  # the untied base answers with text
        tokenizer = AutoTokenizer.from_pretrained(result.output)  # the exported tokenizer and template
        exported = load_model(str(base), str(result.output), dtype="fp32")
        again = generate(exported, tokenizer, Renderer(tokenizer), [r["messages"] for r in rows[2:]],
                         max_new_tokens=12, batch_size=1)
        assert [r["response"] for r in rows[2:]] == again, name  # step 4 is the exported model

        events = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"tensors": 0})
        events.Reload()
        texts = events.Tensors("samples/text_summary")
        assert [t.step for t in texts] == [2, 4], name
        shown = texts[-1].tensor_proto.string_val[0].decode()
        assert all(r["prompt"] in shown and r["response"] in shown for r in rows[2:]), shown
