"""The split of an SFT/pretraining batch along the sequence (dpo_dist.distributed.sequence.split_lm_batch): the parts
of a group's ranks join back into the whole batch, padded to a multiple of the group size, with next-token labels.
Training under sequence parallelism on real ranks is tested in tests/test_distributed.py."""
from __future__ import annotations

import torch

from dpo_dist.distributed import sequence


def test_the_parts_join_into_the_padded_batch_with_next_token_labels():
    ids = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 0, 0]])
    labels = torch.tensor([[-100, -100, 13, 14, 15], [-100, 22, 23, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    sequence.POSITIONS.update(whole=0, held=0, real_held=0, targets_held=0)
    try:
        parts = [sequence.split_lm_batch({"input_ids": ids, "labels": labels, "attention_mask": mask}, 2, i)
                 for i in range(2)]
        counted = {k: int(v) for k, v in sequence.POSITIONS.items()}
    finally:
        sequence.POSITIONS.update(whole=0, held=0, real_held=0, targets_held=0)
    assert all("labels" not in p and p["input_ids"].shape == (2, 3) for p in parts)
    joined = {k: torch.cat([p[k] for p in parts], dim=1) for k in ("input_ids", "shift_labels", "position_ids",
                                                                  "attention_mask")}
    assert joined["input_ids"].tolist() == [[11, 12, 13, 14, 15, 0], [21, 22, 23, 0, 0, 0]]
    # the target of position t is token t + 1: the part boundary needs no token from the next part
    assert joined["shift_labels"].tolist() == [[-100, 13, 14, 15, -100, -100], [22, 23, -100, -100, -100, -100]]
    assert joined["position_ids"][:, :5].tolist() == [list(range(5))] * 2
    assert joined["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    # both parts counted (here in one process): 12 padded positions twice, 6 held each, 8 real, 5 targets
    assert counted == {"whole": 24, "held": 12, "real_held": 8, "targets_held": 5}
