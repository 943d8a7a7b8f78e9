"""docs/recipe.md is generated from the recipe schema: it must be current, and every key must say what it means."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dpo_dist.config import reference
from dpo_dist.config.recipe import load_recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipe.md"


def sections(text: str) -> dict[str, dict[str, str]]:
    """{section heading: {key: meaning}} read back from the doc's tables."""
    out: dict[str, dict[str, str]] = {}
    for chunk in text.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        rows = [line.strip("|").split(" | ") for line in body.splitlines() if line.startswith("| `")]
        out[title] = {row[0].strip("` "): row[-1].strip() for row in rows}
    return out


def test_doc_is_current():
    assert DOC.read_text(encoding="utf-8") == reference.recipe_markdown(), (
        f"docs/recipe.md is out of date with dpo_dist/config/recipe.py; regenerate it: {reference.REGENERATE}")


def test_every_schema_field_is_documented_with_a_meaning():
    doc = sections(reference.recipe_markdown())
    for cls in reference.places():
        table = doc.get(reference.heading(cls))
        assert table is not None, f"docs/recipe.md has no section for {cls.__name__}"
        for f in dataclasses.fields(cls):
            assert f.name in table, f"{cls.__name__}.{f.name} is missing from docs/recipe.md"
            assert table[f.name], (f"{cls.__name__}.{f.name} has no meaning: write a `# comment` on its line (or "
                                   f"just above it) in dpo_dist/config/recipe.py, then run {reference.REGENERATE}")


def test_a_field_without_a_comment_is_caught(monkeypatch):
    comments = {name: dict(fields) for name, fields in reference.field_comments().items()}
    comments["TrainConfig"]["learning_rate"] = ""
    monkeypatch.setattr(reference, "field_comments", lambda: comments)
    with pytest.raises(AssertionError, match="TrainConfig.learning_rate has no meaning"):
        test_every_schema_field_is_documented_with_a_meaning()


def test_comments_are_read_from_above_and_after_the_field():
    comments = reference.field_comments()
    assert comments["Recipe"]["output_dir"] == "defaults to runs/<name>"  # trailing
    assert comments["TrainConfig"]["on_nonfinite_loss"].startswith("A step whose loss is NaN/inf")  # the line above
    assert comments["StageConfig"]["sft_weight"].endswith("0 = plain DPO.")  # two lines above, joined


def test_documented_override_examples_do_what_the_doc_says():
    text = reference.OVERRIDES
    examples = ["stages.sft.train.learning_rate=1e-4", "seed=7", "stages.1.beta=0.2", "stages.sft.max_length=1024",
                "method.lora_r=16", "stages.dpo.method.type=full", "model.template=qwen2.5"]
    assert all(e in text for e in examples)
    base = load_recipe("qwen2.5-7b-sft-dpo-qlora")
    recipe = load_recipe("qwen2.5-7b-sft-dpo-qlora", examples + ["train.warmup_steps=5", "train.max_grad_norm=0.5",
                                                                  "method.target_modules=[q_proj, v_proj]"])
    sft, dpo = recipe.stages
    assert recipe.seed == 7 and recipe.model.template == "qwen2.5"
    assert sft.train.learning_rate == pytest.approx(1e-4)
    assert dpo.train.learning_rate == pytest.approx(base.stages[1].train.learning_rate)
    assert sft.max_length == 1024 and dpo.beta == pytest.approx(0.2)
    # `stages.dpo.method` is a whole block of the stage's own: keys left out take their defaults, not the recipe's
    assert recipe.method_of(sft).lora_r == 16 and recipe.method_of(dpo).type == "full"
    assert recipe.method_of(dpo).lora_r == 64 and recipe.method_of(dpo).target_modules is None
    assert recipe.method.target_modules == ["q_proj", "v_proj"]
    # the recipe-level train default reaches stages that do not set the key, and not those that do
    assert sft.train.max_grad_norm == dpo.train.max_grad_norm == pytest.approx(0.5)
    assert (sft.train.warmup_steps, dpo.train.warmup_steps) == (700, 200)
