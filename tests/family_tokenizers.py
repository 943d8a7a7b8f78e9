"""Offline stand-ins for real model families: Qwen2.5-Instruct, Qwen3, Llama-3.1-Instruct and Gemma-2-it.

`build_family_model(family, out)` writes a Hugging Face model directory that `AutoTokenizer.from_pretrained(out)` and
`AutoModelForCausalLM.from_pretrained(out)` load without a network. What is real and what is not:

* real: the chat template (verbatim text in tests/data/chat_templates/, sources in SOURCES.md), the family's special
  tokens and their roles (bos/eos/pad, which ones are special and which are plain added tokens), whether
  `tokenizer(text)` adds BOS and how (a `TemplateProcessing` post-processor, as the real fast tokenizers do), the
  pre-tokenizer split regex of Qwen and Llama-3, the tokenizer class named in tokenizer_config.json (not Gemma's),
  the model class, and the bos/eos/pad ids of config.json and generation_config.json (mapped onto this vocabulary);
* not real: the vocabulary (a byte-level BPE asked for 600 entries, trained on the demo corpus, which saturates at
  ~530; token ids differ from the real ones), the sizes, the weights (random, seeded), and Gemma's tokenizer model
  (SentencePiece BPE in the real one).

Building takes ~0.1 s per family on a CPU (plus the one-off transformers imports) and is deterministic.
"""
from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("qwen2.5", "qwen3", "llama3.1", "gemma2")

TEMPLATES_DIR = Path(__file__).parent / "data" / "chat_templates"

# Pre-tokenizer split patterns of the real tokenizer.json files (Qwen2/2.5/3, and Llama-3 / 3.1).
_QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_LLAMA_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
_GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")

_LLAMA_DATE_BLOCK = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

FAMILY_FACTS: dict[str, dict] = {
    "qwen2.5": {
        "tokenizer_class": "Qwen2Tokenizer",
        "hub_id": "Qwen/Qwen2.5-7B-Instruct",
        "architecture": "Qwen2ForCausalLM",
        "template": "qwen2.5.jinja",
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "unk": None,
        "end_of_turn": "<|im_end|>",
        "generation_prompt": "<|im_start|>assistant\n",
        # inserted as the system turn when the conversation has none
        "default_system": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "system_role": True,
        "special_tokens": _QWEN_SPECIAL,
        # tokenizer_config.json's additional_special_tokens (the real one lists more, for vision/FIM)
        "additional_special_tokens": ("<|im_start|>", "<|im_end|>"),
        "added_non_special": (),
        "adds_bos": False,
        "clean_up_tokenization_spaces": False,
        # real config.json / generation_config.json, as token strings
        "config_bos": "<|endoftext|>",
        "config_eos": "<|im_end|>",
        "config_pad": None,
        "generation_eos": ("<|im_end|>", "<|endoftext|>"),
        "generation_pad": "<|endoftext|>",
        "tie_word_embeddings": False,
    },
    "llama3.1": {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "hub_id": "meta-llama/Llama-3.1-8B-Instruct",
        "architecture": "LlamaForCausalLM",
        "template": "llama3.1.jinja",
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": None,
        "unk": None,
        "end_of_turn": "<|eot_id|>",
        "generation_prompt": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        # the system block always carries this (with the template's default date_string); with no system message it
        # is the whole system turn, with one it is prepended to the message's text
        "default_system": _LLAMA_DATE_BLOCK,
        "system_role": True,
        "special_tokens": _LLAMA_SPECIAL,
        # the real tokenizer_config.json names none: the header/turn tokens are special only in added_tokens_decoder
        "additional_special_tokens": (),
        "added_non_special": (),
        "adds_bos": True,
        "clean_up_tokenization_spaces": True,
        "config_bos": "<|begin_of_text|>",
        "config_eos": ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        "config_pad": None,
        "generation_eos": ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
        "generation_pad": None,
        "tie_word_embeddings": False,
    },
    "gemma2": {
        # GemmaTokenizer would rebuild a SentencePiece-style backend from the vocab: keep the generic class
        "tokenizer_class": None,
        "hub_id": "google/gemma-2-9b-it",
        "architecture": "Gemma2ForCausalLM",
        "template": "gemma2.jinja",
        "bos": "<bos>",
        "eos": "<eos>",
        "pad": "<pad>",
        "unk": "<unk>",
        "end_of_turn": "<end_of_turn>",
        "generation_prompt": "<start_of_turn>model\n",
        "default_system": None,
        # the real template raises 'System role not supported' on a system message
        "system_role": False,
        "special_tokens": _GEMMA_SPECIAL,
        "additional_special_tokens": ("<start_of_turn>", "<end_of_turn>"),
        "added_non_special": (),
        "adds_bos": True,
        "clean_up_tokenization_spaces": False,
        "config_bos": "<bos>",
        "config_eos": "<eos>",
        "config_pad": "<pad>",
        "generation_eos": ("<eos>", "<end_of_turn>"),
        "generation_pad": "<pad>",
        "tie_word_embeddings": True,
    },
}
# Qwen3's tokenizer is Qwen2.5's, with <think> and </think> as plain (special=False) added tokens, as in the real one
# (they survive skip_special_tokens decoding); its template inserts no default system prompt.
FAMILY_FACTS["qwen3"] = {**FAMILY_FACTS["qwen2.5"], "hub_id": "Qwen/Qwen3-8B", "architecture": "Qwen3ForCausalLM",
                         "template": "qwen3.jinja", "default_system": None, "added_non_special": ("<think>", "</think>")}


