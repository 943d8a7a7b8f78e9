"""docs/recipe.md, the reference for every recipe key, generated from the schema in dpo_dist.config.recipe.

Regenerate it with `python -m dpo_dist.config.reference > docs/recipe.md` (tests/test_recipe_doc.py fails when it is
stale). A key's meaning is the comment written with its field in recipe.py: the comment lines right above the field
and the comment at the end of its line. Keeping the text there, next to the type and the default, is what stops the
doc and the code from drifting apart.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import tokenize
import types
import typing
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin

from dpo_dist.config import recipe as recipe_module
from dpo_dist.config.recipe import SCHEDULERS, DataConfig, MethodConfig, ModelConfig, Recipe, StageConfig, TrainConfig

REGENERATE = "python -m dpo_dist.config.reference > docs/recipe.md"

# The sections in the order a recipe file is written. Every dataclass reachable from Recipe must be listed here.
SECTIONS = (Recipe, ModelConfig, MethodConfig, TrainConfig, StageConfig, DataConfig)

# Recipe.train is a plain mapping in the schema (recipe_from_dict merges it into each stage's train: before
# validation), but the keys it holds are TrainConfig's.
MAPPING_OF = {(Recipe, "train"): TrainConfig}

OVERRIDES = """\
## Command-line overrides

Commands that read a recipe (`dpo-dist train`, `validate`, `prepare`, `launch`, `slurm`, ...) take `key=value`
overrides after it. They are applied in order to the recipe file's contents, before the `train:` defaults are
merged into the stages and before anything is validated:

```bash
dpo-dist train RECIPE stages.sft.train.learning_rate=1e-4 seed=7
```

- The key is the dotted path from the top level: `seed=7`, `model.template=qwen2.5`, `method.lora_r=16`.
- A stage is addressed by its 0-based index, or by a word: the first stage whose `name:` or `stage:` is that word:
  `stages.1.beta=0.2`, `stages.sft.max_length=1024`.
- The value is read as YAML: `null`, `true`, `1e-4`, `[q_proj, v_proj]`, `{type: full}`.
- A block that is not there is created: `stages.dpo.method.type=full` gives that stage a method of its own (the
  other method keys then take their defaults).
- `train.KEY=VALUE` changes the recipe-level default, which a stage's own `train.KEY` still overrides;
  `stages.NAME.train.KEY=VALUE` sets it for that stage only.
- The result is checked like the file: an unknown key or a bad value is refused, naming the key.
"""


# ---- where each key's meaning comes from --------------------------------------------------------------------------

@lru_cache(maxsize=None)
def field_comments() -> dict[str, dict[str, str]]:
    """{class name: {field name: its comment}} for every class in recipe.py."""
    source = inspect.getsource(recipe_module)
    # line number -> (comment text, whether the comment is alone on its line)
    comments = {tok.start[0]: (tok.string.lstrip("#").strip(), tok.line.lstrip().startswith("#"))
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    return {node.name: {stmt.target.id: _comment_of(stmt, comments)
                        for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
            for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}


def _comment_of(stmt: ast.AnnAssign, comments: dict[int, tuple[str, bool]]) -> str:
    """The comment-only lines directly above the field (no blank line between), then its trailing comment."""
    above, line = [], stmt.lineno - 1
    while line in comments and comments[line][1]:
        above.insert(0, comments[line][0])
        line -= 1
    trailing = [comments[n][0] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
    return " ".join(above + trailing)


# ---- the shape of the schema --------------------------------------------------------------------------------------

def _child(owner: type, f: dataclasses.Field) -> tuple[type, bool] | None:
    """The dataclass a field's value is written as, and whether the field is a list of them; None for a value."""
    if (owner, f.name) in MAPPING_OF:
        return MAPPING_OF[owner, f.name], False
    tp = typing.get_type_hints(owner)[f.name]
    if get_origin(tp) is list:
        (inner,) = get_args(tp)
        return (inner, True) if dataclasses.is_dataclass(inner) else None
    options = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    return next(((option, False) for option in options if dataclasses.is_dataclass(option)), None)


@lru_cache(maxsize=None)
def places() -> dict[type, list[tuple[str, type | None, str | None]]]:
    """Each schema dataclass → where a recipe writes it: (YAML path, owning class, field), the first one primary."""
    found: dict[type, list] = {Recipe: [("", None, None)]}
    queue = [Recipe]
    for cls in queue:  # breadth first: the queue grows as nested dataclasses are found
        path = found[cls][0][0]
        for f in dataclasses.fields(cls):
            child = _child(cls, f)
            if child is None:
                continue
            sub, is_list = child
            if sub not in found:
                found[sub] = []
                queue.append(sub)
            found[sub].append((f"{path + '.' if path else ''}{f.name}{'[]' if is_list else ''}", cls, f.name))
    missing = [cls.__name__ for cls in found if cls not in SECTIONS]
    if missing:
        raise RuntimeError(f"dpo_dist.config.reference.SECTIONS does not list {', '.join(missing)}")
    return found


