"""The layers of docs/architecture.md import one way: a module imports dpo_dist modules only from its own layer or
the layers above it (and the public shims import what they re-export)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dpo_dist"
LAYERS = ["compat", "config", "data", "distributed", "models", "reliability", "inference", "training", "launch",
          ("planner", "bench", "demo", "commands")]
ALLOWED = {("config", "data")}  # config names data formats and templates in its errors; data never imports config


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "dpo_dist":
        return None
    for i, layer in enumerate(LAYERS):
        if parts[1] in (layer if isinstance(layer, tuple) else (layer,)):
            return i
    return None  # cli, the shims: the top


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            if node.module == "dpo_dist":
                yield from (f"dpo_dist.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_every_import_goes_up_the_layers():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        module = "dpo_dist." + ".".join(path.relative_to(PKG).with_suffix("").parts)
        own = _layer(module)
        if own is None:
            continue
        for imported in _imports(path):
            other = _layer(imported)
            if other is not None and other > own:
                pair = (module.split(".")[1], imported.split(".")[1])
                if pair not in ALLOWED:
                    wrong.append(f"{path.relative_to(PKG.parent)} imports {imported}")
    assert not wrong, "imports against the layer order of docs/architecture.md:\n" + "\n".join(wrong)


def test_the_doc_names_every_module():
    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
               if p.name != "__init__.py" and p.stem not in doc]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def _calls(path: Path, names: set[str]):
    """(line, name) of every call of `X.from_pretrained` (X in names), a rank read from os.environ, and the like."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
            name = f"{target.id}.{node.func.attr}" if isinstance(target, ast.Name) else None
            if name in names:
                yield node.lineno, name
            if (node.func.attr == "get" and isinstance(target, ast.Attribute) and target.attr == "environ"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
                yield node.lineno, f"os.environ.get({node.args[0].value!r})"


def test_models_and_ranks_have_one_reader_each():
    # A model for use (chat, generate, eval, merge, demo) loads through inference.loader.load_model, a model for
    # training through models.loading; bench/ measures the libraries' own loaders on purpose. A rank or world size
    # is read in distributed/ranks.py only (data/cache.py, a layer below it, records RANK's text in a lock file).
    loaders = {"AutoModelForCausalLM.from_pretrained", "PeftModel.from_pretrained"}
    where = {"AutoModelForCausalLM.from_pretrained": {"inference/loader.py", "models/loading.py"},
             "PeftModel.from_pretrained": {"inference/loader.py"}}
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        if rel.startswith("bench/"):
            continue
        for line, name in _calls(path, loaders):
            if rel not in where.get(name, {"distributed/ranks.py", "data/cache.py"}):
                wrong.append(f"dpo_dist/{rel}:{line}: {name}")
    assert not wrong, "\n".join(wrong)
