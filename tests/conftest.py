"""Shared fixtures: a tiny real-architecture model (Qwen2) with a locally trained tokenizer, built once, and the
small SFT and DPO data sets the launched runs train on. Plain helpers: tests/helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import write_jsonl  # noqa: F401  (the helper used to live here)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = "kind calm bright quiet gentle warm brave patient honest careful".split()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from dpo_dist.demo.build import build_base

    return build_base(tmp_path_factory.mktemp("tiny") / "base", hidden=32, layers=2)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """`dpo-dist demo` run once, as a user runs it (a subprocess): (its --out directory, its stdout). The demo test
    checks it; the serving tests serve its DPO output."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("demo")
    out = root / "demo"
    env = {**os.environ, "DPO_DIST_CACHE": str(root / "cache")}  # its own cache, as every test has
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Each test tokenizes into its own cache, so no test passes because of another's cache entry.
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """SFT and DPO files for the launched runs (tests/helpers.py write_recipe). A module may define its own `data`."""
    d = tmp_path_factory.mktemp("dist-data")
    # Answers from 1 to 24 words: micro-batches hold very different numbers of completion tokens, so a loss
    # averaged per micro-batch (instead of per token over the global batch) would break SFT parity.
    sft = [{"conversation": [{"human": f"Describe animal {i}.",
                              "assistant": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + (i * 7) % 24))}]}
           for i in range(96)]
    dpo = [{"prompt": f"Describe the owl {i}.", "chosen": "It is " + " and ".join(WORDS[: 1 + i % 6]) + ".",
            "rejected": "It is rude" + " and loud" * (i % 4) + "."} for i in range(96)]
    return {"sft": str(write_jsonl(d / "sft.jsonl", sft)), "dpo": str(write_jsonl(d / "dpo.jsonl", dpo))}
