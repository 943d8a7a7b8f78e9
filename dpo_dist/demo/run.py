"""`dpo-dist demo`: build a tiny Qwen2, run pretrain → SFT → DPO through the normal recipe path, then evaluate
base / SFT / DPO on held-out pairs and print a table."""
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
        f"stages.dpo.data.train={DATA_DIR / 'dpo.jsonl'}",
    ]


def evaluate_models(out: Path, template: str) -> dict[str, dict]:
    """Held-out preference accuracy and generation score for the base, SFT and DPO models."""
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
        return load_model(str(base), str(out / "dpo" / "adapter") if name == "dpo" else None, dtype="fp32")

    results = {}
    for name in ("base", "sft", "dpo"):
        model = load(name)
        scores = preference_accuracy(model, tokenizer, renderer, rows)
        answers = generate(model, tokenizer, renderer, prompts)
        scores["generation_score"] = sum(map(is_preferred, answers)) / len(answers)
        scores["example"] = answers[0]
        results[name] = scores
    return results


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'model':<6} {'held-out pref. acc.':>20} {'mean logp margin':>17} {'generation score':>17}  example",
             "-" * 100]
    for name, s in results.items():
        lines.append(f"{name:<6} {s['preference_accuracy']:>20.3f} {s['mean_logp_margin']:>17.3f} "
                     f"{s['generation_score']:>17.3f}  {s['example']!r}")
    return "\n".join(lines)


def run_demo(out: Path, overrides: list[str] = (), profile: str = "cpu") -> dict:
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.recipe import load_recipe
    from dpo_dist.training.run import run_recipe

    started = time.time()
    out = Path(out).resolve()
    print(f"[demo] building a tiny Qwen2 and a tokenizer trained on the bundled corpus → {out / 'base'}")
    build_base(out / "base")
    recipe = load_recipe(DEMO_RECIPE, demo_overrides(out) + list(overrides))
    run_recipe(recipe, load_profile(profile))
    print("[demo] evaluating base / SFT / DPO on held-out pairs (none of them in the training data)")
    results = evaluate_models(out, recipe.model.template)
    from dpo_dist.commands.plot import plot_runs

    for stage in recipe.stages:  # one figure per stage: its curves (dpo: rewards and margins too)
        plot_runs([out / stage.name], out / stage.name / "metrics.png", title=f"demo: {stage.name}")
    elapsed = time.time() - started
    table = format_table(results)
    print("\n" + table + f"\n\n[demo] finished in {elapsed:.0f} s; run directories under {out}; training curves in "
          f"{out}/<stage>/metrics.png")
    (out / "demo_results.json").write_text(json.dumps({"results": results, "seconds": round(elapsed, 1)}, indent=1))
    return results
