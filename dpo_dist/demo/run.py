"""`dpo-dist demo`: build a tiny Qwen2, run pretrain → SFT → a preference stage (DPO by default; `--preference`
picks KTO, ORPO, CPO or any DPO loss) through the normal recipe path, then evaluate base / SFT / that method on
held-out pairs and print a table."""
from __future__ import annotations

import json
import time
from pathlib import Path

from dpo_dist.demo.build import DATA_DIR, build_base
from dpo_dist.demo.synth import is_preferred

from dpo_dist.config.resources import RECIPES

DEMO_RECIPE = RECIPES / "demo.yaml"


def demo_overrides(out: Path) -> list[str]:
    return [
        f"model.name_or_path={out / 'base'}",
        f"output_dir={out}",
        f"stages.pretrain.data.train={DATA_DIR / 'pretrain.jsonl'}",
        f"stages.sft.data.train={DATA_DIR / 'sft.jsonl'}",
    ]


# The keys of demo.yaml's dpo stage that belong to DPO only; the other methods drop them.
_DPO_ONLY = ("loss_type", "sft_weight")
# Per-method settings of that stage. ORPO adds its odds-ratio term to an NLL over prompt and answer: at λ = 0.1 and
# DPO's learning rate, this tiny model's held-out preference accuracy stays at SFT's (docs/methods.md, measured).
_SETTINGS = {"orpo": {"beta": 1.0, "learning_rate": 2.0e-3}}


def preference_methods() -> list[str]:
    """What `--preference` takes: the stages kto, orpo and cpo, and every DPO loss (dpo = demo.yaml as written)."""
    from dpo_dist.config.recipe import DPO_LOSSES

    return ["dpo", "kto", "orpo", "cpo", *DPO_LOSSES]


def stage_name(method: str) -> str:
    """The preference stage's name, run directory and row in the table: the method, or dpo-LOSS for a DPO loss (a
    stage named sft would clash with the SFT stage)."""
    return method if method in ("dpo", "kto", "orpo", "cpo") else f"dpo-{method}"


def demo_recipe(out: Path, method: str = "dpo") -> Path:
    """demo.yaml with its preference stage trained by ``method``, written to OUT/recipe.yaml (the file the run used).
    KTO reads the unpaired form of the same pairs: each chosen answer labelled desirable, each rejected one not."""
    import yaml

    if method not in preference_methods():
        from dpo_dist.config.schema import ConfigError

        raise ConfigError(f"--preference {method}: not a method; choose one of {', '.join(preference_methods())}")
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    (stage,) = [s for s in recipe["stages"] if s["stage"] == "dpo"]
    data = DATA_DIR / "dpo.jsonl"
    if method in ("kto", "orpo", "cpo"):
        for key in _DPO_ONLY:
            stage.pop(key, None)
        stage["stage"] = method
        settings = dict(_SETTINGS.get(method, {}))
        if "learning_rate" in settings:
            stage["train"] = {**stage.get("train", {}), "learning_rate": settings.pop("learning_rate")}
        stage.update(settings)
        if method == "kto":
            data = out / "kto.jsonl"
            pairs = [json.loads(line) for line in (DATA_DIR / "dpo.jsonl").read_text().splitlines() if line.strip()]
            data.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"})
                                    + "\n" for p in pairs for side in ("chosen", "rejected")))
    elif method != "dpo":
        stage["loss_type"] = method
        if method in ("sft", "simpo"):  # sft is the NLL term itself; simpo adds none
            stage.pop("sft_weight", None)
    stage["name"] = stage_name(method)
    stage["data"] = {**stage["data"], "train": str(data), **({"format": "unpaired"} if method == "kto" else {})}
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def evaluate_models(out: Path, template: str, method: str = "dpo") -> dict[str, dict]:
    """Held-out preference accuracy and generation score for the base, SFT and preference-trained models."""
    from transformers import AutoTokenizer

    from dpo_dist.data.formats import read_source
    from dpo_dist.data.render import Renderer
    from dpo_dist.inference.loader import load_model
    from dpo_dist.inference.scoring import generate, preference_accuracy

    rows = read_source(str(DATA_DIR / "heldout.jsonl"), "dpo", fmt="pair").rows
    prompts = [r["prompt"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    renderer = Renderer(tokenizer, template)

    def load(name):
        base = out / "pretrain" / "model" if name == "base" else out / "sft" / "merged"
        return load_model(str(base), str(out / method / "adapter") if name == method else None, dtype="fp32")

    results = {}
    for name in ("base", "sft", method):
        model = load(name)
        scores = preference_accuracy(model, tokenizer, renderer, rows)
        answers = generate(model, tokenizer, renderer, prompts)
        scores["generation_score"] = sum(map(is_preferred, answers)) / len(answers)
        scores["example"] = answers[0]
        results[name] = scores
    return results


def format_table(results: dict[str, dict]) -> str:
    width = max(6, *map(len, results))
    lines = [f"{'model':<{width}} {'held-out pref. acc.':>20} {'mean logp margin':>17} {'generation score':>17}  "
             "example", "-" * (94 + width)]
    for name, s in results.items():
        lines.append(f"{name:<{width}} {s['preference_accuracy']:>20.3f} {s['mean_logp_margin']:>17.3f} "
                     f"{s['generation_score']:>17.3f}  {s['example']!r}")
    return "\n".join(lines)


def run_demo(out: Path, overrides: list[str] = (), profile: str = "cpu", method: str = "dpo",
             resume: bool = False) -> dict:
    """`resume`: the stages that finished in `out` are kept (their base too), the others resume from their latest
    checkpoint or start: an interrupted demo, or another preference method after a finished demo."""
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.recipe import load_recipe
    from dpo_dist.training.run import run_recipe

    started = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = demo_recipe(out, method)  # an unknown method is refused before anything is built
    method = stage_name(method)
    if resume and (out / "base" / "config.json").is_file():
        print(f"[demo] resuming in {out}: keeping its base model and the stages that finished")
    else:
        print(f"[demo] building a tiny Qwen2 and a tokenizer trained on the bundled corpus → {out / 'base'}")
        build_base(out / "base")
    recipe = load_recipe(path, demo_overrides(out) + list(overrides))
    run_recipe(recipe, load_profile(profile), resume=resume)
    print(f"[demo] evaluating base / SFT / {method} on held-out pairs (none of them in the training data)")
    results = evaluate_models(out, recipe.model.template, method)
    from dpo_dist.commands.plot import plot_runs

    for stage in recipe.stages:  # one figure per stage: its curves (dpo: rewards and margins too)
        plot_runs([out / stage.name], out / stage.name / "metrics.png", title=f"demo: {stage.name}")
    elapsed = time.time() - started
    table = format_table(results)
    print("\n" + table + f"\n\n[demo] finished in {elapsed:.0f} s; run directories under {out}; training curves in "
          f"{out}/<stage>/metrics.png")
    (out / "demo_results.json").write_text(json.dumps({"results": results, "method": method,
                                                       "seconds": round(elapsed, 1)}, indent=1))
    return results
