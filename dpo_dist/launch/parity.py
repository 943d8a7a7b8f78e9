"""`dpo-dist parity`: run one seeded recipe under several profiles and prove they learn the same thing.

Each profile trains the recipe (dropout 0, a log line per step) through `dpo-dist launch`. Then, per stage, the
per-step loss, reward margins, KTO's KL baseline and gradient norms, and the final adapter (or model) weights are
compared with the first profile's (the reference).

- Stages in isolation. The reference runs the recipe as written, each stage from the one before. Every other profile
  trains stage k from the reference's stage k−1 result (stages.K.start_from), so the differences a stage shows are
  its own and not the sum of the stages before it. `chained=True` also trains every other profile from its own
  results and reports that propagation separately, for information.
- The horizon. Training amplifies any difference step by step, the last-bit differences of another reduction order
  included, so a per-step bound holds only for so many steps. Up to `horizon` steps every series is compared per step
  (tolerance "series") and, for a stage no longer than that, the weights too ("weights"). Beyond it, a stage is
  judged by its mean loss over the last FINAL_WINDOW steps ("final"); its weights and last steps' other series are
  reported, not judged. `steps` stops every stage after that many steps (train.stop_at_step: the schedule stays
  the recipe's). `drift=True` trains the reference once more with its micro-batch halved and its gradient
  accumulation doubled (the same rows in the same steps, summed in another order): what that twin differs by is the
  floor no profile can go below, and is reported beside them. docs/profiles.md has the measurements behind the
  defaults.

A series' difference is relative to its largest magnitude: max_t |a_t − b_t| / max_t |a_t| (DPO margins start at
exactly 0, so a per-step ratio would be undefined). A weight difference is the relative L2 norm ‖a − b‖ / ‖a‖, the
largest over all tensors, matched by name; a tied copy one export holds and the other does not (lm_head.weight of a
model with tied embeddings) is compared as the tensor it is tied to.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dpo_dist.config.preflight import load_checked
from dpo_dist.config.profiles import load_profile
from dpo_dist.config.recipe import load_recipe
from dpo_dist.config.schema import ConfigError
from dpo_dist.launch.command import launch

SERIES = ("loss", "rewards/margins", "kl", "grad_norm")
# Per-step comparisons cover this many steps of a stage. On the demo recipe in fp32, the 196-step full pretraining
# (lr 5e-3) keeps loss and grad_norm within 1e-4 of `cpu` up to step 26 under cpu-zero3-2, 29 under cpu-ddp-2 and
# cpu-fsdp-2, and 32 for the reduction-order twin (docs/profiles.md). Its LoRA SFT (114 steps) and DPO (38) keep
# the loss within it to the end, and SFT's grad_norm to step 58 (cpu-zero3-2).
HORIZON = 20
FINAL_WINDOW = 10  # beyond the horizon, a stage's loss is compared as its mean over the last this many steps
FP32_TOLERANCE = {"series": 1e-4, "weights": 1e-4, "final": 2e-2}
# bf16 keeps 8 significant bits (rounding 2^-9 ≈ 2e-3 per operation), and sharded backends reduce in another
# order, so per-step numbers differ by a few roundings: 1e-2 for the series. Weights drift further: Adam scales
# every element's step to about the learning rate whatever its gradient's size, so an element whose gradient is
# within bf16 rounding of zero moves by ±lr at random. That bounds the weights at 1e-1 (relative L2). A real
# fault (a rank's gradients never reduced, a wrong global batch, an unscaled loss) moves the loss itself by far
# more than 1e-2. Measured spreads are in docs/profiles.md.
HALF_TOLERANCE = {"series": 1e-2, "weights": 1e-1, "final": 2e-2}


@dataclass
class StageParity:
    stage: str
    steps: list[int]
    series: dict[str, dict[str, list[float]]]  # profile → key → per-step values
    horizon: int = 0  # steps compared per step; a longer stage is judged by its final mean loss
    diffs: dict[str, dict[str, float]] = field(default_factory=dict)  # profile → key (incl. "weights") → rel diff
    notes: dict[str, list[str]] = field(default_factory=dict)  # profile → why a comparison could not be made
    chained: dict[str, dict[str, float]] = field(default_factory=dict)  # profile → key → rel diff, chained runs
    drift: dict[str, float] = field(default_factory=dict)  # key → rel diff of the reference's reduction-order twin


class ParityError(Exception):
    """A comparison that cannot be made (no weights, tensor names that do not match); reported, never raised out."""


def label(profile: str) -> str:
    """A profile's directory name under --out: its name, or a profile file's stem."""
    return Path(profile).stem if profile.endswith((".yaml", ".yml")) or "/" in profile else profile


def rel_diff(ref: list[float], other: list[float]) -> float:
    if len(ref) != len(other):
        return math.inf
    scale = max((abs(v) for v in ref), default=0.0)
    worst = max((abs(a - b) for a, b in zip(ref, other)), default=0.0)
    return worst / scale if scale > 0 else worst


def final_diff(ref: list[float], other: list[float], window: int = FINAL_WINDOW) -> float:
    """The difference of the means over the last `window` steps, relative to the reference's mean."""
    if not ref or len(ref) != len(other):
        return math.inf
    a, b = (sum(v[-window:]) / len(v[-window:]) for v in (ref, other))
    return abs(a - b) / abs(a) if a else abs(a - b)