def heading(cls: type) -> str:
    return places()[cls][0][0] or "Top level"


def _link(cls: type) -> str:
    # GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens.
    title = heading(cls)
    return f"[{title}](#{re.sub(r'[^a-z0-9 _-]', '', title.lower()).replace(' ', '-')})"


# ---- one key -------------------------------------------------------------------------------------------------------

def _yaml(value: Any) -> str:
    """A default as a recipe file writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, str) else repr(value)


def _one_of(values: typing.Iterable[Any]) -> str:
    return ", ".join(f"`{_yaml(v)}`" for v in values)


_NAMES = {bool: "`true`/`false`", int: "integer", float: "number", str: "string", type(None): "`null`"}


def _type_text(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        values = get_args(tp)
        return "one of " + _one_of(values) if len(values) > 1 else _one_of(values)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if len(options) == 2 and get_origin(options[1]) is list and get_args(options[1])[0] == options[0]:
            return f"{_type_text(options[0])}, or a list of them"  # loss_type: a name or a list of names
        return " or ".join(_type_text(option) for option in options)
    if origin is list:
        inner = get_args(tp)[0]
        return f"list of ({_type_text(inner)})" if get_origin(inner) is Literal else f"list of {_type_text(inner)}s"
    return _NAMES[tp]


@lru_cache(maxsize=None)
def _checked_values() -> dict[tuple[type, str], str]:
    """String keys that a check() holds to a list kept elsewhere: the list is shown with the type."""
    from dpo_dist.data.formats import FORMATS
    from dpo_dist.data.templates import template_names

    return {
        (TrainConfig, "lr_scheduler"): "one of " + _one_of(SCHEDULERS),
        (DataConfig, "format"): "; ".join(f"{stage}: {_one_of(formats)}" for stage, formats in FORMATS.items()),
        (ModelConfig, "template"): "one of " + _one_of(template_names()),
    }


def key_type(cls: type, f: dataclasses.Field) -> str:
    tp = typing.get_type_hints(cls)[f.name]
    child = _child(cls, f)
    if child is not None:
        sub, is_list = child
        text = f"{'list of mappings' if is_list else 'mapping'} ({_link(sub)})"
        return text + (" or `null`" if type(None) in get_args(tp) else "")
    text = _type_text(tp)
    allowed = _checked_values().get((cls, f.name))
    return f"{text}: {allowed}" if allowed else text


def key_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "**required**"
    return "each key's default" if dataclasses.is_dataclass(value) else f"`{_yaml(value)}`"


def _cell(text: str) -> str:
    # A `|` would end the table cell; `<name>` would be read as an HTML tag.
    return text.replace("|", "\\|").replace("<", "&lt;")


# ---- the document --------------------------------------------------------------------------------------------------

def _section(cls: type) -> list[str]:
    lines = [f"## {heading(cls)}", ""]
    where = [(path, owner, name) for path, owner, name in places()[cls] if owner is not None]
    if where:
        lines += ["Written as:", ""]
        lines += [f"- `{path}`: {_cell(field_comments()[owner.__name__][name])}" for path, owner, name in where]
        lines.append("")
    lines += ["| key | type / allowed values | default | meaning |", "|---|---|---|---|"]
    comments = field_comments()[cls.__name__]
    for f in dataclasses.fields(cls):
        cells = (f"`{f.name}`", key_type(cls, f), key_default(f), comments.get(f.name, ""))
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return lines + [""]


def recipe_markdown() -> str:
    """The whole of docs/recipe.md."""
    lines = [
        "# Recipe reference",
        "",
        f"*Generated from `dpo_dist/config/recipe.py` by `{REGENERATE}`; do not edit by hand.*",
        "",
        inspect.getdoc(recipe_module),
        "",
        "A recipe is one YAML file; its sections:",
        "",
    ]
    for cls in SECTIONS:
        keys = ", ".join(f"`{f.name}`" for f in dataclasses.fields(cls))
        lines.append(f"- {_link(cls)}: {keys}")
    lines.append("")
    for cls in SECTIONS:
        lines += _section(cls)
    return "\n".join(lines) + "\n" + OVERRIDES


if __name__ == "__main__":
    print(recipe_markdown(), end="")