def chat_template(family: str) -> str:
    """The family's real chat template, exactly as the hub's tokenizer_config.json carries it."""
    return (TEMPLATES_DIR / FAMILY_FACTS[_check(family)]["template"]).read_text(encoding="utf-8")


def _check(family: str) -> str:
    if family not in FAMILY_FACTS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return family


def _pre_tokenizer(family: str):
    from tokenizers import Regex, pre_tokenizers

    if family == "gemma2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    pattern = _LLAMA3_SPLIT if family == "llama3.1" else _QWEN_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def build_family_tokenizer(family: str, vocab_size: int = 600):
    """A small byte-level BPE trained on the demo corpus, carrying the family's real special tokens and roles."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from dpo_dist.demo.build import DATA_DIR, _corpus

    facts = FAMILY_FACTS[_check(family)]
    tok = Tokenizer(models.BPE())
    if family in ("qwen2.5", "qwen3"):
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(family)
    tok.decoder = decoders.ByteLevel()
    # Gemma's control tokens sit at the front of the vocabulary (<pad>=0, <eos>=1, <bos>=2, <unk>=3); everyone else's
    # special tokens come after the learned vocabulary, as in the real files.
    leading = list(_GEMMA_SPECIAL[:4]) if family == "gemma2" else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=leading,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(DATA_DIR), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in facts["special_tokens"]
                            if t not in leading])
    if facts["added_non_special"]:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in facts["added_non_special"]])

    bos = facts["bos"]
    if family == "llama3.1":
        # tokenizer.json of Llama-3.x: Sequence[ByteLevel, TemplateProcessing("<|begin_of_text|> $A")]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))]),
        ])
    elif family == "gemma2":
        tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    kwargs = {}
    if family == "gemma2":
        # tokenizer_config.json of gemma-2-*-it says so; the backend then keeps the BOS post-processor in sync
        kwargs.update(add_bos_token=True, add_eos_token=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=facts["bos"], eos_token=facts["eos"], pad_token=facts["pad"],
        unk_token=facts["unk"], additional_special_tokens=list(facts["additional_special_tokens"]),
        clean_up_tokenization_spaces=facts["clean_up_tokenization_spaces"], **kwargs,
    )
    tokenizer.chat_template = chat_template(family)
    return tokenizer


def _config(family: str, tokenizer, hidden: int, layers: int):
    import transformers

    facts = FAMILY_FACTS[family]

    def ids(tokens):
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return tokenizer.convert_tokens_to_ids(tokens)
        return [tokenizer.convert_tokens_to_ids(t) for t in tokens]

    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
        bos_token_id=ids(facts["config_bos"]), eos_token_id=ids(facts["config_eos"]),
        pad_token_id=ids(facts["config_pad"]), tie_word_embeddings=facts["tie_word_embeddings"],
    )
    if family == "qwen2.5":
        return transformers.Qwen2Config(**common, hidden_act="silu", rms_norm_eps=1e-6,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "qwen3":
        return transformers.Qwen3Config(**common, hidden_act="silu", rms_norm_eps=1e-6,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "llama3.1":
        # the real llama3 rope scaling, except original_max_position_embeddings (8192 there) must stay below this
        # model's 256 positions
        return transformers.LlamaConfig(**common, hidden_act="silu", rms_norm_eps=1e-5, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    return transformers.Gemma2Config(**common, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                                     query_pre_attn_scalar=hidden // 4, sliding_window=4096,
                                     attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def build_family_model(family: str, out: Path, hidden: int = 32, layers: int = 2) -> Path:
    """Write tokenizer (with the real chat template) + a tiny random model of the family's architecture to `out`."""
    import torch
    import transformers
    from transformers import GenerationConfig

    _check(family)
    facts = FAMILY_FACTS[family]
    out = Path(out)
    tokenizer = build_family_tokenizer(family)
    config = _config(family, tokenizer, hidden, layers)
    model_cls = getattr(transformers, facts["architecture"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
    gen = {"bos_token_id": config.bos_token_id,
           "eos_token_id": [tokenizer.convert_tokens_to_ids(t) for t in facts["generation_eos"]]}
    if facts["generation_pad"] is not None:
        gen["pad_token_id"] = tokenizer.convert_tokens_to_ids(facts["generation_pad"])
    if family == "gemma2":
        gen["cache_implementation"] = "hybrid"
    model.generation_config = GenerationConfig(**gen)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if facts["tokenizer_class"]:
        # the class the real tokenizer_config.json names, so loading takes the same code path (it rebuilds the
        # same backend from tokenizer.json's vocab and merges)
        path = out / "tokenizer_config.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved["tokenizer_class"] = facts["tokenizer_class"]
        path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
