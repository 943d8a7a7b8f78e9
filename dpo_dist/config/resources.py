"""The files dpo-dist ships inside its package: launch profiles (launch/), accelerate and DeepSpeed configs
(configs/accelerate, configs/deepspeed), recipes (configs/recipes) and the sbatch scripts (slurm/).

They are found through the package (importlib.resources), so an installed wheel has them exactly as a clone does; in
a clone, the repository's launch/, configs/ and scripts/slurm are links to them. A user's own file is always passed
by path. A relative path in a recipe or profile resolves against the user's directory first, then the shipped files.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SHIPPED = Path(str(files("dpo_dist") / "resources"))
PROFILES = SHIPPED / "launch"
RECIPES = SHIPPED / "configs" / "recipes"
SLURM = SHIPPED / "slurm"
# The directory that holds the dpo_dist package (a clone's root, or site-packages): the shipped demo recipe names
# its bundled data as dpo_dist/demo/data/*.jsonl.
PACKAGE_PARENT = Path(str(files("dpo_dist"))).parent


def find(value: str | Path, *bases: Path) -> Path:
    """`value` itself when absolute; else the first of `bases`, the working directory, the shipped files and the
    package's parent that holds it; else `value` under the first base (for the error that names it)."""
    path = Path(value)
    if path.is_absolute():
        return path
    roots = [*bases, Path.cwd(), SHIPPED, PACKAGE_PARENT]
    for root in roots:
        if (root / path).exists():
            return root / path
    return roots[0] / path


def shipped_names(folder: Path, suffix: str = ".yaml") -> list[str]:
    return sorted(p.stem for p in folder.glob(f"*{suffix}"))


def recipe_file(name_or_path: str | Path) -> Path:
    """A recipe path, or the name of a shipped recipe (`qwen2.5-7b-sft-dpo-qlora`, with or without .yaml)."""
    path = Path(name_or_path)
    if path.exists() or path.is_absolute():
        return path
    for candidate in (RECIPES / path.name, RECIPES / f"{path.name}.yaml"):
        if path.parent == Path(".") and candidate.is_file():
            return candidate
    found = find(path)
    return found if found.exists() else path