def load_weights(d: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(d).glob("*.safetensors"))
    if not files:
        raise ParityError(f"{d}: no .safetensors weights")
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def _untie(names: set, tensors: dict) -> dict:
    """Each tensor among `names` only (the names both exports hold) maps to itself; a name only this export holds
    maps to a shared name whose tensor it equals exactly (a tied copy), else it stays unmatched."""
    import torch

    matched = {}
    for key in sorted(tensors.keys() - names):
        t = tensors[key]
        twin = next((n for n in sorted(names) if tensors[n].shape == t.shape and torch.equal(tensors[n], t)), None)
        if twin is not None:
            matched[key] = twin
    return matched


def weights_diff(ref_dir: Path, other_dir: Path) -> float:
    """The largest relative L2 difference over the tensors, matched by name. Raises ParityError (one line) when
    the two cannot be compared: no weights, or names that differ beyond tied copies."""
    a, b = load_weights(ref_dir), load_weights(other_dir)
    shared = a.keys() & b.keys()
    tied_a, tied_b = _untie(shared, a), _untie(shared, b)
    only_a = sorted(a.keys() - shared - tied_a.keys())
    only_b = sorted(b.keys() - shared - tied_b.keys())
    if only_a or only_b:
        raise ParityError(f"{other_dir}: tensor names differ from {ref_dir}: only in the reference "
                          f"{only_a[:3] or 'none'}, only here {only_b[:3] or 'none'}")
    pairs = [(k, a[k], b[k]) for k in sorted(shared)]
    pairs += [(k, a[k], b[twin]) for k, twin in tied_a.items()]  # the reference's copy against what it is tied to
    pairs += [(k, a[twin], b[k]) for k, twin in tied_b.items()]
    worst = 0.0
    for key, ta, tb in pairs:
        if ta.shape != tb.shape:
            raise ParityError(f"{other_dir}: {key} has shape {tuple(tb.shape)}, the reference's {tuple(ta.shape)}")
        ta, tb = ta.double(), tb.double()
        scale = ta.norm().item()
        diff = (ta - tb).norm().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def stage_output(stage_dir: Path) -> Path:
    for name in ("adapter", "model"):
        if (stage_dir / name).is_dir():
            return stage_dir / name
    raise ParityError(f"{stage_dir}: no adapter/ or model/ written")


def read_series(stage_dir: Path) -> dict[str, list[float]] | None:
    from dpo_dist.training.common import read_metrics

    if not (stage_dir / "metrics.jsonl").is_file():
        return None
    rows = [r for r in read_metrics(stage_dir) if "loss" in r and "train_runtime" not in r]
    series = {k: [r.get(k, math.nan) for r in rows] for k in SERIES if any(k in r for r in rows)}
    series["step"] = [r["step"] for r in rows]
    return series


