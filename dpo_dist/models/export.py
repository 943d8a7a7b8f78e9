"""What an exported adapter or model needs beyond its weights to behave as it was trained: a generation config that
stops at the template's end of turn.

A model trained with Llama 3's template ends each answer with ``<|eot_id|>``, but its base's generation config stops
at ``<|end_of_text|>`` only, so plain `transformers` generation (or a serving engine reading the config) would run
past the end of the turn. Every export therefore writes ``generation_config.json`` whose ``eos_token_id`` holds the
base's stop ids, the tokenizer's EOS and the end-of-turn token's id.
"""
from __future__ import annotations

import json
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _base_config(base: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(base))
    except (OSError, ValueError):  # a base that ships none: start from its model config
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(base),
                                                                             trust_remote_code=trust_remote_code))


def stop_ids(out: Path) -> list[int]:
    """The eos_token_id list an export's generation_config.json holds (empty when it has none)."""
    path = Path(out) / GENERATION_CONFIG
    return _ids(json.loads(path.read_text()).get("eos_token_id")) if path.is_file() else []


def write_generation_config(out: Path, base: str | Path, tokenizer, eot_token: str | None = None,
                            also: list[int] = (), trust_remote_code: bool = False) -> list[int]:
    """Write ``out/generation_config.json``: the one already there (else the base's), with ``eos_token_id`` = its stop
    ids + the tokenizer's EOS + ``eot_token``'s id + ``also``, in that order, each once. Returns that list."""
    out = Path(out)
    config = _base_config(out if (out / GENERATION_CONFIG).is_file() else base, trust_remote_code)
    ids = _ids(config.eos_token_id) + _ids(tokenizer.eos_token_id) + list(also)
    if eot_token is not None:
        eot = tokenizer.convert_tokens_to_ids(eot_token)
        if eot is not None and eot != tokenizer.unk_token_id:
            ids.append(eot)
    ids = list(dict.fromkeys(ids))
    config.eos_token_id = ids if len(ids) > 1 else ids[0] if ids else None
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(str(out))
    return ids
