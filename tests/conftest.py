"""Shared fixtures: a tiny real-architecture model (Qwen2) with a locally trained tokenizer, built once."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from dpo_dist.demo.build import build_base

    return build_base(tmp_path_factory.mktemp("tiny") / "base", hidden=32, layers=2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Each test tokenizes into its own cache, so no test passes because of another's cache entry.
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path
