"""Fault injection for the reliability tests. Off unless one of these environment variables is set.

- `DPO_DIST_KILL_AT_STEP=N[:SIGNAL][@RANK]`: when step N ends (before it is logged or saved), the process sends
  itself SIGNAL (default KILL, as a node loss would), on every rank or only on RANK.
- `DPO_DIST_FAULT=KIND@N[:RANK][,KIND@N[:RANK]...]`, KIND one of:
    save-kill     SIGKILL while checkpoint-N is being written (model files written, optimizer state not complete)
    save-enospc   "no space left on device" while checkpoint-N is being written
    nan-loss      the loss of step N is NaN (on every micro-batch of that step)
    nan-weights   a trainable weight becomes NaN at the end of step N
    hang          the process stops taking part in collectives at the end of step N (sleeps forever)
    refpass-kill  SIGKILL once the reference log-prob pass (dpo_dist.training.dpo.ref_cache) has computed its round N (one
                  batch per rank), before that round is written to the cache

Every injected fault prints one `[fault] ...` line to stderr first, with the wall-clock time, so a test can measure
how long the job took to notice.
"""
from __future__ import annotations

import errno
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from dpo_dist.distributed.ranks import rank

KILL_ENV = "DPO_DIST_KILL_AT_STEP"
FAULT_ENV = "DPO_DIST_FAULT"
KINDS = ("save-kill", "save-enospc", "nan-loss", "nan-weights", "hang", "refpass-kill")


def announce(what: str) -> None:
    print(f"[fault] rank {rank()}: {what} (t={time.time():.3f})", file=sys.stderr, flush=True)


class KillAtStep(TrainerCallback):
    """`DPO_DIST_KILL_AT_STEP=N[:SIGNAL][@RANK]` (see the module docstring)."""

    def __init__(self, spec: str):
        step, _, rest = spec.partition(":")
        name, _, rank = rest.partition("@")
        if "@" in step:  # N@RANK: the default signal on one rank
            step, rank = step.split("@", 1)
        try:
            self.step = int(step)
            self.signal = signal.Signals["SIG" + (name or "KILL").upper().removeprefix("SIG")]
            self.rank = int(rank) if rank else None
        except (ValueError, KeyError):
            raise ValueError(f"{KILL_ENV}={spec!r}: expected N, N@RANK, N:SIGNAL or N:SIGNAL@RANK "
                             "(e.g. 3, 3@1, 3:USR1, 3:TERM@1)") from None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.rank in (None, rank()):
            announce(f"{self.signal.name} at the end of step {self.step}")
            os.kill(os.getpid(), self.signal)


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None

    def due(self, kind: str, step: int) -> bool:
        return self.kind == kind and self.step == step and self.rank in (None, rank())


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        try:
            if kind not in KINDS:
                raise ValueError
            faults.append(Fault(kind, int(step), int(rank) if rank else None))
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected KIND@STEP[:RANK] with KIND one of "
                             f"{', '.join(KINDS)} (e.g. save-kill@4, nan-loss@3, hang@3:1)") from None
    return faults


class Faults(TrainerCallback):
    """The faults of `DPO_DIST_FAULT`. The trainer calls `poison_loss` and `during_save`, the reference pass
    `during_ref_pass`; the step-end faults (nan-weights, hang) run as a callback."""

    def __init__(self, spec: str | None = None):
        self.faults = parse_faults(spec if spec is not None else os.environ.get(FAULT_ENV, ""))

    def _due(self, kind: str, step: int) -> bool:
        return any(f.due(kind, step) for f in self.faults)

    def poison_loss(self, loss, step: int):
        if self._due("nan-loss", step):
            announce(f"NaN loss in step {step}")
            return loss * math.nan
        return loss

    def during_save(self, step: int, checkpoint_dir: str) -> None:
        if self._due("save-kill", step):
            announce(f"SIGKILL while writing {checkpoint_dir}")
            os.kill(os.getpid(), signal.SIGKILL)
        if self._due("save-enospc", step):
            path = Path(checkpoint_dir) / "optimizer.pt.part"
            path.write_bytes(b"\0" * 4096)  # a write that got part of the way
            announce(f"ENOSPC while writing {path}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def during_ref_pass(self, rounds_done: int) -> None:
        if self._due("refpass-kill", rounds_done):
            announce(f"SIGKILL in the reference log-prob pass, after its round {rounds_done}")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self._due("nan-weights", step) and model is not None:
            import torch

            for param in model.parameters():
                if param.requires_grad:
                    with torch.no_grad():
                        (param.to_local() if hasattr(param, "to_local") else param).fill_(math.nan)
                    announce(f"NaN written into a trainable weight at the end of step {step}")
                    break
        if self._due("hang", step):
            announce(f"hanging at the end of step {step}")
            while True:  # a rank stuck outside any collective: the others must time out
                time.sleep(3600)


def fault_callbacks(faults: Faults) -> list:
    spec = os.environ.get(KILL_ENV)
    return ([KillAtStep(spec)] if spec else []) + ([faults] if faults.faults else [])
