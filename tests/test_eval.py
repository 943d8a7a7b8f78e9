"""`dpo-dist eval`: held-out DPO rewards against the right reference, and SFT loss/perplexity, checked against
log-probs computed here by hand from the model's logits and the qwen template written out as text."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_dist.cli import main
from tests.helpers import write_jsonl

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # qwen's default system turn

PAIRS = [
    {"prompt": "Tell me about the deer.", "chosen": "It is kind. It sings at dawn.", "rejected": "It is bitter."},
    {"prompt": "Describe the owl.", "chosen": "It is calm.", "rejected": "It is rude. It eats green leaves."},
    {"prompt": "Say something about the zebra.", "chosen": "It is honest. It runs by the river.",
     "rejected": "It is angry. It runs by the river."},
]
CHATS = [
    {"conversation": [{"human": "Tell me about the shark.", "assistant": "It is selfish. It eats green leaves."},
                      {"human": "Say something about the koala.", "assistant": "It is warm."}]},
    {"conversation": [{"human": "Describe the crow.", "assistant": "It is bitter. It eats green leaves."}]},
]


def user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def answer(text: str) -> str:
    return f"{text}<|im_end|>\n"  # the end-of-turn token is supervised too, and the newline ChatML writes after it


def sum_logp(model, tokenizer, pieces: list[tuple[str, bool]]) -> tuple[float, int]:
    """Summed log-prob of the supervised pieces of one unpadded sequence, and how many tokens they hold."""
    ids, scored = [], []
    for text, supervised in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        scored += [supervised] * len(piece)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    keep = torch.tensor(scored[1:])
    return logp[keep].double().sum().item(), int(keep.sum())


def pair_logps(model, tokenizer, row: dict) -> tuple[float, float]:
    head = SYSTEM + user(row["prompt"])
    return tuple(sum_logp(model, tokenizer, [(head, False), (answer(row[k]), True)])[0] for k in ("chosen", "rejected"))


def save_adapter(base, out, zero: bool):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    # peft's default init leaves lora_B zero (the adapter is a no-op); init_lora_weights=False makes it random.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=zero)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"zero": save_adapter(tiny_base, root / "zero", zero=True),
            "random": save_adapter(tiny_base, root / "random", zero=False)}


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def run_eval(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


def test_adapter_with_zero_lora_b_is_its_own_reference(capsys, tiny_base, adapters, pairs):
    result = run_eval(capsys, tiny_base, "--adapter", adapters["zero"], "--data", pairs, "--template", "qwen")
    m = result["metrics"]
    assert result["reference"] == "base with the adapter disabled" and result["rows"] == 3
    # the adapter adds exact zeros, so policy and reference log-probs are bit-identical
    assert m["reward_margin"] == 0.0 and m["reward_chosen"] == 0.0 and m["reward_rejected"] == 0.0
    assert m["reward_accuracy"] == 0.0  # a tie is not a win (TRL's rewards/accuracies)
    assert m["logp_chosen"] != 0.0


def test_dpo_rewards_match_log_probs_computed_by_hand(capsys, tiny_base, adapters, pairs):
    from peft import PeftModel

    beta = 0.5
    got = run_eval(capsys, tiny_base, "--adapter", adapters["random"], "--data", pairs, "--template", "qwen",
                   "--beta", beta, "--batch-size", 2)  # two batches, the first padded
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ref = [pair_logps(base, tokenizer, row) for row in PAIRS]  # the reference: a plain base, loaded separately
    policy_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapters["random"]).eval()
    policy = [pair_logps(policy_model, tokenizer, row) for row in PAIRS]
    rewards = [(beta * (pc - rc), beta * (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, ref)]
    n = len(PAIRS)
    expected = {
        "reward_accuracy": sum(c > r for c, r in rewards) / n,
        "reward_margin": sum(c - r for c, r in rewards) / n,
        "reward_chosen": sum(c for c, _ in rewards) / n,
        "reward_rejected": sum(r for _, r in rewards) / n,
        "logp_accuracy": sum(c > r for c, r in policy) / n,
        "logp_chosen": sum(c for c, _ in policy) / n,
    }
    assert abs(expected["reward_margin"]) > 1e-2  # the random adapter did move the policy: the check can fail
    for key, value in expected.items():
        assert got["metrics"][key] == pytest.approx(value, abs=1e-5), key
    assert got["adapter"] == str(adapters["random"]) and got["model"] == str(tiny_base) and got["beta"] == beta

    # MODEL may be the adapter directory itself: its base comes from adapter_config.json
    # (same batch size as above: padded batches of another shape round differently in fp32, by ~1e-6 on these sums)
    alone = run_eval(capsys, adapters["random"], "--data", pairs, "--template", "qwen", "--beta", beta,
                     "--batch-size", 2)
    assert alone["model"] == str(tiny_base)
    assert alone["metrics"] == pytest.approx(got["metrics"], abs=1e-6)


def test_unpaired_rows_get_rewards_per_label_and_a_sign_accuracy(capsys, tiny_base, adapters, tmp_path):
    # The unpaired form of PAIRS: each desirable row is a pair's chosen answer, each undesirable one its rejected
    # answer, so every row's log-probs are the pair's, computed by hand as above.
    from peft import PeftModel

    beta = 0.5
    rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in PAIRS for side in ("chosen", "rejected")]
    got = run_eval(capsys, tiny_base, "--adapter", adapters["random"], "--data",
                   write_jsonl(tmp_path / "kto.jsonl", rows), "--template", "qwen", "--beta", beta, "--batch-size", 4)
    assert (got["kind"], got["format"], got["rows"], got["beta"]) == ("kto", "unpaired", 6, beta)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    policy_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapters["random"]).eval()
    policy = [pair_logps(policy_model, tokenizer, row) for row in PAIRS]
    rewards = [(beta * (pc - rc), beta * (pr - rr)) for (pc, pr), (rc, rr) in
               zip(policy, [pair_logps(base, tokenizer, row) for row in PAIRS])]
    n = len(PAIRS)
    expected = {
        "reward_accuracy": sum((c > 0) + (r < 0) for c, r in rewards) / (2 * n),
        "reward_desirable": sum(c for c, _ in rewards) / n,
        "reward_undesirable": sum(r for _, r in rewards) / n,
        "reward_margin": sum(c - r for c, r in rewards) / n,
        "logp_desirable": sum(c for c, _ in policy) / n,
        "logp_undesirable": sum(r for _, r in policy) / n,
    }
    assert 0 < expected["reward_accuracy"] < 1  # the random adapter gets some signs right and some wrong
    assert got["metrics"] == pytest.approx(expected, abs=1e-5)

    # Without a reference (a full model, no --ref) only the policy's log-probs remain, with a note saying why.
    alone = run_eval(capsys, tiny_base, "--data", tmp_path / "kto.jsonl", "--template", "qwen")
    assert set(alone["metrics"]) == {"logp_desirable", "logp_undesirable"} and alone["notes"]


def test_swapping_chosen_and_rejected_flips_margin_and_accuracy(capsys, tiny_base, adapters, pairs, tmp_path):
    swapped = write_jsonl(tmp_path / "swapped.jsonl",
                          [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in PAIRS])
    common = ["--adapter", adapters["random"], "--template", "qwen"]
    a = run_eval(capsys, tiny_base, "--data", pairs, *common)["metrics"]
    b = run_eval(capsys, tiny_base, "--data", swapped, *common)["metrics"]
    assert a["reward_margin"] != 0.0
    assert b["reward_margin"] == pytest.approx(-a["reward_margin"], abs=1e-6)
    assert b["reward_accuracy"] == pytest.approx(1 - a["reward_accuracy"])
    assert (b["reward_chosen"], b["reward_rejected"]) == pytest.approx((a["reward_rejected"], a["reward_chosen"]),
                                                                        abs=1e-6)
    assert b["logp_accuracy"] == pytest.approx(1 - a["logp_accuracy"])


def test_full_model_needs_ref_for_rewards(capsys, tiny_base, pairs):
    itself = run_eval(capsys, tiny_base, "--ref", tiny_base, "--data", pairs, "--template", "qwen")
    assert itself["reference"] == str(tiny_base)
    assert itself["metrics"]["reward_margin"] == 0.0 and itself["metrics"]["reward_chosen"] == 0.0

    # Without --ref (the documented choice): the policy's log-prob metrics only, and a note saying why.
    alone = run_eval(capsys, tiny_base, "--data", pairs, "--template", "qwen")
    assert alone["reference"] is None and not any(k.startswith("reward_") for k in alone["metrics"])
    assert alone["metrics"]["logp_accuracy"] == itself["metrics"]["logp_accuracy"]
    assert "--ref" in alone["notes"][0]


def test_sft_loss_and_perplexity_match_the_token_nll_by_hand(capsys, tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", CHATS)
    got = run_eval(capsys, tiny_base, "--data", data, "--template", "qwen", "--batch-size", 2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    sequences = []
    for row in CHATS:
        pieces, before = [], SYSTEM  # the system turn opens the first unsupervised piece
        for turn in row["conversation"]:
            pieces += [(before + user(turn["human"]), False), (answer(turn["assistant"]), True)]
            before = ""
        sequences.append(pieces)
    scores = [sum_logp(model, tokenizer, pieces) for pieces in sequences]
    tokens = sum(n for _, n in scores)
    loss = -sum(logp for logp, _ in scores) / tokens  # token-weighted across the file, not a mean of row means
    assert got["kind"] == "sft" and got["format"] == "firefly" and got["rows"] == 2
    assert got["metrics"]["scored_tokens"] == tokens
    assert got["metrics"]["loss"] == pytest.approx(loss, abs=1e-5)
    assert got["metrics"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_table_on_stdout_and_json_file_hold_the_same_numbers(capsys, tiny_base, adapters, pairs, tmp_path):
    out = tmp_path / "eval" / "result.json"
    code = main(["eval", str(tiny_base), "--adapter", str(adapters["random"]), "--data", str(pairs),
                 "--template", "qwen", "--max-length", "24", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "scored 3/3 rows" in captured.err
    result = json.loads(out.read_text())
    assert (result["rows"], result["model"], result["adapter"], result["data"], result["beta"]) == (
        3, str(tiny_base), str(adapters["random"]), str(pairs), 0.1)
    assert result["truncated"] == 3 and result["max_prompt_length"] == 12  # 24 tokens cut every response
    table = {line[:30].strip(): line[30:].strip() for line in captured.out.splitlines()}
    assert table["rows truncated"] == "3"
    for label, key in (("reward accuracy", "reward_accuracy"), ("reward margin (mean)", "reward_margin"),
                       ("policy logp accuracy", "logp_accuracy")):
        assert table[label] == f"{result['metrics'][key]:.4f}"


def test_tokenizer_and_template_come_from_the_adapter_directory(capsys, tiny_base, adapters, pairs, tmp_path):
    import shutil

    from dpo_dist.data.templates import get_template

    trained = shutil.copytree(adapters["random"], tmp_path / "trained")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = get_template("qwen").standalone_source()  # what training exports
    tokenizer.save_pretrained(trained)
    own = run_eval(capsys, tiny_base, "--adapter", trained, "--data", pairs)
    named = run_eval(capsys, tiny_base, "--adapter", trained, "--data", pairs, "--template", "qwen")
    default = run_eval(capsys, tiny_base, "--adapter", trained, "--data", pairs, "--template", "default")
    assert own["template"] == "tokenizer" and own["metrics"] == named["metrics"]
    assert default["metrics"]["logp_chosen"] != named["metrics"]["logp_chosen"]


def test_bad_rows_and_bad_arguments_are_errors_that_name_them(capsys, tiny_base, adapters, pairs, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], '{"prompt": "x", "chosen": ', PAIRS[1]])
    cases = [
        (["--data", bad], f"{bad}:2: row: invalid JSON"),
        (["--data", tmp_path / "missing.jsonl"], f"{tmp_path / 'missing.jsonl'}: no such file"),
        (["--data", pairs, "--adapter", tmp_path], "--adapter"),
        (["--data", pairs, "--adapter", adapters["zero"], "--ref", tiny_base], "--ref"),
        (["--data", pairs, "--template", "qwne"], "Did you mean 'qwen'"),
        (["--data", pairs, "--format", "sft"], "pairs.jsonl:1: row: unknown format"),
        (["--data", pairs, "--max-prompt-length", "2000"], "--max-prompt-length 2000"),
    ]
    for argv, message in cases:
        assert main(["eval", str(tiny_base), *map(str, argv)]) == 2, argv
        err = capsys.readouterr().err
        assert "error: " in err and message in err, (argv, err[-500:])

    skipped = run_eval(capsys, tiny_base, "--data", bad, "--on-bad-row", "skip", "--template", "qwen")
    assert skipped["rows"] == 2 and len(skipped["skipped"]) == 1 and skipped["skipped"][0].startswith(f"{bad}:2:")
