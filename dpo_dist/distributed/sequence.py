"""Sequence parallelism (DeepSpeed Ulysses through accelerate): the group, the split, and the batches a group shares.

Under a profile's `sequence_parallel: N`, accelerate's DeepSpeed path registers Ulysses attention and builds groups of
N consecutive ranks. The ranks of a group run one sequence together: each holds 1/N of its positions, and attention
swaps heads for positions (all-to-all) so that each rank attends over the whole sequence for 1/N of the heads.

- `GroupBatches` takes the place of DeepSpeed's data-loader adapter (which the Trainer would install): the group's
  batches are exchanged whole, so every rank of a group runs the same ones.
- SFT and pretraining batches are then cut along the sequence (`split_lm_batch`), as DeepSpeed's adapter cuts them.
- DPO batches (`input_ids` = chosen then rejected rows, `completion_mask`) stay whole; the compact head
  (training.dpo.logps) splits each along the sequence, scores its part and gathers the per-token log-probs back, so
  TRL's DPO loss runs unchanged, and identical on every rank of the group.

Gradients: a gather's backward sums over the group, and ZeRO-3 divides the summed gradients by all ranks, so the two
factors of N cancel. ZeRO-1/2 divide by the data-parallel ranks only; those profiles are refused
(config.profiles).
"""
from __future__ import annotations

import math

import torch


# What this process split in the current stage: the positions of all the sequences, the positions it held itself,
# the real (unpadded) tokens and the scored targets among those. The run summary records them for every rank:
# evidence that each held 1/N of every sequence, with real tokens in it. Counts stay on the batch's device (no host
# sync per micro-batch) until facts() reads them.
POSITIONS: dict = {"whole": 0, "held": 0, "real_held": 0, "targets_held": 0}


def _count(whole: int, held: int, real: torch.Tensor, targets: torch.Tensor) -> None:
    POSITIONS["whole"] += whole
    POSITIONS["held"] += held
    POSITIONS["real_held"] = POSITIONS["real_held"] + real.sum()
    POSITIONS["targets_held"] = POSITIONS["targets_held"] + (targets != -100).sum()


def facts() -> list[dict]:
    """POSITIONS of every rank, in rank order. Collective."""
    mine = {k: int(v) for k, v in POSITIONS.items()}
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, mine)
    return out


def group():
    """The sequence-parallel process group (ranks g·N … g·N + N − 1), or None when sequence parallelism is off or
    not set up yet (accelerate sets it up when it prepares the model). Asks DeepSpeed's own record of the groups, which
    only a Ulysses registration fills: under DDP or FSDP DeepSpeed's communication layer is not even started."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    try:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp
    except ImportError:
        return None
    found = parallel_state_sp._SEQUENCE_PARALLEL_GROUP  # compat: deepspeed-ulysses-once-per-process
    return found if found is not None and torch.distributed.get_world_size(found) > 1 else None


def release() -> None:
    """Undo what an earlier stage of this process set up, before accelerate sets it up again for the next trainer:
    DeepSpeed's groups (it refuses a second setup while the first is recorded) and its engine's record of them
    (groups.mpu), and its wrapper in transformers' attention table (it replaces the core entry, sdpa or flash, in
    place; the next registration would wrap the wrapper and split the heads twice)."""
    try:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp
        from deepspeed.utils import groups
    except ImportError:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from dpo_dist import compat

    compat.patch("deepspeed-ulysses-once-per-process")
    parallel_state_sp._release_sequence_parallel_groups()
    if groups.mpu is parallel_state_sp:  # the last engine's record of them: a frozen reference's engine, set up
        groups.mpu = None  # before the next registration, would ask it for the groups just released
    POSITIONS.update(whole=0, held=0, real_held=0, targets_held=0)
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    for key in [k for k, fn in local.items() if "uattn_wrapper" in getattr(fn, "__qualname__", "")]:
        del local[key]  # the library's own function (its global table) answers again


def any_batch_size() -> None:
    """Let DeepSpeed's Ulysses attention take batches of any size. It is built for the profile's micro-batch and
    checks every call against it; a DPO batch holds twice that many rows (chosen and rejected), a reference-cache
    batch more, an epoch's last batch fewer. Its wrapper in transformers' attention table is wrapped once more, to
    set the batch size from each call's query before the check. Called after accelerate registered it."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from dpo_dist import compat

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    for key, fn in list(local.items()):
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
        uattn = next((c for c in cells if isinstance(c, UlyssesSPAttentionHF)), None)
        if uattn is None or getattr(fn, "_any_batch_size", False):
            continue
        compat.patch("deepspeed-ulysses-any-batch-size")

        def sized(module, query, key_, value, attention_mask, *args, _fn=fn, _uattn=uattn, **kwargs):
            rows = query.shape[0]  # [batch, heads, local positions, head size]
            if rows != _uattn.batch_size:
                _uattn.batch_size = rows
                for name in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
                    shape = list(getattr(_uattn, name))
                    shape[1] = rows
                    setattr(_uattn, name, torch.Size(shape))
            return _fn(module, query, key_, value, attention_mask, *args, **kwargs)

        sized._any_batch_size = True
        sized.__qualname__ = fn.__qualname__  # still recognised by release()
        local[key] = sized


def padded_length(length: int, degree: int) -> int:
    return int(math.ceil(length / degree) * degree)


def local_slice(length: int, degree: int, index: int) -> slice:
    """The positions of a `length`-long (already padded) sequence that rank `index` of `degree` holds."""
    chunk = length // degree
    return slice(index * chunk, (index + 1) * chunk)


