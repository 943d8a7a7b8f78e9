"""`dpo-dist plot RUN_DIR [RUN_DIR ...] [--out FILE.png] [--smooth N]`: training curves from metrics.jsonl.

A RUN_DIR is a stage's run directory (it holds metrics.jsonl) or a recipe's output directory (each stage below it is
one run). Several runs are overlaid, one colour each, for comparison. Panels appear only for metrics some run logged:
loss, preference accuracy, reward margin, chosen vs rejected rewards, KTO's KL estimate, ORPO's log odds ratio, the
ORPO/CPO NLL term, learning rate, throughput. `--smooth N` draws the mean
over the last N optimizer steps over the faint raw curve (not for the learning rate, which is a schedule).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dpo_dist.config.schema import ConfigError

# (title, y label, [(metric key, line style, legend suffix)], smoothed on request)
PANELS = [
    ("Loss", "loss", [("loss", "-", "")], True),
    ("Preference accuracy", "fraction of pairs (chosen > rejected)", [("rewards/accuracies", "-", "")], True),
    ("Reward margin", "β·(log-ratio chosen − rejected)", [("rewards/margins", "-", "")], True),
    ("Rewards: chosen vs rejected", "β·log-ratio to the reference",
     [("rewards/chosen", "-", " chosen"), ("rewards/rejected", "--", " rejected")], True),
    ("KL estimate (kto)", "KL(policy ‖ reference), mismatched pairs", [("kl", "-", "")], True),
    ("Log odds ratio (orpo)", "log σ(log odds chosen − rejected)", [("log_odds_ratio", "-", "")], True),
    ("NLL term (orpo, cpo)", "NLL of the chosen response", [("nll_loss", "-", "")], True),
    ("Learning rate", "learning rate", [("learning_rate", "-", "")], False),  # a schedule, not noise
    ("Throughput", "real tokens / s", [("tokens_per_s", "-", "")], True),
]


@dataclass
class Run:
    label: str
    rows: list[dict]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], float(r[key])) for r in self.rows
                  if key in r and "step" in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in points], [p[1] for p in points]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Stage run directories: each path itself when it holds metrics.jsonl, else its subdirectories that do."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            found.append(path)
            continue
        below = sorted((p.parent for p in path.glob("*/metrics.jsonl")), key=lambda p: (p / "metrics.jsonl").stat().st_mtime)
        if not below:
            raise ConfigError(f"{path}: no metrics.jsonl in it or in its subdirectories; give a run directory "
                              "(runs/<recipe>/<stage>) or a recipe's output directory")
        found.extend(below)
    return found


def read_run(path: Path, label: str) -> Run:
    rows = []
    for lineno, line in enumerate((path / "metrics.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path / 'metrics.jsonl'}:{lineno}: invalid JSON: {err.msg}") from None
    return Run(label, rows)


def moving_average(steps: list[int], values: list[float], window: int) -> list[float]:
    """At each point, the mean of the values logged in the last `window` steps (step - window, step]; a window is in
    optimizer steps whatever logging_steps is."""
    out, start, total = [], 0, 0.0
    for i, (step, value) in enumerate(zip(steps, values)):
        total += value
        while steps[start] <= step - window:
            total -= values[start]
            start += 1
        out.append(total / (i + 1 - start))
    return out


def _labels(runs: list[Path]) -> list[str]:
    names = [p.name for p in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" for p in runs]


def plot_runs(paths: list[str | Path], out: str | Path | None = None, smooth: int = 0,
              title: str | None = None) -> dict:
    """Draw the panels for the runs under `paths` into a PNG. Returns what was drawn: the file, the panel titles and
    per panel the plotted series (after smoothing), so callers and tests can check it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    if smooth < 0:
        raise ConfigError(f"--smooth {smooth}: must be 0 (off) or a window of steps")
    dirs = find_runs(paths)
    runs = [read_run(d, label) for d, label in zip(dirs, _labels(dirs))]
    panels = [p for p in PANELS if any(run.series(key)[0] for run in runs for key, _, _ in p[2])]
    if not panels:
        raise ConfigError(f"{', '.join(map(str, dirs))}: metrics.jsonl holds no plottable metrics yet")
    out = Path(out) if out else (dirs[0] / "metrics.png" if len(dirs) == 1 else Path("comparison.png"))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn: dict[str, dict[str, list[float]]] = {}
    for ax, (name, ylabel, keys, smoothable) in zip(axes.flat, panels):
        smoothed = smooth > 1 and smoothable
        drawn[name] = {}
        for i, run in enumerate(runs):
            colour = colours[i % len(colours)]
            for key, style, suffix in keys:
                steps, values = run.series(key)
                if not steps:
                    continue
                label = f"{run.label}{suffix}" if len(runs) > 1 or suffix else None
                if smoothed:
                    ax.plot(steps, values, style, color=colour, alpha=0.25, linewidth=1)
                    values = moving_average(steps, values, smooth)
                ax.plot(steps, values, style, color=colour, linewidth=1.6, label=label)
                drawn[name][f"{run.label}{suffix}"] = values
        ax.set_title(name + (f" (mean over {smooth} steps)" if smoothed else ""), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title or " vs ".join(run.label for run in runs))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"out": out, "panels": [p[0] for p in panels], "runs": [r.label for r in runs], "series": drawn}


def run(args) -> int:
    result = plot_runs(args.run_dirs, args.out, smooth=args.smooth, title=args.title)
    print(f"wrote {result['out']}: {', '.join(result['panels'])} for {', '.join(result['runs'])}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="training curves (loss, rewards, learning rate, tokens/s) of one or more runs as PNG")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a stage run directory (holds metrics.jsonl) or a recipe output directory")
    p.add_argument("--out", help="PNG file (default: RUN_DIR/metrics.png for one run, ./comparison.png for several)")
    p.add_argument("--smooth", type=int, default=0, metavar="N", help="mean over the last N optimizer steps (default off)")
    p.add_argument("--title")
    p.set_defaults(func=run)