def stage_diffs(ref_dir: Path, other_dir: Path, ref: dict, horizon: int) -> tuple[dict[str, float], str | None]:
    """Per-step differences over the first `horizon` steps, and, for a longer stage, those of the final means
    ("final KEY"); then the weights. A run that cannot be compared gets inf and the reason."""
    other = read_series(other_dir)
    if other is None:
        return {k: math.inf for k in ref if k != "step"} | {"weights": math.inf}, f"{other_dir}: no metrics.jsonl"
    if other["step"] != ref["step"]:
        return ({k: math.inf for k in ref if k != "step"} | {"weights": math.inf},
                f"{other_dir}: logged steps {other['step'][:3]}… differ from the reference's {ref['step'][:3]}…")
    diffs = {}
    long = len(ref["step"]) > horizon
    for key, values in ref.items():
        if key == "step":
            continue
        if horizon:
            diffs[key] = rel_diff(values[:horizon], other.get(key, [])[:horizon])
        if long:
            diffs[f"final {key}"] = final_diff(values, other.get(key, []))
    note = None
    try:
        diffs["weights"] = weights_diff(stage_output(ref_dir), stage_output(other_dir))
    except ParityError as err:
        diffs["weights"], note = math.inf, str(err)
    return diffs, note


def compare(out: Path, profiles: list[str], stages: list[str], horizon: int = HORIZON, chained: bool = False,
            drift: str | None = None) -> list[StageParity]:
    """`out/LABEL/STAGE` per profile (the isolated runs), `out/chained/LABEL/STAGE` when `chained`, and
    `out/drift/DRIFT/STAGE` for the reference's reduction-order twin named `drift`."""
    results = []
    ref = label(profiles[0])
    for stage in stages:
        ref_series = read_series(out / ref / stage)
        if ref_series is None:
            raise ParityError(f"{out / ref / stage}: the reference has no metrics.jsonl")
        series = {ref: {k: v for k, v in ref_series.items() if k != "step"}}
        sp = StageParity(stage, ref_series["step"], series, horizon=min(horizon, len(ref_series["step"])))
        for p in map(label, profiles[1:]):
            sp.diffs[p], note = stage_diffs(out / ref / stage, out / p / stage, ref_series, horizon)
            sp.notes[p] = [note] if note else []
            other = read_series(out / p / stage)
            series[p] = {k: v for k, v in (other or {}).items() if k != "step"}
            if chained:
                sp.chained[p], note = stage_diffs(out / ref / stage, out / "chained" / p / stage, ref_series, 0)
                if note:
                    sp.notes[p].append(f"chained: {note}")
        if drift:
            sp.drift, _ = stage_diffs(out / ref / stage, out / "drift" / drift / stage, ref_series, horizon)
        results.append(sp)
    return results


def _bound(key: str, tolerance: dict, long: bool) -> float | None:
    """The bound `key` is judged at, or None for a difference reported for information only: beyond the horizon
    only the final loss is judged (the weights and the other series of two runs of another reduction order end
    far apart there, docs/profiles.md)."""
    if key == "final loss":
        return tolerance["final"]
    if key.startswith("final ") or (key == "weights" and long):
        return None
    return tolerance["weights"] if key == "weights" else tolerance["series"]


