"""Length-grouped batching (dpo_dist.data.grouping): a shuffled permutation, less padding, and the same global batches
under every micro-batch × process split, resumed runs included."""
from __future__ import annotations

import random

import numpy as np
import pytest

from dpo_dist.data.grouping import (DEFAULT_WINDOW, GlobalBatchLengthSampler, LengthGroupedTrainer, attach,
                                    grouped_order, padding_fraction, row_lengths)
from dpo_dist.config.recipe import TrainConfig, recipe_from_dict
from dpo_dist.config.schema import ConfigError


def dpo_lengths(n=4096, seed=0):
    """UltraFeedback-like long tails: lognormal prompt and response lengths."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(4.5, 0.9, n), 4, 1500).astype(int)
    chosen, rejected = (np.clip(rng.lognormal(5.0, 0.8, n), 1, 1500).astype(int) for _ in range(2))
    rows = [{"prompt_ids": [0] * p, "chosen_ids": [0] * c, "rejected_ids": [0] * r}
            for p, c, r in zip(prompt, chosen, rejected)]
    return rows, prompt + np.maximum(chosen, rejected), 2 * prompt + chosen + rejected


# ---- the order ------------------------------------------------------------------------------------------------------


def test_each_epoch_is_a_permutation_deterministic_per_seed_and_epoch():
    lengths = np.random.default_rng(1).integers(1, 500, 1000)
    for epoch in range(3):
        order = grouped_order(lengths, 32, 4, seed=7, epoch=epoch)
        assert sorted(order.tolist()) == list(range(1000))
    a = grouped_order(lengths, 32, 4, seed=7, epoch=0)
    assert np.array_equal(a, grouped_order(lengths, 32, 4, seed=7, epoch=0))
    assert not np.array_equal(a, grouped_order(lengths, 32, 4, seed=8, epoch=0))
    assert not np.array_equal(a, grouped_order(lengths, 32, 4, seed=7, epoch=1))
    # the batches themselves differ, not just their order
    batches = lambda o: {frozenset(o[i:i + 32].tolist()) for i in range(0, len(o), 32)}  # noqa: E731
    assert batches(a) != batches(grouped_order(lengths, 32, 4, seed=8, epoch=0))


def test_sampler_follows_set_epoch():
    lengths = np.random.default_rng(2).integers(1, 100, 100)
    sampler = GlobalBatchLengthSampler(lengths, 8, 2, seed=3)
    assert len(sampler) == 100
    assert list(sampler) == grouped_order(lengths, 8, 2, 3, 0).tolist()
    sampler.set_epoch(2)
    assert list(sampler) == grouped_order(lengths, 8, 2, 3, 2).tolist()


def test_batches_are_sorted_windows_longest_first_and_the_short_batch_last():
    lengths = np.random.default_rng(3).integers(1, 1000, 1000)  # 1000 = 31 batches of 32 + 8
    order = grouped_order(lengths, 32, 4, seed=0, epoch=0)
    batches = [order[i:i + 32] for i in range(0, 1000, 32)]
    assert [len(b) for b in batches] == [32] * 31 + [8]
    for b in batches:
        assert list(lengths[b]) == sorted(lengths[b], reverse=True)
    assert lengths[order[0]] == lengths.max()  # a batch that does not fit fails at step 1


def test_grouping_cuts_padding_at_micro_batch_4_to_under_half_of_random_order():
    rows, lengths, real = dpo_lengths()
    assert np.array_equal(row_lengths(rows), lengths)  # prompt + the longer response: what the collator pads to
    random_order = np.random.default_rng(5).permutation(len(lengths))
    pad_random = padding_fraction(lengths, random_order, 4, real)
    pad_grouped = padding_fraction(lengths, grouped_order(lengths, 32, DEFAULT_WINDOW, 0, 0), 4, real)
    # what no order removes: chosen vs rejected inside one pair (micro-batch 1)
    pad_floor = padding_fraction(lengths, random_order, 1, real)
    print(f"padding at micro-batch 4: random {pad_random:.3f}, grouped {pad_grouped:.3f}, floor {pad_floor:.3f}")
    assert pad_grouped < 0.5 * pad_random
    assert pad_grouped - pad_floor < 0.1 * (pad_random - pad_floor)  # the window removes >90% of what can be removed


def test_row_lengths_reads_datasets_columns():
    from datasets import Dataset

    rows, lengths, _ = dpo_lengths(50)
    assert np.array_equal(row_lengths(Dataset.from_list(rows)), lengths)
    sft = Dataset.from_list([{"input_ids": [1] * k, "labels": [1] * k} for k in (3, 9, 1)])
    assert row_lengths(sft).tolist() == [3, 9, 1]
    assert row_lengths(sft.select([2, 0])).tolist() == [1, 3]  # an indices mapping is honoured


# ---- the same global batches under every profile ----------------------------------------------------------------


def _steps(lengths, micro, world, accumulation, epoch=0, skip_batches=0, seed=11, window=2):
    """The set of rows in each optimizer step, as the Trainer forms them: each rank's dataloader built by accelerate's
    prepare_data_loader for that rank (as Accelerator.prepare does under DDP, FSDP and DeepSpeed), `accumulation`
    micro-batches per rank per step. skip_batches: a resumed run, with a fresh sampler, skipping into `epoch` the way
    Trainer._run_epoch does (skip_first_batches, then set_epoch)."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    global_batch = micro * world * accumulation
    per_rank = []
    for rank in range(world):
        sampler = GlobalBatchLengthSampler(lengths, global_batch, window, seed)
        loader = DataLoader(list(range(len(lengths))), batch_size=micro, sampler=sampler, collate_fn=list)
        loader = attach(prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False,
                                            use_seedable_sampler=True), sampler)
        if skip_batches:
            loader = skip_first_batches(loader, skip_batches)
        loader.set_epoch(epoch)
        per_rank.append(list(loader))
    n_steps = len(per_rank[0]) // accumulation
    return [frozenset(i for batches in per_rank for b in batches[s * accumulation:(s + 1) * accumulation] for i in b)
            for s in range(n_steps)]


