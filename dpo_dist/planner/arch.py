"""Model architectures for `dpo-dist plan`: presets, config.json parsing, and parameter counts from the shapes.

Totals are computed from the architecture (embeddings, q/k/v/o with grouped-query heads, gate/up/down or MoE experts,
norms, biases, lm_head unless tied), never stored. The counts follow how transformers 5 builds each model, which
tests/test_plan.py checks against real tiny models, and LoRA counts follow peft's `all-linear` targeting (what a
recipe's `target_modules: null` means), checked against real peft models.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpo_dist.config.schema import ConfigError

PRESETS_FILE = Path(__file__).with_name("presets.yaml")
# config.json may omit tie_word_embeddings when it equals the config class's default; these are those defaults.
# Anything not listed falls back to transformers' PretrainedConfig default (tied).
UNTIED_BY_DEFAULT = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3"}
ALWAYS_QKV_BIAS = {"qwen2"}  # Qwen2's q/k/v projections always carry biases; its config.json has no key for it
DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts")
NAME_SUFFIXES = ("-instruct", "-chat", "-it", "-hf", "-base")


@dataclass(frozen=True)
class Arch:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    num_experts: int = 0  # 0 = a dense MLP
    experts_per_token: int = 0
    model_type: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each nn.Linear in one decoder layer: the modules bitsandbytes quantizes."""
        h, i = self.hidden_size, self.intermediate_size
        out = {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
               "o_proj": (self.q_dim, h)}
        if not self.num_experts:
            out.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        return out

    def counts(self) -> dict[str, int]:
        """Parameters by kind, for the whole model."""
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        linear = L * sum(a * b for a, b in self.linears().values())
        biases = L * (self.q_dim + 2 * self.kv_dim if self.attention_bias else 0)
        if self.mlp_bias and not self.num_experts:
            biases += L * (2 * i + h)
        # transformers 5 stores a Mixtral layer's experts as two fused 3-D tensors (gate_up and down), not as
        # nn.Linear modules, and its router as a plain weight: bitsandbytes quantizes neither.
        experts = L * self.num_experts * 3 * h * i
        router = L * self.num_experts * h
        embed = self.vocab_size * h
        return {
            "embedding": embed,
            "lm_head": 0 if self.tie_word_embeddings else embed,
            "linear": linear,
            "experts": experts,
            "router": router,
            "norms": (2 * L + 1) * h,
            "biases": biases,
        }

    def total_params(self) -> int:
        return sum(self.counts().values())

    def layer_params(self) -> int:
        c = self.counts()
        return (c["linear"] + c["experts"] + c["router"] + c["biases"] + 2 * self.num_layers * self.hidden_size) \
            // self.num_layers

    def lora_params(self, r: int, targets: list[str] | None = None) -> int:
        """Trainable LoRA parameters: r × (in + out) per targeted linear, as peft builds them."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_experts
        per_layer = 0
        for name in self.lora_targets(targets):
            if name in self.linears():
                a, b = self.linears()[name]
                per_layer += r * (a + b)
            elif name == "gate":  # the MoE router
                per_layer += r * (h + e)
            elif name == "experts":
                # peft wraps the fused expert tensors with one adapter per expert; gate_up fuses two projections,
                # so peft gives it rank 2r over (h → 2i).
                per_layer += e * (2 * r * (h + 2 * i) + r * (i + h))
        return self.num_layers * per_layer

    def lora_targets(self, targets: list[str] | None) -> list[str]:
        known = MOE_TARGETS if self.num_experts else DENSE_TARGETS
        if targets is None:
            return list(known)
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise ConfigError(f"method.target_modules: {unknown[0]!r} is not a linear layer of {self.name} "
                              f"(known: {', '.join(known)})")
        return list(targets)


def _get(cfg: dict, key: str, where: str, default=None):
    value = cfg.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: {key}: required key is missing")
    if not isinstance(value, (int, bool)) or value < 0:
        raise ConfigError(f"{where}: {key}: expected a non-negative integer, got {value!r}")
    return value


def arch_from_config(cfg: dict, name: str, where: str) -> Arch:
    """An Arch from a config.json-shaped mapping (a preset or a model's own config.json)."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in cfg:  # multimodal wrappers keep the LM under text_config
        cfg = {**text, "model_type": text.get("model_type", cfg.get("model_type", ""))}
    model_type = str(cfg.get("model_type", ""))
    heads = _get(cfg, "num_attention_heads", where)
    hidden = _get(cfg, "hidden_size", where)
    if heads == 0:
        raise ConfigError(f"{where}: num_attention_heads: must be positive")
    experts = cfg.get("num_local_experts") or 0
    if not experts and cfg.get("num_experts"):
        raise ConfigError(f"{where}: num_experts: the MoE layout of model_type {model_type!r} (shared experts, "
                          "moe_intermediate_size) is not modelled; Mixtral-style num_local_experts is")
    default_tie = model_type not in UNTIED_BY_DEFAULT
    return Arch(
        name=name,
        vocab_size=_get(cfg, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_get(cfg, "intermediate_size", where),
        num_layers=_get(cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", where, heads),
        head_dim=_get(cfg, "head_dim", where) if cfg.get("head_dim") else hidden // heads,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", default_tie)),
        attention_bias=bool(cfg.get("attention_bias", model_type in ALWAYS_QKV_BIAS)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        num_experts=int(experts),
        experts_per_token=int(cfg.get("num_experts_per_tok") or (2 if experts else 0)),
        model_type=model_type,
    )


def load_presets() -> dict[str, dict]:
    data = yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"{PRESETS_FILE}: expected a mapping of preset names")
    return data


def preset_names() -> list[str]:
    return list(load_presets())


def _normalized(name: str) -> str:
    return name.strip().lower().rsplit("/", 1)[-1]


def find_preset(name: str) -> str | None:
    """The preset whose name, source or alias matches `name` (case-insensitive; a Hub id or its last part;
    -Instruct/-Chat/-it/-hf/-base variants share their base's architecture)."""
    wanted = _normalized(name)
    candidates = [wanted] + [wanted[: -len(s)] for s in NAME_SUFFIXES if wanted.endswith(s)]
    for preset, spec in load_presets().items():
        names = {_normalized(preset), _normalized(spec.get("source", ""))}
        names |= {_normalized(a) for a in spec.get("aliases", [])}
        if names & set(candidates):
            return preset
    return None


def preset_arch(name: str) -> Arch:
    preset = find_preset(name)
    if preset is None:
        names = preset_names()
        match = difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=1, cutoff=0.5)
        hint = next((n for n in names if match and n.lower() == match[0]), None)
        raise ConfigError(f"--model: {name!r} is not a preset, a config.json or a recipe"
                          + (f"; did you mean {hint!r}?" if hint else "") + f" (presets: {', '.join(names)})")
    return arch_from_config(load_presets()[preset], preset, f"{PRESETS_FILE.name}: {preset}")


def config_arch(path: Path) -> Arch:
    """An Arch from a config.json file or a model directory that holds one."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--model: {file}: file not found" + (" (the directory has no config.json)"
                                                                   if path.is_dir() else ""))
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return arch_from_config(cfg, file.parent.name if file.name == "config.json" else file.stem, str(file))


def fmt_count(n: float) -> str:
    """68977950720 → '68.98e9': parameter counts as they appear in the printed arithmetic."""
    for exp in (12, 9, 6, 3):
        if abs(n) >= 10 ** exp:
            return f"{n / 10 ** exp:.2f}e{exp}"
    return f"{n:.0f}"
