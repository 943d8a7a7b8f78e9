"""This process's place in the job, as its launcher set it: torchrun, `accelerate launch`, the deepspeed launcher and
the Slurm driver all export RANK, LOCAL_RANK and WORLD_SIZE. Every dpo_dist module asks here; nothing else reads them
(data/cache.py, a layer below, only records RANK's text in a lock file)."""
from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0