SPLITS = [(8, 1, 1), (2, 2, 2), (4, 2, 1), (1, 1, 8), (2, 1, 4)]  # micro-batch, processes, accumulation: global 8


@pytest.mark.parametrize("epoch", [0, 1])
def test_global_batches_are_the_same_for_every_micro_batch_and_process_split(epoch):
    lengths = np.random.default_rng(4).integers(1, 300, 96)
    reference = _steps(lengths, *SPLITS[0], epoch=epoch)
    assert len(reference) == 12 and all(len(s) == 8 for s in reference)
    assert set().union(*reference) == set(range(96))
    order = grouped_order(lengths, 8, 2, 11, epoch)
    assert reference == [frozenset(order[i:i + 8].tolist()) for i in range(0, 96, 8)]
    for split in SPLITS[1:]:
        assert _steps(lengths, *split, epoch=epoch) == reference, split


@pytest.mark.parametrize("micro, world, accumulation", SPLITS[:3])
def test_a_resumed_run_skips_to_the_same_rows_in_a_later_epoch(micro, world, accumulation):
    # Fails without attach(): under 2 processes set_epoch would not reach the sampler of a resumed run's
    # dataloader, and epoch 1 would replay epoch 0's order.
    lengths = np.random.default_rng(5).integers(1, 300, 96)
    uninterrupted = _steps(lengths, micro, world, accumulation, epoch=1)
    done = 5  # optimizer steps already trained in epoch 1
    resumed = _steps(lengths, micro, world, accumulation, epoch=1, skip_batches=done * accumulation)
    assert resumed == uninterrupted[done:]


# ---- the pad counter -------------------------------------------------------------------------------------------------


