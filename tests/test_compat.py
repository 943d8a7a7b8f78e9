"""dpo_dist.compat: the registry of library patches agrees with setup.cfg, with the patch sites, with the tests it
names and with docs/compat.md; the import-time version check warns once for an untested version and is silent for
the installed (tested) ones."""
from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import warnings
from pathlib import Path

import pytest

from dpo_dist import compat

ROOT = Path(__file__).resolve().parents[1]
PINNED = ("trl", "transformers", "accelerate", "peft", "deepspeed")
REFERENCE = re.compile(r"""compat\.patch\(\s*["']([^"']+)["']\s*\)|#\s*compat:\s*([A-Za-z0-9_.-]+)""")


def install_requires() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    out = {}
    for line in config["options"]["install_requires"].splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, spec = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", line).groups()
            out[name.lower()] = spec.replace(" ", "")
    return out


def test_tested_versions_are_the_setup_cfg_ranges():
    requires = install_requires()
    assert set(compat.TESTED) == set(PINNED)
    for lib, tested in compat.TESTED.items():
        assert requires.get(lib) == tested.requirement(), (
            f"setup.cfg has {lib}{requires.get(lib)}, dpo_dist.compat.TESTED says {lib}{tested.requirement()}: "
            "change both together")
    assert compat.Tested("1.16", "1.16").requirement() == ">=1.16,<1.17"
    assert compat.Tested("0.19", "0.21").requirement() == ">=0.19,<0.22"


def test_every_patch_is_of_a_known_library_with_its_tested_version():
    names = [p.name for p in compat.PATCHES]
    assert len(names) == len(set(names)), "duplicate patch names"
    for p in compat.PATCHES:
        assert p.library in compat.TESTED or p.library == "torch", p
        assert p.target.split(".")[0] == p.library, p  # the target is a dotted path inside its library
        assert p.kind in ("monkeypatch", "override", "private", "workaround"), p
        assert p.why and p.remove_when and p.sites, p
        assert p.tested == (str(compat.TESTED[p.library]) if p.library in compat.TESTED else compat.TORCH_TESTED)


def _installed_as(monkeypatch, versions: dict[str, str]):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: versions.get(dist) or real(dist))


def test_an_untested_version_warns_once_naming_the_patches_at_risk(monkeypatch):
    _installed_as(monkeypatch, {"trl": "1.17.0", "accelerate": "2.0.1"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = compat.check_versions()
    assert len(caught) == 1 and caught[0].category is compat.UntestedVersionWarning
    message = str(caught[0].message)
    assert message.splitlines() == lines and len(lines) == 2  # one line per library
    trl, accelerate = lines
    assert trl.startswith("trl 1.17.0 is installed, but dpo-dist was tested with trl 1.16 (trl>=1.16,<1.17)")
    assert "trl-triton-capability" in trl and "trl-compact-lm-head" in trl and "accelerate-" not in trl
    assert accelerate.startswith("accelerate 2.0.1 is installed") and "accelerate-fsdp-on-cpu" in accelerate


def test_the_installed_versions_are_tested_and_silent(monkeypatch):
    for lib, tested in compat.TESTED.items():
        major, minor = (int(x) for x in importlib.metadata.version(lib).split(".")[:2])
        assert tested.covers((major, minor)), f"{lib} {importlib.metadata.version(lib)} is installed, TESTED: {tested}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_versions() == []
    # a patch release, or a library that is not installed, says nothing either
    real = importlib.metadata.version

    def version(dist):
        if dist == "deepspeed":
            raise importlib.metadata.PackageNotFoundError(dist)
        return "1.16.9" if dist == "trl" else real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_versions() == []


def test_the_check_is_cheap_and_imports_no_library():
    import subprocess
    import sys

    code = ("import sys, dpo_dist.compat; heavy = [m for m in ('torch', 'trl', 'transformers', 'accelerate', 'peft', "
            "'deepspeed') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _test_functions(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{n.name}" for n in node.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_named_test_exists():
    for p in compat.PATCHES:
        if p.test is None:
            continue
        file, _, name = p.test.partition("::")
        path = ROOT / file
        assert file.startswith("tests/") and path.is_file(), p.test
        function, _, param = name.partition("[")
        assert function.startswith("test_") or "::test_" in function, p.test
        assert function in _test_functions(path), f"{p.name}: {p.test} does not exist"
        if param:  # a parametrized case: its id is one the file spells out
            assert param.rstrip("]") in path.read_text(encoding="utf-8"), p.test


def test_every_patch_is_named_at_its_sites_and_every_name_is_registered():
    named: dict[str, set[str]] = {}
    for path in sorted((ROOT / "dpo_dist").rglob("*.py")):
        if path.parent.name == "compat":
            continue
        for match in REFERENCE.finditer(path.read_text(encoding="utf-8")):
            named.setdefault(match[1] or match[2], set()).add(str(path.relative_to(ROOT)))
    registered = {p.name: set(p.sites) for p in compat.PATCHES}
    assert not set(named) - set(registered), f"patch sites name unregistered patches: {set(named) - set(registered)}"
    for name, sites in registered.items():
        found = sorted(named.get(name, ()))
        assert named.get(name) == sites, f"{name}: registered at {sorted(sites)}, named in {found}"


def test_patch_returns_the_entry_and_refuses_an_unknown_name():
    assert compat.patch("trl-triton-capability").library == "trl"
    assert "trl-triton-capability" in compat.applied()
    with pytest.raises(KeyError, match="no-such-patch"):
        compat.patch("no-such-patch")


def test_the_doc_is_the_generated_registry():
    doc = (ROOT / compat.DOC).read_text(encoding="utf-8")
    section = doc[doc.index("## Library patches"):]
    assert section == compat.markdown() + "\n", "docs/compat.md is stale: run python -m dpo_dist.compat"
    for p in compat.PATCHES:
        assert f"`{p.name}`" in section and (p.test is None or p.test in section)
