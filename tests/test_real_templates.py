"""Real chat templates of current model families, end to end, over small local tokenizers that carry each family's
special tokens and its real, public chat-template text (tests/family_tokenizers.py, tests/data/chat_templates/).

For each family: which template training picks and why, the decoded supervised text of a three-turn conversation,
BOS (exactly one where the family has one, none where it has none), DPO prompt truncation, pretraining documents,
and a short SFT → DPO run whose exports stop at the end of turn."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dpo_dist.data import tokenize as tk
from dpo_dist.data.render import Renderer
from tests.helpers import write_jsonl
from tests.family_tokenizers import FAMILIES, FAMILY_FACTS, build_family_model

# What training picks for each family's own tokenizer, with no model.template.
CHOSEN = {"qwen2.5": "tokenizer", "qwen3": "qwen3", "llama3.1": "tokenizer", "gemma2": "tokenizer"}
AFTER_TURN = {"qwen2.5": "\n", "qwen3": "\n", "llama3.1": "", "gemma2": "\n"}  # after the end-of-turn token
ANSWERS = ["It is kind.", "It sleeps in the sun.", "It is calm."]
THREE_TURNS = [m for q, a in zip(["Tell me about the fox.", "Where does it sleep?", "And the owl?"], ANSWERS)
               for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
QUIET = dict(log=lambda *_: None, show_progress=False)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    from transformers import AutoTokenizer

    name = request.param
    path = build_family_model(name, tmp_path_factory.mktemp(name.replace(".", "_")) / "model")
    return name, path, AutoTokenizer.from_pretrained(str(path))


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def supervised_spans(tokenizer, input_ids, labels) -> list[str]:
    spans, current = [], []
    for tok, lab in zip(input_ids, labels):
        if lab != tk.IGNORE:
            current.append(tok)
        elif current:
            spans, current = spans + [decode(tokenizer, current)], []
    return spans + ([decode(tokenizer, current)] if current else [])


def bos_count(tokenizer, ids) -> int:
    return sum(1 for t in ids if tokenizer.bos_token_id is not None and t == tokenizer.bos_token_id)


def test_the_template_choice_and_the_supervised_text_of_three_turns(family):
    name, _, tokenizer = family
    facts = FAMILY_FACTS[name]
    renderer = Renderer(tokenizer)  # no model.template: as a recipe that leaves it unset
    assert renderer.choice.name == CHOSEN[name], renderer.choice
    if name == "qwen3":  # its own template drops earlier turns' think blocks: not prefix-stable
        assert "not prefix-stable" in renderer.choice.warning and "qwen3" in renderer.choice.why
    else:
        assert renderer.choice.warning is None and "prefix-stable" in renderer.choice.why
    assert renderer.eot_token == facts["end_of_turn"]

    out = tk.tokenize_sft({"messages": THREE_TURNS}, tokenizer, renderer, max_length=1024)
    # Each answer, its end-of-turn token and the template's text after it in the turn; nothing else (not Qwen3's
    # think block).
    assert supervised_spans(tokenizer, out["input_ids"], out["labels"]) == [
        a + facts["end_of_turn"] + AFTER_TURN[name] for a in ANSWERS]
    text = decode(tokenizer, out["input_ids"])
    if name == "qwen3":
        # The empty think block is the prompt's, as the family's own template writes it with enable_thinking=False.
        assert text.count("<think>\n\n</think>\n\n") == 3
    else:  # the family's own render, token for token
        assert text == tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)
    if facts["default_system"]:
        assert facts["default_system"] in text
    # BOS: exactly one, first, where the family has one; none where it has none.
    if facts["bos"]:
        assert out["input_ids"][0] == tokenizer.bos_token_id and bos_count(tokenizer, out["input_ids"]) == 1
    else:
        assert tokenizer.bos_token is None or bos_count(tokenizer, out["input_ids"]) == 0


def test_dpo_prompt_truncation_keeps_bos_and_the_generation_header(family):
    name, _, tokenizer = family
    facts = FAMILY_FACTS[name]
    renderer = Renderer(tokenizer)
    short = {"prompt": THREE_TURNS[:1], "chosen": "It is kind.", "rejected": "It is rude."}
    full = tk.tokenize_dpo(short, tokenizer, renderer, max_length=512, max_prompt_length=256)
    own = tokenizer.apply_chat_template(short["prompt"], tokenize=False, add_generation_prompt=True,
                                        **({"enable_thinking": False} if name == "qwen3" else {}))
    assert decode(tokenizer, full["prompt_ids"]) == own  # qwen3: the family's own non-thinking prompt
    # A completion is the span SFT supervises: through the end of turn and the template's text after it.
    assert decode(tokenizer, full["chosen_ids"]) == "It is kind." + facts["end_of_turn"] + AFTER_TURN[name]
    assert decode(tokenizer, full["rejected_ids"]) == "It is rude." + facts["end_of_turn"] + AFTER_TURN[name]

    long = dict(short, prompt=[{"role": "user", "content": " ".join(["Tell me about the fox."] * 30)}])
    cut = tk.tokenize_dpo(long, tokenizer, renderer, max_length=64, max_prompt_length=24)
    assert cut["prompt_truncated"] and len(cut["prompt_ids"]) == 24
    header = tokenizer(generation_prompt(name), add_special_tokens=False)["input_ids"]
    assert cut["prompt_ids"][-len(header):] == header  # the end of the prompt is kept: the assistant header
    if facts["bos"]:
        assert cut["prompt_ids"][0] == tokenizer.bos_token_id and bos_count(tokenizer, cut["prompt_ids"]) == 1
    else:
        assert bos_count(tokenizer, cut["prompt_ids"]) == 0


def generation_prompt(name: str) -> str:
    """The assistant header a prompt ends with (Qwen3's non-thinking one, with its empty think block)."""
    return "<|im_start|>assistant\n<think>\n\n</think>\n\n" if name == "qwen3" else FAMILY_FACTS[name][
        "generation_prompt"]


def test_every_pretraining_document_starts_with_one_bos(family, tmp_path):
    name, _, tokenizer = family
    docs = ["The fox is kind.", "It sleeps in the sun.", "The owl is calm."]
    src = write_jsonl(tmp_path / "text.jsonl", [{"text": d} for d in docs])
    out = tk.prepare_dataset("pretrain", str(src), tokenizer, Renderer(tokenizer), max_length=4096, **QUIET)
    (ids,) = out.dataset["input_ids"]
    assert bos_count(tokenizer, ids) == (len(docs) if FAMILY_FACTS[name]["bos"] else 0)
    if FAMILY_FACTS[name]["bos"]:
        assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.eos_token_id) == len(docs)