def test_pad_count_stays_on_the_device_until_it_is_reported():
    import types

    import torch

    from tests.helpers import host_reads

    class Base:
        def training_step(self, model, inputs, *args, **kwargs):
            return "stepped"

    class Trainer(LengthGroupedTrainer, Base):
        pass

    trainer = Trainer()
    trainer.accelerator = types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    assert trainer.pad_token_pct() is None  # no micro-batch yet
    masks = [torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[1] * 6, [1] + [0] * 5]),
             torch.tensor([[True, True, False]]), torch.ones(3, 5, dtype=torch.long)]
    with host_reads() as reads:  # a read on the host is a sync on a GPU: none per micro-batch
        for mask in masks:
            inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": mask}
            assert trainer.training_step(None, inputs) == "stepped"
        trainer.training_step(None, {"input_ids": torch.zeros(1, 2)})  # no mask: not counted
    assert reads == []
    pad = sum(int((m == 0).sum()) for m in masks)
    total = sum(m.numel() for m in masks)
    assert (pad, total) == (9, 38)
    with host_reads() as reads:
        assert trainer.pad_token_pct() == round(100.0 * pad / total, 2) == 23.68
    assert len(reads) == 1  # read once, when reported


# ---- recipe keys ----------------------------------------------------------------------------------------------------


def test_recipe_keys_default_on_and_window_is_checked():
    t = TrainConfig()
    assert t.group_by_length is True and t.group_window == DEFAULT_WINDOW
    base = {"name": "t", "model": {"name_or_path": "m"}, "stages": [{"stage": "dpo", "data": {"train": "x.jsonl"}}]}
    recipe = recipe_from_dict(base, ["train.group_by_length=false", "train.group_window=4"])
    assert recipe.stages[0].train.group_by_length is False and recipe.stages[0].train.group_window == 4
    with pytest.raises(ConfigError, match=r"train\.group_window: must be positive, got 0"):
        recipe_from_dict(base, ["train.group_window=0"])


# ---- a real run ------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_training_with_grouping_pads_less_than_without(tiny_base, tmp_path, monkeypatch):
    from dpo_dist.config.profiles import Profile
    from dpo_dist.reliability.guard import GuardedTrainer
    from dpo_dist.training.run import run_recipe
    from tests.helpers import write_jsonl

    rng = random.Random(0)
    rows = []
    for _ in range(32):  # a wide spread of lengths; chosen and rejected alike, so grouping can remove most padding
        words = rng.choice([0, 1, 2, 8, 14])
        rows.append({"prompt": "Describe the owl" + " and the fox" * words + ".",
                     "chosen": "It is calm." + " It sleeps." * (words // 2),
                     "rejected": "It is rude." + " It bites." * (words // 2)})
    data = write_jsonl(tmp_path / "dpo.jsonl", rows)
    profile = Profile(name="test", micro_batch_size=2, precision="fp32", attn_implementation="sdpa")
    summaries, counted = {}, {}

    def training_step(self, model, inputs, *args, **kwargs):  # next after LengthGroupedTrainer: what it counted
        mask = inputs["attention_mask"]
        counted[grouped][0] += int((mask == 0).sum())
        counted[grouped][1] += mask.numel()
        return super(GuardedTrainer, self).training_step(model, inputs, *args, **kwargs)

    monkeypatch.setattr(GuardedTrainer, "training_step", training_step, raising=False)
    for grouped in (True, False):
        counted[grouped] = [0, 0]
        recipe = recipe_from_dict({
            "name": "t", "model": {"name_or_path": str(tiny_base), "template": "qwen"},
            "method": {"type": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
            "train": {"learning_rate": 1e-3, "global_batch_size": 8, "max_steps": 4, "logging_steps": 1,
                      "save_steps": 100, "lr_scheduler": "constant", "group_by_length": grouped},
            "output_dir": str(tmp_path / f"run-{grouped}"),
            "stages": [{"stage": "dpo", "data": {"train": str(data)}, "max_length": 160, "max_prompt_length": 120}]})
        (result,) = run_recipe(recipe, profile, log=lambda *_: None, keep_trainer=True)
        assert (result.trainer._length_sampler is not None) == grouped  # transformers asked our mixin for the sampler
        summaries[grouped] = result.summary
    for grouped, s in summaries.items():
        assert s["global_step"] == 4 and np.isfinite(s["train_loss"])
        pad, total = counted[grouped]
        assert total and s["pad_token_pct"] == round(100.0 * pad / total, 2)  # the micro-batches that were trained
    print(f"pad_token_pct: grouped {summaries[True]['pad_token_pct']}, random {summaries[False]['pad_token_pct']}")
    assert summaries[True]["pad_token_pct"] < 0.5 * summaries[False]["pad_token_pct"]
