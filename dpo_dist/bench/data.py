"""`dpo-dist bench`: the fixed workload both sides train on.

Everything here is deterministic in the seed and offline: the tokenizer is the demo's byte-level BPE trained on the
bundled corpus (dpo_dist.demo.build.train_tokenizer), the model a randomly initialised Qwen2, and the rows random
words from that corpus with token lengths drawn from a chosen distribution.

Lengths are drawn in *content tokens* (the message text alone, before the chat template adds its system prompt and
turn markers). Each word is written with a leading space, so with the byte-level pre-tokenizer a word's tokens do
not depend on its neighbours and a text's token count is the sum of its words' counts: rows hit their drawn length
exactly.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TEMPLATE = "qwen"  # both sides render with it: dpo-dist by name, TRL through tokenizer.chat_template


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    max_length: int  # DPO: prompt + response; SFT: the whole conversation
    prompt_median: int  # content tokens
    response_median: int
    prompt_cap: int  # content tokens (lowered further to keep every rendered prompt under max_length / 2)


# `small` is sized so the whole default DPO bench (6 side-runs + the logits micro-benchmark) stays well under 10
# minutes on the 2-core CPU dev machine (a DPO step at micro-batch 4 takes well under a second); `tiny` is for tests.
SIZES = {
    "tiny": ModelSize(hidden=32, layers=2, heads=4, kv_heads=2, max_length=128, prompt_median=16,
                      response_median=24, prompt_cap=40),
    "small": ModelSize(hidden=64, layers=2, heads=4, kv_heads=2, max_length=192, prompt_median=22,
                       response_median=34, prompt_cap=60),
}

# Long-tailed lengths like UltraFeedback's: log-normal prompt and response lengths (chosen and rejected drawn
# independently). Padding chosen + rejected to the batch maximum in random order then wastes about 40% of the tokens
# at micro-batch 4 (UltraFeedback with a Qwen2.5 tokenizer: 45%; the cap at max_length and the template's fixed
# tokens trim the spread a little). The JSON reports the padding each side measured.
PROMPT_SIGMA = 1.0
RESPONSE_SIGMA = 0.95
UNIFORM_JITTER = 0.05  # uniform: every length within ±5% of the median


def build_tokenizer():
    from dpo_dist.demo.build import train_tokenizer
    from dpo_dist.data.templates import get_template

    tokenizer = train_tokenizer()
    # The baseline user's TRL run renders conversations with the tokenizer's template: make it dpo-dist's qwen
    # template, default system prompt included, so both sides train on the same text.
    tokenizer.chat_template = get_template(TEMPLATE).standalone_source()
    return tokenizer


def build_model_dir(out: Path, size: str, seed: int, max_positions: int = 0) -> Path:
    """Tokenizer + random-weight Qwen2 of the given size, saved like any Hugging Face model directory."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = SIZES[size]
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.hidden * 3,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(256, spec.max_length, max_positions), tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _word_pool(tokenizer) -> dict[int, list[str]]:
    """Corpus words grouped by how many tokens ' word' takes."""
    from dpo_dist.demo.build import DATA_DIR, _corpus

    words = sorted({w for text in _corpus(DATA_DIR) for w in re.findall(r"[A-Za-z]+", text)})
    pool: dict[int, list[str]] = {}
    for word in words:
        pool.setdefault(len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]), []).append(word)
    if 1 not in pool:
        raise RuntimeError("no single-token word in the demo corpus; cannot build texts of exact token lengths")
    return pool


def _text(rng: np.random.Generator, pool: dict[int, list[str]], n_tokens: int) -> str:
    sizes = sorted(pool)
    words, left = [], n_tokens
    while left > 0:
        fitting = [s for s in sizes if s <= left]
        size = fitting[int(rng.integers(len(fitting)))]
        choices = pool[size]
        words.append(choices[int(rng.integers(len(choices)))])
        left -= size
    return "".join(" " + w for w in words)


def template_overhead(tokenizer) -> tuple[int, int]:
    """Tokens the chat template adds around a prompt (system prompt, turn markers) and around a response."""
    from dpo_dist.data.render import Renderer

    renderer = Renderer(tokenizer, TEMPLATE)
    prompt, (completion,) = renderer.prompt_and_completions(renderer.prepare([{"role": "user", "content": ""}]), [""])
    return tuple(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (prompt, completion))


def draw_lengths(lengths: str, size: str, n: int, seed: int, overhead: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) content-token lengths for n rows.

    Capped so that no row is truncated by either side: the rendered prompt stays under dpo-dist's default prompt
    budget (max_length / 2) and prompt + response under max_length, so both sides train on every token."""
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    prompt_cap = min(spec.prompt_cap, spec.max_length // 2 - overhead[0] - 1)
    rows = []
    for _ in range(n):
        if lengths == "uniform":
            p, c, r = (int(round(m * rng.uniform(1 - UNIFORM_JITTER, 1 + UNIFORM_JITTER)))
                       for m in (spec.prompt_median, spec.response_median, spec.response_median))
        elif lengths == "realistic":
            p = int(np.clip(rng.lognormal(math.log(spec.prompt_median), PROMPT_SIGMA), 2, prompt_cap))
            budget = spec.max_length - p - sum(overhead)
            c, r = (int(np.clip(rng.lognormal(math.log(spec.response_median), RESPONSE_SIGMA), 2, budget))
                    for _ in range(2))
        else:
            raise ValueError(f"lengths must be realistic or uniform, got {lengths!r}")
        rows.append((p, c, r))
    return rows


def synth_rows(tokenizer, lengths: str, size: str, n: int, seed: int) -> list[dict]:
    """n rows of {prompt, chosen, rejected} plain text (content only; the template is applied by each side)."""
    pool = _word_pool(tokenizer)
    rng = np.random.default_rng(seed + 1)
    return [{"prompt": _text(rng, pool, p), "chosen": _text(rng, pool, c), "rejected": _text(rng, pool, r)}
            for p, c, r in draw_lengths(lengths, size, n, seed, template_overhead(tokenizer))]


def write_data(out: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows in the shape each side reads.

    - dpo_pair.jsonl / sft_openai.jsonl: dpo-dist's `pair` and `openai` formats (side B);
    - dpo_conv.jsonl / sft_conv.jsonl: TRL's conversational preference and prompt-completion rows (side A).
    """
    out.mkdir(parents=True, exist_ok=True)

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    files = {
        "dpo_b": [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows],
        "dpo_a": [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]),
                   "rejected": assistant(r["rejected"])} for r in rows],
        "sft_b": [{"messages": user(r["prompt"]) + assistant(r["chosen"])} for r in rows],
        "sft_a": [{"prompt": user(r["prompt"]), "completion": assistant(r["chosen"])} for r in rows],
    }
    paths = {}
    for key, items in files.items():
        path = out / f"{key}.jsonl"
        path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
        paths[key] = path
    return paths


def describe_lengths(lengths: str, size: str) -> dict:
    spec = SIZES[size]
    out = {"distribution": lengths, "model_size": size, **asdict(spec)}
    if lengths == "realistic":
        out.update(prompt_sigma=PROMPT_SIGMA, response_sigma=RESPONSE_SIGMA)
    else:
        out.update(jitter=UNIFORM_JITTER)
    return out
