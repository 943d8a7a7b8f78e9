"""`dpo-dist init [DIR] [--recipe NAME] [--profile NAME]`: copy a shipped recipe and launch profile (with the
accelerate or DeepSpeed file it names) into DIR for editing.

DIR gets the shipped layout, so the copies point at each other as the shipped files do:
DIR/configs/recipes/NAME.yaml, DIR/launch/PROFILE.yaml, DIR/configs/accelerate/*.yaml, DIR/configs/deepspeed/*.json.
A profile's relative paths resolve against DIR first (dpo_dist.config.profiles), so the edited copies are the ones
used. An existing file is never overwritten without --force.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from dpo_dist.config.schema import ConfigError

DEFAULT_RECIPE = "qwen2.5-7b-sft-dpo-qlora"
DEFAULT_PROFILE = "1gpu-bf16"


def files_to_copy(recipe: str, profile_name: str) -> list[tuple[Path, Path]]:
    """(shipped file, path relative to DIR) for the recipe, the profile and the backend files the profile names."""
    from dpo_dist.config.profiles import load_profile, profile_names
    from dpo_dist.config.resources import PROFILES, RECIPES, SHIPPED, shipped_names

    source = RECIPES / f"{recipe.removesuffix('.yaml')}.yaml"
    if not source.is_file():
        raise ConfigError(f"--recipe {recipe}: no such shipped recipe; shipped: {', '.join(shipped_names(RECIPES))}")
    if not (PROFILES / f"{profile_name.removesuffix('.yaml')}.yaml").is_file():
        raise ConfigError(f"--profile {profile_name}: no such shipped profile; shipped: {', '.join(profile_names())}")
    profile = load_profile(profile_name.removesuffix(".yaml"))
    pairs = [(source, source.relative_to(SHIPPED)), (Path(profile.source), Path(profile.source).relative_to(SHIPPED))]
    for key in ("accelerate_config", "deepspeed_config"):
        if getattr(profile, key):
            path = profile.path_of(key)
            pairs.append((path, path.relative_to(SHIPPED)))
    ds = profile.deepspeed_file()
    if ds is not None and profile.accelerate_config:  # the ZeRO JSON an accelerate file names
        pairs.append((ds, ds.relative_to(SHIPPED)))
    return pairs


def init(out: Path, recipe: str = DEFAULT_RECIPE, profile: str = DEFAULT_PROFILE, force: bool = False) -> list[Path]:
    pairs = files_to_copy(recipe, profile)
    existing = [out / rel for _, rel in pairs if (out / rel).exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} exists; pass --force to overwrite "
                          f"{'it' if len(existing) == 1 else f'these {len(existing)} files'}, or another DIR")
    written = []
    for src, rel in pairs:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
        written.append(out / rel)
    return written


def run(args) -> int:
    out = Path(args.dir)
    written = init(out, args.recipe, args.profile, args.force)
    for path in written:
        print(f"[init] wrote {path}")
    recipe, profile = written[0], written[1]
    print(f"[init] edit {recipe} (model, data), then:\n"
          f"  dpo-dist validate {recipe}\n"
          f"  dpo-dist launch {recipe} --profile {profile}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("init", help="copy a shipped recipe and launch profile (and its accelerate/DeepSpeed file) "
                       "into a directory for editing")
    p.add_argument("dir", nargs="?", default=".", help="where to write them (default: the working directory)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"shipped recipe name (default {DEFAULT_RECIPE}; "
                   "`dpo-dist profiles --recipes` lists them)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help=f"shipped profile name (default {DEFAULT_PROFILE}; "
                   "`dpo-dist profiles` lists them)")
    p.add_argument("--force", action="store_true", help="overwrite files that exist")
    p.set_defaults(func=run)
