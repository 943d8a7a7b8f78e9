"""The checks every command makes before any work: the recipe's model and data exist, by the same rules and with the
same one-line errors, whichever command reads the recipe (train, launch, parity, slurm, validate, prepare, plan,
doctor) or takes a model (merge, eval, chat, generate).

A model is a local directory or a Hugging Face name. A name that cannot be a hub repo id (it starts with / ./ ../ ~,
has more than one slash, or its first part is a local directory) must exist here. A hub name that is neither in the
local Hugging Face cache nor reachable (offline, HF_HUB_OFFLINE) is refused at once, instead of after a minute of
download retries and a traceback; one the hub says does not exist is refused too.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from dpo_dist.config.schema import ConfigError

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # what a hub repo id looks like (not a path)
_HUB_VERDICTS: dict[str, str | None] = {}  # one answer per name and process


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or None when it can (a TCP connect, bounded in time,
    so an offline machine is told at once instead of waiting through download retries)."""
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[str] = []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            result.append("")
        except OSError as err:
            result.append(f"{endpoint} is unreachable ({err.__class__.__name__})")

    worker = threading.Thread(target=connect, daemon=True)  # name resolution has no timeout of its own
    worker.start()
    worker.join(timeout + 1)
    return (result[0] or None) if result else f"{endpoint} did not answer within {timeout:.0f} s"


def looks_local(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or not HUB_NAME.fullmatch(name)
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def _cached(name: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except Exception:  # not a valid repo id for the cache
        return False


def _hub_verdict(name: str) -> str | None:
    """Why the hub cannot give `name` (unreachable, or no such model), or None when it can or cannot tell."""
    if name not in _HUB_VERDICTS:
        why = hub_unreachable()
        if why is None:
            try:
                from huggingface_hub import model_info
                from huggingface_hub.errors import RepositoryNotFoundError

                try:
                    model_info(name, timeout=10)
                except RepositoryNotFoundError:
                    why = "the Hugging Face hub has no model by that name (a private one needs `hf auth login`)"
            except Exception:  # a gated model, a slow hub, an old client: loading will say
                why = None
        _HUB_VERDICTS[name] = why
    return _HUB_VERDICTS[name]


def check_model(name: str, key: str, revision: str | None = None) -> None:
    """Refuse a model (or tokenizer) source that loading would fail on, naming the recipe key or option `key`."""
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json",
                                                                    "tokenizer_config.json")):
            raise ConfigError(f"{key}: {name} is a directory without config.json: give the model's directory (the one "
                              "holding config.json and the weights)")
        return
    if looks_local(name):
        raise ConfigError(f"{key}: {name} does not exist; give an existing model directory or a Hugging Face model "
                          "name such as Qwen/Qwen2.5-7B")
    if _cached(name, revision):
        return
    why = _hub_verdict(name)
    if why:
        raise ConfigError(f"{key}: {name} is not a local directory nor in the Hugging Face cache, and {why}; give an "
                          "existing model directory, or download it first (hf download NAME) where the hub is "
                          "reachable")


def check_start(path: str, key: str) -> None:
    """A stage's start_from: a full model directory on this machine (an adapter would need its base)."""
    d = Path(path).expanduser()
    if not (d / "config.json").is_file():
        what = ("holds a LoRA adapter, not a model" if (d / "adapter_config.json").is_file()
                else "has no config.json" if d.is_dir() else "does not exist")
        raise ConfigError(f"{key}: {path} {what}; give a full model directory, such as an earlier run's "
                          "<stage>/model or <stage>/merged (`dpo-dist merge` makes one from an adapter)")


def check_data(recipe) -> None:
    """Every stage's data.train and data.eval can be opened (no rows are read), and its train.sample_prompts file
    holds good prompts (a few lines: all are read)."""
    from dpo_dist.data.formats import DataError, check_source
    from dpo_dist.data.prompts import read_prompt_file

    for stage in recipe.stages:
        prompts = stage.train.sample_prompts
        if prompts:
            where = f"stages.{stage.name}.train.sample_prompts"
            if not Path(prompts).is_file():
                raise ConfigError(f"{where}: {prompts}: no such file")
            try:
                read_prompt_file(prompts)
            except DataError as err:
                raise ConfigError(f"{where}: {err}") from None
        for key in ("train", "eval"):
            source = getattr(stage.data, key)
            if source:
                try:
                    check_source(source, stage.data_kind, stage.data.split)
                except DataError as err:
                    raise ConfigError(f"stages.{stage.name}.data.{key}: {err}") from None


def check_recipe(recipe, data: bool = True) -> None:
    """What every command that reads a recipe checks before any work: its model and tokenizer, then (unless `data`
    is off: a dry run previews a command for a machine where the data is) its data."""
    check_model(recipe.model.name_or_path, "model.name_or_path", recipe.model.revision)
    if recipe.model.tokenizer:
        check_model(recipe.model.tokenizer, "model.tokenizer", recipe.model.revision)
    for stage in recipe.stages:
        if stage.start_from:
            check_start(stage.start_from, f"stages.{stage.name}.start_from")
    if data:
        check_data(recipe)


def load_checked(path, overrides=(), data: bool = True):
    """load_recipe + check_recipe: the recipe, or a ConfigError naming the key and the fix."""
    from dpo_dist.config.recipe import load_recipe

    recipe = load_recipe(path, list(overrides))
    check_recipe(recipe, data=data)
    return recipe
