"""Reference log-probs computed once per pair and cached (dpo_dist.stages.ref_cache): same loss as the inline
reference pass, no reference forward in the steps, reused by a later run, keyed by the rows and the model."""
from __future__ import annotations

import json

import pytest
import torch

from dpo_dist.recipe import ConfigError, TrainConfig
from dpo_dist.stages import ref_cache
from tests.test_logps import KernelSpy, _trainer, perturb, train_step

pytestmark = pytest.mark.e2e


def test_pair_keys_ignore_padding_and_see_every_token(tiny_base, tmp_path):
    trainer = _trainer(tiny_base, tmp_path, compact=True)
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
    inline = _trainer(tiny_base, tmp_path, compact=True, method=method, ref_cache=False)
    perturb(inline)
    want_loss, _, want, _ = train_step(inline, backward=False)
    assert len(spy.calls) == 2  # policy + reference

    cached = _trainer(tiny_base, tmp_path, compact=True, method=method, ref_cache=True)
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
    again = _trainer(tiny_base, tmp_path, compact=True, method=method, ref_cache=True)
    perturb(again)
    spy.calls.clear()
    loss_again = train_step(again, backward=False)[0]
    assert again.ref_cache.stats == {**again.ref_cache.stats, "cached": pairs, "computed": 0, "batches": 0}
    assert len(spy.calls) == 1 and loss_again == loss
    assert again.ref_cache.path == cached.ref_cache.path and again.ref_cache.path.is_file()


def test_evaluation_keeps_the_inline_reference(tiny_base, tmp_path, monkeypatch):
    spy = KernelSpy(monkeypatch)
    trainer = _trainer(tiny_base, tmp_path, compact=True, ref_cache=True)
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
    trainer = _trainer(tiny_base, tmp_path, compact=True, ref_cache=True)
    messages = []
    trainer.ref_cache.log = messages.append
    trainer.ref_cache.path.parent.mkdir(parents=True, exist_ok=True)
    trainer.ref_cache.path.write_text("{not json")
    train_step(trainer, backward=False)
    assert any("ignoring unreadable cache" in m and str(trainer.ref_cache.path) in m for m in messages)
    assert trainer.ref_cache.stats["computed"] == len(trainer.train_dataset)
    assert len(json.loads(trainer.ref_cache.path.read_text())["pairs"]) == len(trainer.train_dataset)


def test_recipe_keys():
    assert TrainConfig().ref_logps_cache is True and TrainConfig().ref_logps_batch_size is None
    with pytest.raises(ConfigError, match=r"train\.ref_logps_batch_size: must be positive"):
        TrainConfig(ref_logps_batch_size=0).check("stages[0].train")