def gather_positions(x: torch.Tensor | None, sp_group) -> torch.Tensor | None:
    """The group's parts of `x` [B, T/N, ...] joined along dim 1 into [B, T, ...], differentiably (the backward
    sums each part's gradient over the group)."""
    if x is None:
        return None
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous(), group=sp_group), dim=1)


def split_by_position(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int,
                      sp_group):
    """This rank's part of a right-padded batch: (input_ids, position_ids, next-token labels), each [B, T'/N], where
    T' is the length T padded to a multiple of N; the labels are already shifted (label at t = token t + 1, -100
    where not scored), so no part needs its neighbour's first token. Returns also T'. `attention_mask` (or None: no
    padding) only counts the real tokens this rank holds."""
    degree, index = torch.distributed.get_world_size(sp_group), torch.distributed.get_rank(sp_group)
    b, t = input_ids.shape
    total = padded_length(t, degree)
    targets = torch.nn.functional.pad(labels[:, 1:], (0, total - t + 1), value=-100)
    ids = torch.nn.functional.pad(input_ids, (0, total - t), value=pad_id)
    positions = torch.arange(total, device=input_ids.device).expand(b, total)
    part = local_slice(total, degree, index)
    real = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    _count(b * total, b * (part.stop - part.start), torch.nn.functional.pad(real, (0, total - t))[:, part],
           targets[:, part])
    return ids[:, part], positions[:, part], targets[:, part], total


def split_lm_batch(batch: dict, degree: int, index: int) -> dict:
    """Rank `index`'s part of an SFT/pretraining batch (input_ids, labels, position_ids, ...), as DeepSpeed's Ulysses
    adapter makes it: the labels become next-token `shift_labels`, every [B, T] tensor is padded at the end to a
    multiple of `degree` (ids and positions with 0, labels with -100, the mask with 0) and cut along T."""
    out = {k: v for k, v in batch.items() if k != "labels"}
    labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)
    out["shift_labels"] = labels[:, 1:]
    t = out["input_ids"].size(1)
    if "position_ids" not in out:  # Ulysses needs each token's position in the whole sequence
        out["position_ids"] = torch.arange(t).expand(out["input_ids"].size(0), t)
    total = padded_length(t, degree)
    part = local_slice(total, degree, index)
    rows = out["input_ids"].size(0)
    real = out.get("attention_mask")
    real = torch.ones(rows, t, dtype=torch.long) if real is None else real
    for key, value in out.items():
        if torch.is_tensor(value) and value.dim() >= 2 and value.size(1) == t:
            fill = -100 if key == "shift_labels" else 0
            out[key] = torch.nn.functional.pad(value, (0, total - t), value=fill)[:, part].contiguous()
    _count(rows * total, rows * (part.stop - part.start), torch.nn.functional.pad(real, (0, total - t))[:, part],
           out["shift_labels"])
    return out


class GroupBatches:
    """Wraps a training data loader so that the ranks of a sequence-parallel group run the same batches: each refill
    takes one batch from each rank's loader (its own rows, as the sampler dealt them), the group's batches are
    exchanged (as objects: their lengths differ, and gloo's tensor gather needs equal shapes), and they are handed
    out in rank order, each whole (`split` None: DPO, whose compact head splits it) or as this rank's part
    (`split_lm_batch`: SFT and pretraining). A group of N ranks thus runs N batches where N data-parallel ranks would
    run one each: the same rows per optimizer step (the accumulation is N× longer, config.profiles)."""

    def __init__(self, loader, sp_group, device, split=None, drop: int = 0):
        self.loader, self.sp_group, self.device, self.split = loader, sp_group, device, split
        self.degree = torch.distributed.get_world_size(sp_group)
        self.index = torch.distributed.get_rank(sp_group)
        self._iter = None
        self._queue: list = []
        self._drop = drop  # batches of the first refill already trained (a resume inside a refill)

    def skipped(self, count: int) -> "GroupBatches":
        """The same loader without its first `count` batches (a resumed run's trained ones): each rank's own loader
        skips the refills those took, so the ranks' loaders stay in step and the group still exchanges batches."""
        from accelerate import skip_first_batches

        inner = skip_first_batches(self.loader, count // self.degree)
        return GroupBatches(inner, self.sp_group, self.device, self.split, drop=count % self.degree)

    def __len__(self):
        return len(self.loader) * self.degree

    def __getattr__(self, name):  # the wrapped loader's attributes (sampler, dataset, batch_size, ...)
        return getattr(self.__dict__["loader"], name)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __iter__(self):
        self._iter, self._queue = iter(self.loader), []
        return self

    def __next__(self):
        if not self._queue:
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                raise
            cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
            parts = [None] * self.degree
            torch.distributed.all_gather_object(parts, cpu, group=self.sp_group)
            if self.split is not None:
                parts = [self.split(part, self.degree, self.index) for part in parts]
            self._queue = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in part.items()}
                           for part in parts][self._drop:]
            self._drop = 0
        return self._queue.pop(0)


def skip_group_batches() -> None:
    """Make the Trainer's resume skip (accelerate's skip_first_batches, which rebuilds a plain DataLoader from the
    loader's attributes) keep a GroupBatches loader a GroupBatches loader. Without this, a resumed run's ranks would
    each run their own rows through attention that joins the group's sequences."""
    import transformers.trainer as trainer_module

    from dpo_dist import compat

    original = trainer_module.skip_first_batches
    if getattr(original, "_keeps_group_batches", False):
        return
    compat.patch("transformers-skip-first-batches-group")

    def skip_first_batches(dataloader, num_batches=0):
        if isinstance(dataloader, GroupBatches):
            return dataloader.skipped(num_batches)
        return original(dataloader, num_batches)

    skip_first_batches._keeps_group_batches = True
    trainer_module.skip_first_batches = skip_first_batches