def format_report(results: list[StageParity], profiles: list[str], tolerance: dict) -> tuple[str, bool]:
    labels = [label(p) for p in profiles]
    lines, ok = [], True
    width = max(12, *(len(p) + 2 for p in labels))
    for sp in results:
        long = len(sp.steps) > sp.horizon
        window = (f"per step over steps 1–{sp.steps[sp.horizon - 1]} (the horizon), then by the mean loss of "
                  f"steps {sp.steps[-min(FINAL_WINDOW, len(sp.steps))]}–{sp.steps[-1]}" if long
                  else f"per step over all {len(sp.steps)} logged steps")
        lines.append(f"stage {sp.stage}: loss per step, compared {window}")
        lines.append("step".ljust(6) + "".join(p.rjust(width) for p in labels))
        shown = list(range(sp.horizon)) + ([len(sp.steps) - 1] if long else [])
        for i in shown:
            if long and i == len(sp.steps) - 1:
                lines.append("…")
            cells = [sp.series[p].get("loss", [])[i] if i < len(sp.series[p].get("loss", [])) else math.nan
                     for p in labels]
            lines.append(str(sp.steps[i]).ljust(6) + "".join(f"{c:.7f}".rjust(width) for c in cells))
        keys = list(next(iter(sp.diffs.values())).keys()) if sp.diffs else []
        lines.append(f"relative difference against {labels[0]} (tolerance: per step {tolerance['series']:g}, "
                     + (f"mean loss of the last {FINAL_WINDOW} steps {tolerance['final']:g}; info = not judged)"
                        if long else f"weights {tolerance['weights']:g})")
                     + ("; drift = the reference's reduction-order twin, for scale" if sp.drift else ""))
        lines.append("".ljust(22) + "".join(p.rjust(width) for p in labels[1:])
                     + ("drift".rjust(width) if sp.drift else ""))
        for key in keys:
            row = ""
            for p in labels[1:]:
                d = sp.diffs[p].get(key, math.inf)
                bound = _bound(key, tolerance, long)
                bad = bound is not None and not d <= bound
                ok = ok and not bad
                row += (f"{d:.2e}" + (" FAIL" if bad else "" if bound is not None else " info")).rjust(width)
            if sp.drift:
                row += f"{sp.drift.get(key, math.nan):.2e}".rjust(width)
            lines.append(key.ljust(22) + row)
        for p in labels[1:]:
            lines.extend(f"  {p}: {note}" for note in sp.notes.get(p, []))
        if sp.chained:
            lines.append("chained: each profile from its own previous stage (for information, not judged)")
            for key in ("final loss" if "final loss" in next(iter(sp.chained.values())) else "loss", "weights"):
                lines.append(key.ljust(22) + "".join(f"{sp.chained[p].get(key, math.inf):.2e}".rjust(width)
                                                     for p in labels[1:]))
        lines.append("")
    lines.append("PARITY OK" if ok else "PARITY FAILED")
    return "\n".join(lines), ok


def parity_overrides(recipe_path: str, out_dir: Path, overrides: list[str], starts: dict[str, str] | None = None,
                     steps: int | None = None) -> list[str]:
    """Every stage logged each step, LoRA dropout off, `starts` (stage → model directory) as start_from, and
    `steps` as stop_at_step."""
    recipe = load_recipe(recipe_path, overrides)
    fixed = [f"output_dir={out_dir}", "method.lora_dropout=0.0"]
    for stage in recipe.stages:
        fixed.append(f"stages.{stage.name}.train.logging_steps=1")
        if stage.method is not None:
            fixed.append(f"stages.{stage.name}.method.lora_dropout=0.0")
        if steps:
            fixed.append(f"stages.{stage.name}.train.stop_at_step={steps}")
        if starts and stage.name in starts:
            fixed.append(f"stages.{stage.name}.start_from={starts[stage.name]}")
    return [*overrides, *fixed]


def default_tolerance(recipe_path: str, profiles: list[str], overrides: list[str]) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    precisions = {load_profile(p).precision or s.train.precision for p in profiles for s in recipe.stages}
    return dict(FP32_TOLERANCE if precisions == {"fp32"} else HALF_TOLERANCE)


def reordered_profile(profile: str, out: Path) -> str:
    """The reference profile with its micro-batch halved (so gradient accumulation doubles): a file under
    out/drift. Refused for a micro-batch of 1."""
    p = load_profile(profile)
    if p.micro_batch_size % 2:
        raise ConfigError(f"--drift: {profile} has micro_batch_size {p.micro_batch_size}, which cannot be halved; "
                          "put a profile with an even micro-batch first")
    settings = yaml.safe_load(Path(p.source).read_text()) or {}
    settings["micro_batch_size"] = p.micro_batch_size // 2
    settings["description"] = f"{p.name} with micro-batch {p.micro_batch_size // 2} (parity --drift)"
    for key in ("accelerate_config", "deepspeed_config"):
        if getattr(p, key):
            settings[key] = str(p.path_of(key))
    path = out / "drift" / f"{label(profile)}-reordered.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return str(path)


