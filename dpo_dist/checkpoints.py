"""Checkpoints a resume can trust, and stopping on request (Slurm preemption, SIGUSR1/SIGTERM).

- A checkpoint counts only once every rank has finished writing it: `CheckpointMarker` waits for all ranks after
  each save, then rank 0 writes `checkpoint-N/COMPLETE` (flushed and fsynced). `latest_complete` ignores a
  checkpoint without it, so a run killed in the middle of a save resumes from the one before.
- `StopOnRequest` turns SIGUSR1 or SIGTERM on any rank, or the file named by $DPO_DIST_STOP_FILE appearing, into
  "save a checkpoint at the end of this step, then stop". The ranks agree on the step with one all-reduce per
  step, so they all save the same checkpoint. The run then exits 0 without writing its final adapter, and rank 0
  writes `<stop file>.checkpointed` naming the checkpoint, which tells a Slurm job to requeue itself.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from transformers import TrainerCallback

COMPLETE = "COMPLETE"
STOP_FILE_ENV = "DPO_DIST_STOP_FILE"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def latest_complete(run_dir: Path, log=None) -> Path | None:
    """The newest `checkpoints/checkpoint-N` that every rank finished writing, or None."""
    found = sorted((Path(run_dir) / "checkpoints").glob("checkpoint-*"), key=_step_of, reverse=True)
    for ckpt in found:
        if (ckpt / COMPLETE).is_file():
            return ckpt
        if log:
            log(f"[train] skipping {ckpt}: it has no {COMPLETE} marker (the run stopped while writing it)")
    return None


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename durable; some network and FUSE filesystems refuse fsync on a directory
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _multi_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    import torch.distributed as dist

    if _multi_rank():
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank."""
    import torch
    import torch.distributed as dist

    if not _multi_rank():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class CheckpointMarker(TrainerCallback):
    """After every rank has saved checkpoint-N, rank 0 marks it complete."""

    def on_save(self, args, state, control, **kwargs):
        _barrier()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            _write_synced(ckpt / COMPLETE, json.dumps({"step": state.global_step}) + "\n")
        _barrier()


class StopOnRequest(TrainerCallback):
    """Checkpoint and stop at the end of the step in which a stop was requested (signal or stop file)."""

    def __init__(self, stage: str, log=print):
        self.stage = stage
        self.log = log
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict = {}

    def _on_signal(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested is None and self.stop_file and os.path.exists(self.stop_file):
            self.requested = f"stop file {self.stop_file}"
        if _any_rank(self.requested is not None) and state.global_step < state.max_steps:
            # (at the last step the run is ending anyway: let it save its final adapter)
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                self.log(f"[train] stop requested ({self.requested or 'by another rank'}): saving checkpoint-"
                         f"{state.global_step} of {self.stage}, then exiting")
        return control

    def acknowledge(self, checkpoint: Path) -> None:
        """Rank 0, after the checkpoint is complete: tell whoever asked (a Slurm job) that it can requeue."""
        if self.stop_file:
            _write_synced(Path(self.stop_file + ".checkpointed"),
                          json.dumps({"stage": self.stage, "checkpoint": str(checkpoint)}) + "\n")
