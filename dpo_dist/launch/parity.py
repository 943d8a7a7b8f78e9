"""`dpo-dist parity`: run one seeded recipe under several profiles and prove they learn the same thing.

Each profile trains the recipe (dropout 0, a log line per step) through `dpo-dist launch`. Then, per stage, the
per-step loss, reward margins, KTO's KL baseline and gradient norms, and the final adapter (or model) weights are
compared with the first profile's. A series' difference is relative to its largest magnitude:
max_t |a_t − b_t| / max_t |a_t| (DPO margins start at exactly 0, so a per-step ratio would be undefined). A weight
difference is the relative L2 norm ‖a − b‖ / ‖a‖, the largest over all tensors.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpo_dist.config.preflight import load_checked
from dpo_dist.launch.command import launch
from dpo_dist.config.profiles import load_profile
from dpo_dist.config.recipe import load_recipe
from dpo_dist.config.schema import ConfigError

SERIES = ("loss", "rewards/margins", "kl", "grad_norm")
FP32_TOLERANCE = {"series": 1e-4, "weights": 1e-4}
# bf16 keeps 8 significant bits (rounding 2^-9 ≈ 2e-3 per operation), and sharded backends reduce in another
# order, so per-step numbers differ by a few roundings: 1e-2 for the series. Weights drift further: Adam scales
# every element's step to about the learning rate whatever its gradient's size, so an element whose gradient is
# within bf16 rounding of zero moves by ±lr at random. That bounds the weights at 1e-1 (relative L2). A real
# fault (a rank's gradients never reduced, a wrong global batch, an unscaled loss) moves the loss itself by far
# more than 1e-2. Measured spreads are in docs/profiles.md.
HALF_TOLERANCE = {"series": 1e-2, "weights": 1e-1}


@dataclass
class StageParity:
    stage: str
    steps: list[int]
    series: dict[str, dict[str, list[float]]]  # profile → key → per-step values
    diffs: dict[str, dict[str, float]] = field(default_factory=dict)  # profile → key (incl. "weights") → rel diff


def rel_diff(ref: list[float], other: list[float]) -> float:
    if len(ref) != len(other):
        return math.inf
    scale = max((abs(v) for v in ref), default=0.0)
    worst = max((abs(a - b) for a, b in zip(ref, other)), default=0.0)
    return worst / scale if scale > 0 else worst


def weights_diff(ref_dir: Path, other_dir: Path) -> float:
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{d}: no .safetensors weights")
        out = {}
        for f in files:
            out.update(load_file(f))
        return out

    a, b = load(ref_dir), load(other_dir)
    if a.keys() != b.keys():
        missing = sorted(a.keys() ^ b.keys())[:3]
        raise ValueError(f"{other_dir}: tensor names differ from {ref_dir} (e.g. {missing})")
    worst = 0.0
    for key, ta in a.items():
        ta, tb = ta.double(), b[key].double()
        if ta.shape != tb.shape:
            return math.inf
        scale = ta.norm().item()
        diff = (ta - tb).norm().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def stage_output(stage_dir: Path) -> Path:
    for name in ("adapter", "model"):
        if (stage_dir / name).is_dir():
            return stage_dir / name
    raise FileNotFoundError(f"{stage_dir}: no adapter/ or model/ written")


def compare(out: Path, profiles: list[str], stages: list[str]) -> list[StageParity]:
    from dpo_dist.training.common import read_metrics

    results = []
    for stage in stages:
        series: dict[str, dict[str, list[float]]] = {}
        steps: list[int] = []
        for p in profiles:
            rows = [r for r in read_metrics(out / p / stage) if "loss" in r and "train_runtime" not in r]
            series[p] = {k: [r.get(k, math.nan) for r in rows] for k in SERIES if any(k in r for r in rows)}
            steps = steps or [r["step"] for r in rows]
        sp = StageParity(stage, steps, series)
        ref = profiles[0]
        for p in profiles[1:]:
            sp.diffs[p] = {k: rel_diff(series[ref][k], series[p].get(k, [])) for k in series[ref]}
            sp.diffs[p]["weights"] = weights_diff(stage_output(out / ref / stage), stage_output(out / p / stage))
        results.append(sp)
    return results


def format_report(results: list[StageParity], profiles: list[str], tolerance: dict) -> tuple[str, bool]:
    lines, ok = [], True
    width = max(12, *(len(p) + 2 for p in profiles))
    for sp in results:
        lines.append(f"stage {sp.stage}: loss per step")
        lines.append("step".ljust(6) + "".join(p.rjust(width) for p in profiles))
        for i, step in enumerate(sp.steps):
            lines.append(str(step).ljust(6) + "".join(f"{sp.series[p]['loss'][i]:.7f}".rjust(width) for p in profiles))
        keys = list(next(iter(sp.diffs.values())).keys()) if sp.diffs else []
        lines.append(f"relative difference against {profiles[0]} (tolerance: series {tolerance['series']:g}, "
                     f"weights {tolerance['weights']:g})")
        for key in keys:
            row = ""
            for p in profiles[1:]:
                d = sp.diffs[p][key]
                bad = not d <= tolerance["weights" if key == "weights" else "series"]
                ok = ok and not bad
                row += (f"{d:.2e}" + (" FAIL" if bad else "")).rjust(width)
            lines.append(key.ljust(22) + " " * (width - 16) + row)
        lines.append("")
    lines.append("PARITY OK" if ok else "PARITY FAILED")
    return "\n".join(lines), ok


def parity_overrides(recipe_path: str, out: Path, profile: str, overrides: list[str]) -> list[str]:
    recipe = load_recipe(recipe_path, overrides)
    fixed = [f"output_dir={out / profile}", "method.lora_dropout=0.0"]
    for stage in recipe.stages:
        fixed.append(f"stages.{stage.name}.train.logging_steps=1")
        if stage.method is not None:
            fixed.append(f"stages.{stage.name}.method.lora_dropout=0.0")
    return [*overrides, *fixed]


def default_tolerance(recipe_path: str, profiles: list[str], overrides: list[str]) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    precisions = {load_profile(p).precision or s.train.precision for p in profiles for s in recipe.stages}
    return FP32_TOLERANCE if precisions == {"fp32"} else HALF_TOLERANCE


def run_parity(recipe_path: str, profiles: list[str], out: Path, overrides: list[str] | None = None,
               tolerance: float | None = None, reuse: bool = False) -> tuple[str, bool]:
    """`tolerance` overrides both the series and the weights bound; None = by precision (see above)."""
    overrides = overrides or []
    if len(profiles) < 2:
        raise ConfigError("--profiles: name at least two profiles to compare")
    recipe = load_checked(recipe_path, overrides)  # model, data and keys, before anything trains
    for p in profiles:
        load_profile(p)  # refuse a bad name before anything runs
    tolerance = (default_tolerance(recipe_path, profiles, overrides) if tolerance is None
                 else {"series": tolerance, "weights": tolerance})
    out.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(profiles, 1):
        done = all((out / p / s.name / "summary.json").is_file() for s in recipe.stages)
        if reuse and done:
            print(f"[parity] {i}/{len(profiles)} {p}: reusing {out / p}", flush=True)
            continue
        log = out / f"{p}.log"
        print(f"[parity] {i}/{len(profiles)} {p}: training (log: {log})", flush=True)
        started = time.time()
        rc = launch(recipe_path, p, parity_overrides(recipe_path, out, p, overrides), log_file=log)
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"profile {p} failed (exit {rc}); last lines of {log}:\n{tail}")
        print(f"[parity] {p}: done in {time.time() - started:.0f} s", flush=True)
    results = compare(out, profiles, [s.name for s in recipe.stages])
    report, ok = format_report(results, profiles, tolerance)
    payload = {"profiles": profiles, "tolerance": tolerance, "ok": ok,
               "stages": [{"stage": r.stage, "steps": r.steps, "series": r.series, "diffs": r.diffs} for r in results]}
    (out / "parity.json").write_text(json.dumps(payload, indent=1))
    (out / "parity.txt").write_text(report + "\n")
    return report, ok