def _finished(run_dir: Path, stages) -> bool:
    return all((run_dir / s.name / "summary.json").is_file() for s in stages)


def _train(recipe_path: str, profile: str, run_dir: Path, overrides: list[str], reuse: bool, stages, what: str,
           **kw) -> None:
    if reuse and _finished(run_dir, stages):
        print(f"[parity] {what}: reusing {run_dir}", flush=True)
        return
    log = run_dir.parent / f"{run_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[parity] {what}: training (log: {log})", flush=True)
    started = time.time()
    rc = launch(recipe_path, profile, parity_overrides(recipe_path, run_dir, overrides, **kw), log_file=log)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ParityError(f"profile {profile} failed (exit {rc}); last lines of {log}:\n{tail}")
    print(f"[parity] {what}: done in {time.time() - started:.0f} s", flush=True)


def run_parity(recipe_path: str, profiles: list[str], out: Path, overrides: list[str] | None = None,
               tolerance: float | None = None, reuse: bool = False, steps: int | None = None,
               horizon: int = HORIZON, final_tolerance: float | None = None, chained: bool = False,
               drift: bool = False) -> tuple[str, bool]:
    """`tolerance` overrides the per-step series and weights bounds, `final_tolerance` the final mean loss's; None =
    by precision (see above). Raises ParityError when a profile fails to train."""
    overrides = overrides or []
    if len(profiles) < 2:
        raise ConfigError("--profiles: name at least two profiles to compare")
    if len(set(map(label, profiles))) < len(profiles):
        raise ConfigError(f"--profiles: {','.join(profiles)} names a profile twice (or two files of one name)")
    if steps is not None and steps <= 0:
        raise ConfigError(f"--steps: must be positive, got {steps}")
    if horizon <= 0:
        raise ConfigError(f"--horizon: must be positive, got {horizon}")
    recipe = load_checked(recipe_path, overrides)  # model, data and keys, before anything trains
    for p in profiles:
        load_profile(p)  # refuse a bad name before anything runs
    bounds = default_tolerance(recipe_path, profiles, overrides)
    if tolerance is not None:
        bounds.update(series=tolerance, weights=tolerance)
    if final_tolerance is not None:
        bounds["final"] = final_tolerance
    twin = reordered_profile(profiles[0], out) if drift else None
    out.mkdir(parents=True, exist_ok=True)
    ref, n = profiles[0], len(profiles)
    _train(recipe_path, ref, out / label(ref), overrides, reuse, recipe.stages, f"1/{n} {ref} (reference)",
           steps=steps)
    # Stage k of every other run starts where the reference's stage k−1 ended
    starts = {}
    if recipe.chain:
        for prev, cur in zip(recipe.stages, recipe.stages[1:]):
            starts[cur.name] = json.loads((out / label(ref) / prev.name / "summary.json").read_text())["model_path"]
    for i, p in enumerate(profiles[1:], 2):
        _train(recipe_path, p, out / label(p), overrides, reuse, recipe.stages, f"{i}/{n} {p}", starts=starts,
               steps=steps)
    if chained and recipe.chain and len(recipe.stages) > 1:
        for p in profiles[1:]:
            _train(recipe_path, p, out / "chained" / label(p), overrides, reuse, recipe.stages, f"{p} chained",
                   steps=steps)
    if twin:
        _train(recipe_path, twin, out / "drift" / label(twin), overrides, reuse, recipe.stages,
               f"{ref} reduction-order twin", starts=starts, steps=steps)
    results = compare(out, profiles, [s.name for s in recipe.stages], horizon, chained=chained and recipe.chain,
                      drift=label(twin) if twin else None)
    report, ok = format_report(results, profiles, bounds)
    payload = {"profiles": profiles, "tolerance": bounds, "horizon": horizon, "steps": steps, "ok": ok,
               "stages": [{"stage": r.stage, "steps": r.steps, "horizon": r.horizon, "series": r.series,
                           "diffs": r.diffs, "notes": r.notes, "chained": r.chained, "drift": r.drift}
                          for r in results]}
    (out / "parity.json").write_text(json.dumps(payload, indent=1))
    (out / "parity.txt").write_text(report + "\n")
    return report, ok
