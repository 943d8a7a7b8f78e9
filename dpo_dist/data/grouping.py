"""Length-grouped batching keyed to the global batch: less padding, the same batches under every profile.

DPO data has a wide length spread, and the collator pads a micro-batch's chosen and rejected sequences to their joint
maximum; in random order that is about half of the tokens at micro-batch 4. The order here keeps the randomness and
groups lengths:

1. shuffle the rows with (seed, epoch);
2. cut the shuffled order into windows of `group_window` global batches and sort each window by length, longest
   first (stable, so ties keep their shuffled order);
3. cut the sorted windows into global-batch chunks (only the very last chunk can be short) and shuffle the full chunks
   with the same generator; the short chunk stays last, so every other chunk lands on an optimizer-step boundary;
4. move the full chunk holding the longest row to the front, so a batch that does not fit in memory fails at step
   1 rather than hours in (the same reason transformers' LengthGroupedSampler puts its longest batch first).

The sort direction does not matter for padding, since chunks are reshuffled; longest-first makes the front chunk of
each window its longest. Consecutive indices then have similar lengths, so each micro-batch on each rank is
length-homogeneous.

The order depends on the row lengths, the global batch size, the window, the seed and the epoch only; never on the
micro-batch or the number of processes. accelerate hands consecutive micro-batches of one index stream to the ranks
in turn (BatchSamplerShard), and one optimizer step takes micro-batch × processes × accumulation = global batch
consecutive indices, so every profile trains on the same rows in each step; and a resumed run that skips the first
batches of the epoch lands on the same rows.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

# In global batches. On lognormal DPO lengths (tests/test_grouping.py) a window of 16 removes about 97% of the padding
# that grouping can remove at micro-batch 4 (the rest is chosen vs rejected inside a pair, which no order changes);
# 64 gains under a point more, and a smaller window keeps each step's rows from a narrower slice of the length range.
DEFAULT_WINDOW = 16


@dataclass(frozen=True)
class LengthGrouping:
    """What the sampler needs from the recipe: the global batch (never the micro-batch) and the window."""

    global_batch_size: int
    window: int = DEFAULT_WINDOW


def grouping_for(stage) -> LengthGrouping | None:
    """The stage's length grouping, or None: switched off, pretraining (packed blocks all have one length), or kto
    (TRL pairs each row with its neighbours for the KL estimate)."""
    t = stage.train
    if not t.group_by_length or stage.stage in ("pretrain", "kto"):
        return None
    return LengthGrouping(t.global_batch_size, t.group_window)


def row_lengths(dataset) -> np.ndarray:
    """Each row's padded length as the collator sees it: DPO prompt + the longer response (chosen and rejected are
    padded together to the batch's joint maximum), SFT len(input_ids)."""
    columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0])
    if "prompt_ids" in columns:
        names = ("prompt_ids", "chosen_ids", "rejected_ids")
    elif "input_ids" in columns:
        names = ("input_ids",)
    else:
        raise ValueError(f"cannot group by length: no prompt_ids or input_ids column in {columns}")
    if hasattr(dataset, "with_format"):  # datasets.Dataset: read list lengths from arrow, no row is decoded
        import pyarrow.compute as pc

        table = dataset.select_columns(list(names)).with_format("arrow")[:]
        sizes = [pc.list_value_length(table[name]).to_numpy(zero_copy_only=False) for name in names]
    else:
        sizes = [np.array([len(row[name]) for row in dataset]) for name in names]
    sizes = [np.asarray(s, dtype=np.int64) for s in sizes]
    return sizes[0] if len(sizes) == 1 else sizes[0] + np.maximum(sizes[1], sizes[2])


