"""Checkpoints a resume can trust, and stopping on request (Slurm preemption, SIGUSR1/SIGTERM).

- A checkpoint counts only once every rank has finished writing it. The trainer writes it to
  `checkpoints/.staging/checkpoint-N` (dpo_dist.reliability.guard); `CheckpointMarker` has every rank fsync what it
  wrote, waits for all ranks, then rank 0 renames the directory to `checkpoints/checkpoint-N`, writes `COMPLETE` (fsynced), and only
  then deletes checkpoints beyond `save_total_limit`. `latest_complete` ignores a checkpoint without the marker and
  never looks into `.staging`, so a run killed in the middle of a save resumes from the one before.
- `StopOnRequest` turns SIGUSR1 or SIGTERM on any rank, or the file named by $DPO_DIST_STOP_FILE appearing, into
  "save a checkpoint at the end of this step, then stop". The ranks agree on the step with one all-reduce per
  step, so they all save the same checkpoint. The run then exits 0 without writing its final adapter, and rank 0
  writes `<stop file>.checkpointed` naming the checkpoint, which tells a Slurm job to requeue itself.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

COMPLETE = "COMPLETE"
STAGING = ".staging"
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


def _fsync_dir(path: Path) -> None:
    try:  # make a rename durable; some network and FUSE filesystems refuse fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def staged_checkpoint(checkpoints: Path, step: int) -> Path:
    """Where checkpoint-{step} is written before it is complete."""
    return checkpoints / STAGING / f"checkpoint-{step}"


def commit_checkpoint(checkpoints: Path, step: int, keep: int | None, log=None) -> Path | None:
    """Rank 0, after every rank wrote (and fsynced) `.staging/checkpoint-{step}`: move it into place, mark it
    complete, then rotate. Returns the checkpoint, or None when nothing was staged (a plain Trainer saved it in place,
    in which case it is only marked)."""
    staged, final = staged_checkpoint(checkpoints, step), checkpoints / f"checkpoint-{step}"
    if staged.is_dir():
        if final.exists():  # a stale, unmarked copy from an interrupted run
            shutil.rmtree(final)
        os.replace(staged, final)
        _fsync_dir(checkpoints)
    if not final.is_dir():
        return None
    _write_synced(final / COMPLETE, json.dumps({"step": step}) + "\n")
    if keep:
        rotate(checkpoints, keep, log)
    return final


def rotate(checkpoints: Path, keep: int, log=None) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and unmarked leftovers older than those kept."""
    found = sorted(checkpoints.glob("checkpoint-*"), key=_step_of, reverse=True)
    complete = [c for c in found if (c / COMPLETE).is_file()]
    if not complete:
        return
    oldest_kept = _step_of(complete[:keep][-1])
    for ckpt in found:
        if ckpt in complete[:keep] or _step_of(ckpt) > oldest_kept:
            continue
        # The marker goes first: a crash in the middle of this leaves an unmarked directory, never a
        # half-deleted one that still claims to be complete.
        (ckpt / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        if log:
            log(f"[train] removed {ckpt} (save_total_limit {keep})")


def _multi_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    import torch.distributed as dist

    if _multi_rank():
        dist.barrier()


def any_rank(flag) -> bool:
    """True on every rank if it is True on any rank. `flag` is a bool, or a one-element tensor computed on the device
    (the loss guard's): it is reduced where it lies, so the answer costs one all-reduce and one host sync, not two."""
    import torch
    import torch.distributed as dist

    if not _multi_rank():
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if torch.is_tensor(flag):
        value = flag.detach().reshape(1).to(device=device, dtype=torch.int32)
    else:
        value = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class CheckpointMarker(TrainerCallback):
    """After every rank has saved checkpoint-N, rank 0 commits it (see commit_checkpoint). The Trainer's own rotation
    is off (it would delete old checkpoints before the new one is complete); `keep` replaces save_total_limit."""

    def __init__(self, keep: int | None = None, log=print):
        self.keep = keep
        self.log = log

    def on_train_begin(self, args, state, control, **kwargs):
        staging = Path(args.output_dir) / STAGING
        if state.is_world_process_zero and staging.is_dir():
            self.log(f"[train] removing {staging}: a partial checkpoint left by a save that never finished")
            shutil.rmtree(staging, ignore_errors=True)

    def on_save(self, args, state, control, **kwargs):
        staged = staged_checkpoint(Path(args.output_dir), state.global_step)
        if staged.is_dir():  # each rank flushes what it wrote: on a network file system only the writer can
            _fsync_tree(staged)
        _barrier()
        if state.is_world_process_zero:
            commit_checkpoint(Path(args.output_dir), state.global_step, self.keep, self.log)
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
        if any_rank(self.requested is not None) and state.global_step < state.max_steps:
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
