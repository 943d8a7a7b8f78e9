"""`dpo-dist merge` on one process: merged logits equal base + adapter, QLoRA adapters merge into 16-bit weights,
the output is sharded safetensors with the training chat template. Merging from FSDP and ZeRO-3 sharded
checkpoints is tested with real ranks in tests/test_distributed.py."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dpo_dist.cli import main
from dpo_dist.data.templates import get_template

IDS = torch.arange(3, 35).reshape(2, 16)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float()


def save_adapter(model, tiny_base: Path, out: Path) -> Path:
    """A LoRA adapter with random B (a fresh one is a no-op), exported with the tokenizer as training does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = get_template("qwen").standalone_source()
    tokenizer.save_pretrained(out)
    return out


def test_merged_logits_equal_base_plus_adapter_sharded_with_template(tiny_base, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = save_adapter(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_base, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_base), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32",
                 "--max-shard-size", "10KB"]) == 0
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and f"{len(shards)} safetensors shards" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {shards_name for shards_name in index["weight_map"].values()} == {p.name for p in shards}
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    base_logits = logits(base)
    with_adapter = PeftModel.from_pretrained(base, adapter)
    assert torch.allclose(logits(merged), logits(with_adapter), atol=1e-5)
    assert not torch.allclose(logits(merged), base_logits, atol=1e-3)  # the adapter did change the model

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == get_template("qwen").standalone_source()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\n"


def test_qlora_adapter_merges_into_bf16_never_4bit(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=nf4, dtype=torch.bfloat16)
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    adapter = save_adapter(quantized, tiny_base, tmp_path / "qlora-adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_base), "--adapter", str(adapter), "--out", str(out)]) == 0

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    # The update was added to the 16-bit weights: the merged model matches the bf16 base with the adapter applied
    # (up to bf16 rounding of the sum), not the 4-bit one.
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16),
                                          adapter)
    got, want = logits(merged), logits(reference)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_a_quantized_base_or_a_non_adapter_is_refused(tiny_base, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    stored_4bit = tmp_path / "base-4bit"
    AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=nf4).save_pretrained(stored_4bit)
    adapter = save_adapter(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_base, tmp_path / "adapter")
    capsys.readouterr()
    assert main(["merge", "--base", str(stored_4bit), "--adapter", str(adapter), "--out", str(tmp_path / "o")]) == 2
    assert "stored quantized (bitsandbytes)" in capsys.readouterr().err
    for bad, says in ((tiny_base, "not a LoRA adapter"), (tmp_path / "missing", "no such directory")):
        assert main(["merge", "--base", str(tiny_base), "--adapter", str(bad), "--out", str(tmp_path / "o")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