def test_a_llama3_tokenizer_without_a_template_gets_llama3_and_its_bos(tmp_path):
    from transformers import AutoTokenizer

    path = build_family_model("llama3.1", tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = None  # a base model's tokenizer
    renderer = Renderer(tokenizer)
    assert renderer.choice.name == "llama3" and "<|start_header_id|>" in renderer.choice.why
    assert renderer.bos == "<|begin_of_text|>" and renderer.eot_token == "<|eot_id|>"
    out = tk.tokenize_sft({"messages": THREE_TURNS[:2]}, tokenizer, renderer, max_length=256)
    assert out["input_ids"][0] == tokenizer.bos_token_id and bos_count(tokenizer, out["input_ids"]) == 1


# ---- a short SFT → DPO run per family; the exports stop at the end of turn ----------------------------------------


def sft_dpo_recipe(base, out, tmp_path, **model):
    from dpo_dist.config.recipe import recipe_from_dict

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversation": [{"human": "Tell me about the fox.",
                                                                   "assistant": "It is kind."}]}] * 8)
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "Describe the owl.", "chosen": "It is calm.",
                                                "rejected": "It is rude."}] * 8)
    return recipe_from_dict({
        "name": "family", "model": {"name_or_path": str(base), **model},
        "method": {"type": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "train": {"learning_rate": 3e-2, "global_batch_size": 4, "max_steps": 2, "logging_steps": 1,
                  "save_steps": 100, "lr_scheduler": "constant"},
        "output_dir": str(out),
        "stages": [{"stage": "sft", "data": {"train": str(sft)}, "max_length": 128,
                    "train": {"max_steps": 40}},
                   {"stage": "dpo", "data": {"train": str(dpo)}, "max_length": 128, "max_prompt_length": 64}]})


@pytest.mark.e2e
def test_sft_then_dpo_on_each_family_and_exports_stop_at_the_end_of_turn(family, tmp_path):
    from dpo_dist.models.export import stop_ids
    from dpo_dist.config.profiles import Profile
    from dpo_dist.training.run import run_recipe

    name, path, tokenizer = family
    profile = Profile(name="test", micro_batch_size=2, precision="fp32")  # auto: Gemma 2 has no sdpa
    sft, dpo = run_recipe(sft_dpo_recipe(path, tmp_path / "run", tmp_path), profile, log=lambda *_: None)
    eot = tokenizer.convert_tokens_to_ids(FAMILY_FACTS[name]["end_of_turn"])
    for stage in (sft, dpo):
        summary = json.loads((stage.run_dir / "summary.json").read_text())
        report = json.loads((stage.run_dir / "data_report.json").read_text())["train"]
        assert summary["template"]["name"] == report["template"]["name"] == CHOSEN[name]
        assert summary["final"]["loss"] == summary["final"]["loss"]  # finite, not NaN
    for export in (sft.output, sft.run_dir / "merged", dpo.output):
        ids = stop_ids(export)
        assert eot in ids and tokenizer.eos_token_id in ids, (export, ids)


def as_llama3_base(path):
    """The Instruct fixture made a Llama 3.2 base, as the hub ships one: EOS <|end_of_text|> in the tokenizer, the
    model config and the generation config, and no chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.eos_token, tokenizer.chat_template = "<|end_of_text|>", None
    tokenizer.save_pretrained(str(path))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**config, "eos_token_id": tokenizer.eos_token_id}))
    return path


def teach(path, text: str, steps: int = 40) -> None:
    """Fit the model at ``path`` to ``text`` (plain torch, no dpo-dist), so that it answers as the test needs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.save_pretrained(str(path))


@pytest.mark.e2e
def test_a_merged_export_stops_at_the_end_of_turn_in_plain_transformers(tmp_path):
    """A Llama 3 base (its configs stop at <|end_of_text|> only) that answers "It is kind.<|eot_id|>" and then runs
    on: after LoRA SFT with the llama3 template, the merged export's own generation config stops at <|eot_id|>, in
    plain transformers with no dpo-dist code in the loop. Its base's config would not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.inference.merge import merge_adapter
    from dpo_dist.config.profiles import Profile
    from dpo_dist.config.recipe import recipe_from_dict
    from dpo_dist.data.templates import get_template
    from dpo_dist.training.run import run_recipe

    base = as_llama3_base(build_family_model("llama3.1", tmp_path / "base", hidden=64))
    chat = [{"role": "user", "content": "Tell me about the fox."}, {"role": "assistant", "content": "It is kind."}]
    teach(base, get_template("llama3").render(chat) + " The owl is calm. The fox is kind.")
    raw = sft_dpo_recipe(base, tmp_path / "run", tmp_path, template="llama3").to_dict()
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["train"] = {"max_steps": 2, "learning_rate": 1e-5}
    profile = Profile(name="test", micro_batch_size=4, precision="fp32", attn_implementation="sdpa")
    (sft,) = run_recipe(recipe_from_dict(raw), profile, log=lambda *_: None)
    merged = merge_adapter(str(base), sft.output, tmp_path / "merged", dtype="fp32", log=lambda *_: None)

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    answers = {}
    for model_dir in (base, merged):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        out = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1]:]
        answers[model_dir] = decode(tokenizer, out.tolist())
    assert answers[base].startswith("It is kind.<|eot_id|> The owl is")  # the base's config runs past the turn
    assert answers[merged] == "It is kind.<|eot_id|>"  # the export's stops at its end


def test_prepare_show_prints_the_rows_as_trained_with_the_supervised_spans_marked(family, tmp_path, capsys):
    from dpo_dist.cli import main

    name, path, tokenizer = family
    facts = FAMILY_FACTS[name]
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversation": [
        {"human": "Tell me about the fox.", "assistant": "It is kind."},
        {"human": "Where does it sleep?", "assistant": "In the sun."}]}])
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "Describe the owl.", "chosen": "It is calm.",
                                                "rejected": "It is rude."}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "name": "show", "model": {"name_or_path": str(path)}, "output_dir": str(tmp_path / "o"),
        "stages": [{"stage": "sft", "data": {"train": str(sft)}, "max_length": 256},
                   {"stage": "dpo", "data": {"train": str(dpo)}, "max_length": 256}]}))
    assert main(["prepare", str(recipe), "--show", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith(f"[data] chat template: {CHOSEN[name]} (") for ln in lines), lines
    (row,) = [ln for ln in lines if ln.startswith(f"[show] row 1 ({sft}:1): ")]
    eot = facts["end_of_turn"]
    tail = AFTER_TURN[name].replace("\n", "\\n")
    assert row.count("«") == 2 and f"«It is kind.{eot}{tail}»" in row and f"«In the sun.{eot}{tail}»" in row
    text = row.split(" supervised: ", 1)[1]
    assert text.startswith(facts["bos"] or "") and text.count(facts["bos"] or "\0") == (1 if facts["bos"] else 0)
    (prompt,) = [ln for ln in lines if ln.startswith(f"[show] row 1 ({dpo}:1): prompt ")]
    assert prompt.endswith(generation_prompt(name).replace("\n", "\\n"))
    assert any(ln.startswith("[show]   chosen ") and ln.endswith(f" tokens: «It is calm.{eot}{tail}»") for ln in lines)


# ---- templates that are not prefix-stable: never a traceback, and validate says what train does -------------------

NOT_PREFIX_STABLE = (  # drops every earlier assistant turn's text: only the last answer survives a new turn
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
    "{% elif loop.last %}<|im_start|>assistant\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MARKED = (  # the same turns, with {% generation %} around each answer and its end of turn
    "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_generation_markers_give_the_masks_for_a_template_of_its_own(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    tokenizer.chat_template = MARKED
    renderer = Renderer(tokenizer)
    assert renderer.choice.name == "tokenizer:generation" and renderer.markers
    out = tk.tokenize_sft({"messages": THREE_TURNS}, tokenizer, renderer, max_length=512)
    assert supervised_spans(tokenizer, out["input_ids"], out["labels"]) == [a + "<|im_end|>" for a in ANSWERS]
    assert decode(tokenizer, out["input_ids"]) == tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)
    dpo = tk.tokenize_dpo({"prompt": THREE_TURNS[:1], "chosen": "Yes.", "rejected": "No."}, tokenizer, renderer,
                          max_length=128, max_prompt_length=64)
    assert decode(tokenizer, dpo["prompt_ids"]) == "<|im_start|>user\nTell me about the fox.<|im_end|>\n" \
                                                  "<|im_start|>assistant\n"
    assert decode(tokenizer, dpo["chosen_ids"]) == "Yes.<|im_end|>"  # trim_blocks eats the newline after the tag


def unstable_recipe(tmp_path, base, name: str) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.chat_template = NOT_PREFIX_STABLE
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    for extra in base.iterdir():  # the model files beside it, so train can load the model
        if not (tmp_path / "tok" / extra.name).exists():
            (tmp_path / "tok" / extra.name).symlink_to(extra)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"conversation": [{"human": "q", "assistant": "a"}] * 2}] * 4)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(json.dumps({
        "name": name, "model": {"name_or_path": str(tmp_path / "tok")}, "output_dir": str(tmp_path / "o"),
        "method": {"type": "lora"}, "train": {"max_steps": 1, "global_batch_size": 2},
        "stages": [{"stage": "sft", "data": {"train": str(sft)}, "max_length": 64}]}))
    return str(recipe)


def test_a_template_of_no_known_family_that_is_not_prefix_stable_gets_one_error_from_validate_and_train(
        tiny_base, tmp_path, capsys, monkeypatch):
    """The tiny base's vocabulary is ChatML's, so its family would be found; a vocabulary of no known family is
    made by hiding it."""
    from dpo_dist.data import templates
    from dpo_dist.cli import main
    from dpo_dist.training.run import main as train_main

    monkeypatch.setattr(templates, "_FAMILIES", ())
    recipe = unstable_recipe(tmp_path, tiny_base, "unstable")
    assert main(["validate", recipe]) == 1
    out = capsys.readouterr()
    (error,) = [ln for ln in out.out.splitlines() if ln.startswith("error: ")]
    assert "not prefix-stable" in error and "set `model.template` to one of: " in error
    assert train_main([recipe]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == error and "Traceback" not in "\n".join(err)


def test_a_template_that_is_not_prefix_stable_falls_back_to_its_family_with_a_warning_in_validate_and_prepare(
        tiny_base, tmp_path, capsys):
    from dpo_dist.cli import main

    recipe = unstable_recipe(tmp_path, tiny_base, "family")
    assert main(["validate", recipe]) == 0
    validated = [ln for ln in capsys.readouterr().out.splitlines() if "chat template" in ln]
    assert main(["prepare", recipe]) == 0
    prepared = [ln for ln in capsys.readouterr().out.splitlines() if "chat template" in ln]
    assert validated == prepared and len(prepared) == 2, prepared
    assert prepared[0].startswith("[data] chat template: qwen (the tokenizer's own chat template is not prefix-stable")
    assert prepared[1].startswith("warning: the tokenizer's own chat template is not prefix-stable")
