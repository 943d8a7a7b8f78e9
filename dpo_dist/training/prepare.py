"""`dpo-dist prepare RECIPE [--profile P] [key=value ...]`: tokenize every stage's data into the cache.

Only the tokenizer is loaded, never a model, so this runs on a CPU node before a GPU job. Training on the same
recipe then reads the cache and tokenizes nothing: both go through `prepare_stage_data`, with the same tokenizer
(the recipe's model, for every stage, chained ones included), template, lengths and data options, so they compute
the same cache keys. An interrupted prepare leaves no half entry (dpo_dist.data.cache); running it again builds
what is missing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from dpo_dist.config.recipe import Recipe, StageConfig


@dataclass
class StageData:
    train: object  # dpo_dist.data.tokenize.Prepared
    eval: object | None


def data_tokenizer(recipe: Recipe, log: Callable = print):
    """(tokenizer, renderer) for the data of every stage: the recipe's own model and template. A chained stage
    trains on the previous stage's weights, whose saved tokenizer is this one. The template chosen, and why, is
    logged (and a warning when it replaces the tokenizer's own)."""
    from dpo_dist.data.render import Renderer
    from dpo_dist.models.loading import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    renderer = Renderer(tokenizer, recipe.model.template)
    for line in template_lines(renderer):
        log(line)
    return tokenizer, renderer


def template_lines(renderer) -> list[str]:
    """What `prepare`, `train` and `validate` say about the chat template: the choice, and any warning."""
    choice = renderer.choice
    bos = f", BOS {renderer.bos}" if renderer.bos else ", no BOS"
    lines = [f"[data] chat template: {choice.name} ({choice.why}); end of turn {renderer.eot_token}{bos}"]
    if choice.warning:
        lines.append(f"warning: {choice.warning}")
    return lines


def prepare_stage_data(stage: StageConfig, tokenizer, renderer, log: Callable = print,
                       wait_log: Callable | None = None, show_progress: bool | None = None) -> StageData:
    """Tokenize (or read from the cache) one stage's data.train and data.eval."""
    from dpo_dist.data.tokenize import prepare_dataset

    data = stage.data

    def prepare(source):
        return prepare_dataset(stage.data_kind, source, tokenizer, renderer, max_length=stage.max_length,
                               max_prompt_length=stage.max_prompt_length, fmt=data.format,
                               on_bad_row=data.on_bad_row, split=data.split, max_rows=data.max_rows,
                               num_proc=data.num_proc, log=log, wait_log=wait_log, show_progress=show_progress)

    return StageData(prepare(data.train), prepare(data.eval) if data.eval else None)


OPEN, CLOSE = "«", "»"  # around the supervised spans in --show


def _marked(tokenizer, ids: list[int], supervised: list[bool]) -> str:
    """The decoded ids, each run of supervised tokens between « and », newlines shown as \\n (one line per row)."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or supervised[k] != supervised[start]:
            text = tokenizer.decode(ids[start:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(f"{OPEN}{text}{CLOSE}" if supervised[start] else text)
            start = k
    return "".join(out).replace("\r", "\\r").replace("\n", "\\n")


def show_rows(dataset, kind: str, tokenizer, n: int) -> list[str]:
    """The first ``n`` tokenized rows as training sees them: every token decoded (BOS and end of turn included),
    the supervised ones marked «like this»."""
    lines = []
    for k, row in enumerate(dataset.select(range(min(n, len(dataset))))):
        where = f" ({row['loc']})" if "loc" in row else ""
        if kind in ("dpo", "kto"):
            prompt = _marked(tokenizer, row["prompt_ids"], [False] * len(row["prompt_ids"]))
            label = f" (label {str(row['label']).lower()})" if kind == "kto" else ""
            lines.append(f"[show] row {k + 1}{where}: prompt {len(row['prompt_ids'])} tokens{label}: {prompt}")
            for side in (("chosen", "rejected") if kind == "dpo" else ("completion",)):
                ids = row[f"{side}_ids"]
                lines.append(f"[show]   {side} {len(ids)} tokens: {_marked(tokenizer, ids, [True] * len(ids))}")
        else:
            supervised = [label != -100 for label in row["labels"]] if kind == "sft" else [True] * len(row["labels"])
            lines.append(f"[show] row {k + 1}{where}: {len(row['input_ids'])} tokens, {sum(supervised)} supervised: "
                         f"{_marked(tokenizer, row['input_ids'], supervised)}")
    return lines


def prepare_recipe(recipe: Recipe, log: Callable = print, show: int = 0) -> int:
    """Tokenize every stage's data; one summary line per source (printed by prepare_dataset), then the first ``show``
    rows of each stage's training data (show_rows). Returns 0."""
    started = time.time()
    tokenizer, renderer = data_tokenizer(recipe, log)
    sources = 0
    for i, stage in enumerate(recipe.stages):
        log(f"[prepare] stage {i + 1}/{len(recipe.stages)}: {stage.name} ({stage.stage})")
        data = prepare_stage_data(stage, tokenizer, renderer, log=log)
        sources += 1 + (data.eval is not None)
        if show:
            log(f"[show] stage {stage.name}: the first {show} training rows as tokenized, supervised tokens "
                f"{OPEN}marked{CLOSE}")
            for line in show_rows(data.train.dataset, stage.data_kind, tokenizer, show):
                log(line)
    log(f"[prepare] {sources} source{'' if sources == 1 else 's'} ready in {time.time() - started:.1f} s; "
        "training on this recipe reads them from the cache")
    return 0
