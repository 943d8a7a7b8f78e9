"""Reference log-probs computed once per pair and cached (dpo_dist.training.dpo.ref_cache): same loss as the inline
reference pass, no reference forward in the steps, reused by a later run, keyed by the rows and the model."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_dist.config.recipe import ConfigError, TrainConfig
from dpo_dist.training.dpo import ref_cache
from tests.helpers import KernelSpy, dpo_trainer, perturb, train_step

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def cached_pairs(path: Path) -> dict:
    """The pairs a run reading this cache file gets."""
    return ref_cache.RefLogpsCache(path, 1, log=lambda *_: None)._read()


def test_pair_keys_ignore_padding_and_see_every_token(tiny_base, tmp_path):
    trainer = dpo_trainer(tiny_base, tmp_path, compact=True)
    ds, collate = trainer.train_dataset, trainer.data_collator
    alone = [ref_cache.pair_keys(collate([ds[i]]))[0] for i in range(len(ds))]
    together = ref_cache.pair_keys(collate([ds[i] for i in range(len(ds))]))  # padded to the longest
    assert alone == together and len(set(alone)) == len(ds)
    row = dict(ds[0])
    row["rejected_ids"] = row["rejected_ids"][:-1] + [row["rejected_ids"][-1] + 1]  # one token differs
    assert ref_cache.pair_keys(collate([row]))[0] != alone[0]
    row = dict(ds[0])  # the same tokens, one moved from the prompt into the completion
    row["prompt_ids"], row["chosen_ids"] = row["prompt_ids"][:-1], row["prompt_ids"][-1:] + row["chosen_ids"]
    row["rejected_ids"] = ds[0]["prompt_ids"][-1:] + row["rejected_ids"]
    assert ref_cache.pair_keys(collate([row]))[0] != alone[0]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_cached_reference_gives_the_inline_loss_without_a_reference_forward(tiny_base, tmp_path, method,
                                                                            monkeypatch):
    spy = KernelSpy(monkeypatch)
    inline = dpo_trainer(tiny_base, tmp_path, compact=True, method=method, ref_cache=False)
    perturb(inline)
    want_loss, _, want, _ = train_step(inline, backward=False)
    assert len(spy.calls) == 2  # policy + reference

    cached = dpo_trainer(tiny_base, tmp_path, compact=True, method=method, ref_cache=True)
    perturb(cached)
    spy.calls.clear()
    loss, _, got, _ = train_step(cached, backward=False)
    pairs = len(cached.train_dataset)
    # the pass: all 8 pairs in 16-pair batches (4 × micro-batch 4) = one reference forward; then the policy only
    assert len(spy.calls) == 2 and cached.ref_cache.stats["computed"] == pairs
    assert loss == pytest.approx(want_loss, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert got["rewards/margins"] != 0.0
    spy.calls.clear()
    train_step(cached, (4, 5, 6, 7), backward=False)
    assert len(spy.calls) == 1  # the next step: the policy forward only

    # Another run on the same model and rows reads the file: nothing computed.
    again = dpo_trainer(tiny_base, tmp_path, compact=True, method=method, ref_cache=True)
    perturb(again)
    spy.calls.clear()
    loss_again = train_step(again, backward=False)[0]
    assert again.ref_cache.stats == {**again.ref_cache.stats, "cached": pairs, "computed": 0, "batches": 0}
    assert len(spy.calls) == 1 and loss_again == loss
    assert again.ref_cache.path == cached.ref_cache.path and again.ref_cache.path.is_file()


def test_evaluation_keeps_the_inline_reference(tiny_base, tmp_path, monkeypatch):
    spy = KernelSpy(monkeypatch)
    trainer = dpo_trainer(tiny_base, tmp_path, compact=True, ref_cache=True)
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    assert len(spy.calls) == 2 and trainer.ref_cache.table is None


def test_model_key_follows_the_weights_and_the_precision(tiny_base, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    copy = shutil.copytree(tiny_base, tmp_path / "copy")
    first = AutoModelForCausalLM.from_pretrained(copy)
    key = ref_cache.model_key(first, "fp32")
    assert ref_cache.model_key(AutoModelForCausalLM.from_pretrained(copy), "fp32") == key
    assert ref_cache.model_key(first, "bf16") != key
    assert ref_cache.model_key(first, "fp32", {"head": "trl"}) != key
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # rewritten: a new modification time
    assert ref_cache.model_key(first, "fp32") != key


def test_an_unreadable_cache_file_is_reported_and_recomputed(tiny_base, tmp_path):
    trainer = dpo_trainer(tiny_base, tmp_path, compact=True, ref_cache=True)
    messages = []
    trainer.ref_cache.log = messages.append
    trainer.ref_cache.path.parent.mkdir(parents=True, exist_ok=True)
    trainer.ref_cache.path.write_text("{not json")
    train_step(trainer, backward=False)
    assert any("ignoring unreadable cache" in m and str(trainer.ref_cache.path) in m for m in messages)
    assert trainer.ref_cache.stats["computed"] == len(trainer.train_dataset)
    assert len(cached_pairs(trainer.ref_cache.path)) == len(trainer.train_dataset)  # a new file, read back whole
    assert (trainer.ref_cache.path.parent / f"{trainer.ref_cache.path.name}.unreadable").read_text() == "{not json"


# ---- the pass flushes as it goes: a run killed during it loses only the unwritten rounds --------------------------

KILLED = """
import sys
from pathlib import Path
from tests.helpers import dpo_trainer, train_step
trainer = dpo_trainer(Path(sys.argv[1]), Path(sys.argv[2]), compact=True, ref_cache=True)
trainer.ref_cache.batch_size, trainer.ref_cache.flush_s = 2, 0.0  # 4 batches of 2 pairs, a flush after each
train_step(trainer, backward=False)
"""


def test_a_pass_killed_midway_keeps_its_flushed_rounds_and_the_rerun_computes_the_rest(tiny_base, tmp_path,
                                                                                      monkeypatch):
    env = {**os.environ, "DPO_DIST_FAULT": "refpass-kill@3"}  # DPO_DIST_CACHE: this test's, from the fixture
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tiny_base), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "[fault] rank 0: SIGKILL in the reference log-prob pass, after its round 3" in proc.stderr
    assert re.search(r"\[ref-logps\] 2/4 batches \(4/8 pairs\), [\d.]+ s, [\d.]+ pairs/s; 4 saved to the cache",
                     proc.stdout), proc.stdout

    rerun = dpo_trainer(tiny_base, tmp_path, compact=True, ref_cache=True)
    rerun.ref_cache.batch_size = 2
    path = rerun.ref_cache.path
    assert len(cached_pairs(path)) == 4  # rounds 1 and 2; round 3 was computed but not yet written
    train_step(rerun, backward=False)
    stats = rerun.ref_cache.stats
    assert (stats["pairs"], stats["cached"], stats["computed"], stats["batches"]) == (8, 4, 4, 2)
    assert cached_pairs(path) == rerun.ref_cache.table and len(rerun.ref_cache.table) == 8

    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "another-cache"))
    whole = dpo_trainer(tiny_base, tmp_path, compact=True, ref_cache=True)  # one uninterrupted pass, 1 batch of 8
    whole.ref_cache.fill(whole)
    assert whole.ref_cache.path != path and whole.ref_cache.stats["computed"] == 8
    assert rerun.ref_cache.table.keys() == whole.ref_cache.table.keys()
    for key, values in whole.ref_cache.table.items():
        assert rerun.ref_cache.table[key] == pytest.approx(values, abs=1e-5), key


def test_a_torn_last_line_is_ignored_and_the_next_writer_starts_a_new_line(tmp_path):
    messages = []
    first = ref_cache.RefLogpsCache(tmp_path / "model.jsonl", 4, log=messages.append)
    a, b, c, d = (ch * 32 for ch in "abcd")
    first._append([(a, -1.5, -2.25), (b, -3.0, -4.0)])
    with first.path.open("ab") as f:
        f.write(f'["{c}", -5.0, -6'.encode())  # a run killed while writing its line
    assert first._read() == {a: (-1.5, -2.25), b: (-3.0, -4.0)}
    assert any("ignoring the unfinished last line" in m for m in messages)
    other = ref_cache.RefLogpsCache(first.path, 4, log=messages.append)  # another run on the same reference model
    other._append([(d, -7.0, -8.0)])
    assert first._read() == {a: (-1.5, -2.25), b: (-3.0, -4.0), d: (-7.0, -8.0)}
    header, *records = first.path.read_text().splitlines()
    assert json.loads(header)["format"] == ref_cache.FORMAT == 2 and len(records) == 4  # a, b, the torn line, d


def test_a_format_1_cache_is_still_read(tmp_path):
    messages = []
    cache = ref_cache.RefLogpsCache(tmp_path / "model.jsonl", 4, log=messages.append)
    cache.format1_path.write_text(json.dumps({"format": 1, "pairs": {"a" * 32: [-1.0, -2.0]}}))
    cache._append([("b" * 32, -3.0, -4.0)])
    assert cache._read() == {"a" * 32: (-1.0, -2.0), "b" * 32: (-3.0, -4.0)}
    assert any("read from the format-1 cache" in m for m in messages)


# ---- the keys come from the collator (CPU tensors), not from the batch on the device ------------------------------

def test_the_collator_carries_the_pair_keys_and_lookup_uses_them(tiny_base, tmp_path, monkeypatch):
    trainer = dpo_trainer(tiny_base, tmp_path, compact=True, ref_cache=True)
    ds, collate = trainer.train_dataset, trainer.data_collator
    batch = collate([ds[i] for i in (0, 1, 2, 3)])
    assert batch["pair_keys"] == ref_cache.pair_keys(batch)
    assert batch["pair_keys"] == [ref_cache.pair_keys(collate.collate([ds[i]]))[0] for i in (0, 1, 2, 3)]
    loaded = next(iter(trainer.get_train_dataloader()))  # through accelerate's loader and _prepare_inputs
    loaded = trainer._prepare_inputs(loaded)
    assert isinstance(loaded["pair_keys"], list) and loaded["pair_keys"] == ref_cache.pair_keys(loaded)

    trainer.ref_cache.fill(trainer)
    calls = []
    real = ref_cache.pair_keys
    monkeypatch.setattr(ref_cache, "pair_keys", lambda b: calls.append(len(b["input_ids"])) or real(b))
    with_keys = train_step(trainer, backward=False)[0]  # collates (the keys are computed there), then the loss
    collated = len(calls)
    assert collated == 1
    without = trainer.compute_loss(trainer.model, ref_cache.without_pair_keys(batch)).item()
    assert len(calls) == collated + 1  # a batch without keys: computed from its tensors
    assert with_keys == without


def test_recipe_keys():
    assert TrainConfig().ref_logps_cache is True and TrainConfig().ref_logps_batch_size is None
    with pytest.raises(ConfigError, match=r"train\.ref_logps_batch_size: must be positive"):
        TrainConfig(ref_logps_batch_size=0).check("stages[0].train")
