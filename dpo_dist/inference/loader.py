"""The one way a trained model is loaded for use: `load_model` (a base, with an optional LoRA adapter on it, frozen
and in eval mode) serves chat, generate, eval, merge and the demo. `load` adds the tokenizer and the renderer that
formats conversations the way training did, for chat and generate, with the sampling flags both commands share."""
from __future__ import annotations

from dataclasses import dataclass

from dpo_dist.models.loading import DTYPES, resolve_base_and_adapter, tokenizer_source
from dpo_dist.config.schema import ConfigError

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Loaded:
    model: object
    tokenizer: object
    renderer: object
    description: str          # "BASE + adapter DIR", for banners and messages
    window: int | None        # max_position_embeddings: prompt + reply must fit in it

    def prompt_text(self, messages: list[dict]) -> str:
        """What the model sees: the conversation rendered up to the assistant's turn, as generate renders it."""
        return self.renderer.render(self.renderer.prepare(messages), add_generation_prompt=True)

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer(self.prompt_text(messages), add_special_tokens=False)["input_ids"])


def add_model_args(p) -> None:
    p.add_argument("model", metavar="MODEL", help="model directory or hub name; or a LoRA adapter directory, whose "
                   "base is then read from its adapter_config.json")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter directory to apply on MODEL")
    p.add_argument("--template", metavar="NAME", help="chat template from the registry (dpo-dist templates); default: "
                   "the tokenizer's own (a trained model's tokenizer carries its training template), else 'default'")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--trust-remote-code", action="store_true", help="run Python code shipped with the model")


def add_sampling_args(p, max_new_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 is greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling mass (default 0.9)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="above 1 discourages repeats (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"longest reply in tokens (default {max_new_tokens})")
    p.add_argument("--seed", type=int, metavar="N", help="seed the sampler, so a run can be repeated")


def check_sampling_args(args) -> dict:
    """The validated sampling flags as keyword arguments of `dpo_dist.inference.scoring.generate`."""
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: must be 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.repetition_penalty <= 0:
        raise ConfigError(f"--repetition-penalty {args.repetition_penalty}: must be above 0 (1.0 is off)")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    return {"temperature": args.temperature, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}


def load_model(base: str, adapter: str | None = None, *, dtype: str = "auto", device: str | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None, what: str = "MODEL",
               merge: bool = False):
    """`base` (a directory or hub name) at `dtype` (auto = the checkpoint's, or fp32 | fp16 | bf16), with the LoRA
    `adapter` applied (merged into the weights when `merge`), frozen and in eval mode. `device`: None leaves it where
    from_pretrained puts it (the CPU), "auto" spreads it over the visible GPUs (else the CPU), any other is moved to.
    A base that cannot be loaded is one ConfigError naming `what` (the flag or argument that gave it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_dist.models.loading import warn_remote_code

    if trust_remote_code:
        warn_remote_code(base)
    kwargs = {"dtype": {**DTYPES, "auto": "auto"}[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device == "auto" and torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as err:  # a missing directory, or a hub name that cannot be fetched
        raise ConfigError(f"{what} {base}: cannot load a model from it: {str(err).splitlines()[0]}") from None
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    if device not in (None, "auto"):
        model.to(device)
    model.requires_grad_(False)
    model.eval()  # a separate statement: test_security's call scan reads `x(...).eval()` as a bare eval()
    return model


def load(args) -> Loaded:
    """The model in eval mode on the GPU when there is one, its tokenizer (from the adapter directory when it holds
    one: training exports it there with the training template) and the renderer."""
    from transformers import AutoTokenizer

    from dpo_dist.data.render import Renderer

    base, adapter = resolve_base_and_adapter(args.model, args.adapter)
    tokenizer_dir = tokenizer_source(base, adapter)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=args.trust_remote_code)
    except OSError as err:  # a missing directory, or a hub name that cannot be fetched
        raise ConfigError(f"{tokenizer_dir}: cannot load the tokenizer: {err}") from None
    if tokenizer.pad_token is None:  # batched prompts need a pad; it is masked out, so eos serves
        tokenizer.pad_token = tokenizer.eos_token
    try:  # before the weights load, so a wrong --template is reported at once
        renderer = Renderer(tokenizer, args.template)
    except ValueError as err:  # an unknown name, or a template whose end-of-turn token this tokenizer lacks
        raise ConfigError(f"--template {args.template}: {err}" if args.template else str(err)) from None
    model = load_model(base, adapter, dtype=args.dtype, device="auto", trust_remote_code=args.trust_remote_code)
    window = getattr(model.config, "max_position_embeddings", None)
    return Loaded(model, tokenizer, renderer, base + (f" + adapter {adapter}" if adapter else ""), window)


def seed_everything(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