def grouped_order(lengths, global_batch_size: int, window: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of row indices (see the module docstring). A permutation of range(len(lengths))."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    if global_batch_size <= 0 or window <= 0:
        raise ValueError(f"global_batch_size and window must be positive, got {global_batch_size} and {window}")
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(n)
    span = window * global_batch_size
    windows = [shuffled[i:i + span] for i in range(0, n, span)]
    ordered = np.concatenate([w[np.argsort(-lengths[w], kind="stable")] for w in windows]) if n else shuffled
    chunks = [ordered[i:i + global_batch_size] for i in range(0, n, global_batch_size)]
    tail = [chunks.pop()] if chunks and len(chunks[-1]) < global_batch_size else []
    chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    if chunks:
        longest = max(range(len(chunks)), key=lambda i: lengths[chunks[i][0]])  # each chunk is sorted, longest first
        chunks.insert(0, chunks.pop(longest))
    return np.concatenate(chunks + tail) if n else shuffled


class GlobalBatchLengthSampler(Sampler[int]):
    """Yields grouped_order(...) for the current epoch. The Trainer (through accelerate's DataLoaderShard) calls
    set_epoch before each epoch, including the one a resumed run skips into."""

    def __init__(self, lengths, global_batch_size: int, window: int, seed: int):
        self.lengths = np.asarray(lengths)
        self.global_batch_size = global_batch_size
        self.window = window
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(grouped_order(self.lengths, self.global_batch_size, self.window, self.seed, self.epoch).tolist())


def attach(dataloader, sampler: GlobalBatchLengthSampler):
    """Make set_epoch reach `sampler` in an accelerate-prepared dataloader and in the ones skip_first_batches derives
    from it. With several processes the sampler sits under BatchSamplerShard, which has no `.sampler`, and a resumed
    run's SkipBatchSampler wraps that: DataLoaderShard.set_epoch looks two levels down only, so the resumed epoch
    would replay epoch 0's order. accelerate's own set_sampler (what it does for its SeedableRandomSampler) puts the
    sampler where set_epoch looks. tests/test_grouping.py fails without this."""
    # compat: accelerate-resume-set-epoch
    if hasattr(dataloader, "set_sampler"):
        dataloader.set_sampler(sampler)
    return dataloader


def padding_fraction(lengths, order, micro_batch_size: int, real=None) -> float:
    """The fraction of pad tokens when `order` is cut into micro-batches padded to their longest row. `real` is the
    real token count per row; for DPO pass prompt+chosen + prompt+rejected, with lengths = prompt + the longer
    response and two sequences per row."""
    lengths = np.asarray(lengths)
    order = np.asarray(order)
    real = lengths if real is None else np.asarray(real)
    per_row = 1 if real is lengths else 2
    padded = used = 0
    for i in range(0, len(order), micro_batch_size):
        batch = order[i:i + micro_batch_size]
        padded += per_row * len(batch) * int(lengths[batch].max())
        used += int(real[batch].sum())
    return 1.0 - used / padded if padded else 0.0


class LengthGroupedTrainer:
    """Mixin placed before TRL's trainer class: the train sampler is GlobalBatchLengthSampler when
    `length_grouping` is given (transformers 5 calls `_get_train_sampler(train_dataset)` from get_train_dataloader).
    It also counts the pad tokens of every training micro-batch, for the run's summary: on the device the batch is on,
    so counting never waits for the GPU; the count is read once, by pad_token_pct."""

    def __init__(self, *args, length_grouping: LengthGrouping | None = None, **kwargs):
        self.length_grouping = length_grouping
        self._length_sampler = None
        # This rank's training micro-batches: real (unmasked) tokens, a tensor on the batch's device; all tokens, an int
        self._real_tokens = None
        self._all_tokens = 0
        super().__init__(*args, **kwargs)

    # compat: transformers-trainer-length-sampler
    def _get_train_sampler(self, train_dataset=None):
        if self.length_grouping is None:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        args = self.args
        # the ranks of a sequence-parallel group run the same micro-batches, one after another
        derived = (args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                   // self.get_sp_size())
        if derived != self.length_grouping.global_batch_size:  # derived from it: a mismatch is a bug, not a setting
            raise RuntimeError(f"length grouping: micro-batch × accumulation × data-parallel ranks = {derived}, but "
                               f"the recipe's global batch is {self.length_grouping.global_batch_size}")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._length_sampler = GlobalBatchLengthSampler(row_lengths(dataset), self.length_grouping.global_batch_size,
                                                        self.length_grouping.window, seed)
        return self._length_sampler

    def get_train_dataloader(self):
        dataloader = super().get_train_dataloader()
        return attach(dataloader, self._length_sampler) if self._length_sampler is not None else dataloader

    def training_step(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if mask is not None:
            real = mask.sum()  # stays on the device: int() here would be a host sync on every micro-batch
            self._real_tokens = real if self._real_tokens is None else self._real_tokens + real
            self._all_tokens += mask.numel()
        return super().training_step(model, inputs, *args, **kwargs)

    def pad_token_pct(self) -> float | None:
        """Pad tokens as a percentage of all tokens in this run's training micro-batches, summed over ranks.
        Collective: call on every rank."""
        import torch

        device = self.accelerator.device
        total = torch.tensor(float(self._all_tokens), dtype=torch.float64, device=device)
        real = (self._real_tokens.to(device=device, dtype=torch.float64) if self._real_tokens is not None
                else torch.zeros_like(total))
        counts = torch.stack([total - real, total])  # [pad tokens, all tokens]
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        pad, total = counts.tolist()
        return round(100.0 * pad / total, 2) if total else None
