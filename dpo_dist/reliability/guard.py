"""Failing fast and loud, and never keeping bad state: what the stage trainers add to TRL's.

- Checkpoints are written to `checkpoints/.staging/checkpoint-N` and only renamed into place, fsynced and marked
  COMPLETE (dpo_dist.reliability.checkpoints.CheckpointMarker) once every rank has written its part. A crash or a full disk
  during a save leaves the previous checkpoints untouched; a failed save is one clear error.
- A non-finite loss is caught before its gradients reach the weights. It is checked once per optimizer step: each
  micro-batch's loss stays on the device, and the step's last micro-batch, before its backward, asks all ranks at once
  (one host sync and one all-reduce per step). `train.on_nonfinite_loss: stop` (the default) stops, naming the step and
  the last good checkpoint; `skip` drops that optimizer step's update and goes on, at most `train.max_nonfinite_skips`
  times. The advice in the message fits the run: bf16 only where the GPU computes it natively (not on a V100).
- Weights with NaN/inf are never saved, as a checkpoint or as the final adapter/model.
- A collective that does not finish within the profile's `collective_timeout_s`, or a peer rank that vanished,
  becomes an error saying which rank, which step, and what to look at.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import types
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from dpo_dist.reliability.checkpoints import STAGING, any_rank, latest_complete, staged_checkpoint
from dpo_dist.reliability.faults import Faults
from dpo_dist.distributed.devices import bf16_native, local_tensor
from dpo_dist.distributed.ranks import is_main_process, rank


class TrainingFault(RuntimeError):
    """A failure the run diagnosed itself: the message says what happened and what to do. Exit code 1."""


class NonFiniteLoss(TrainingFault):
    pass


class NonFiniteWeights(TrainingFault):
    pass


class CheckpointSaveError(TrainingFault):
    pass


class CollectiveFailure(TrainingFault):
    pass


@dataclass
class Guard:
    """What one stage's trainer needs to know to protect its run (passed narrowly, not the whole recipe)."""
    stage: str
    run_dir: Path
    on_nonfinite_loss: str = "stop"
    max_nonfinite_skips: int = 10
    collective_timeout_s: int = 1800
    faults: Faults = field(default_factory=Faults)
    log: object = print
    # What the advice in the messages depends on. None: GuardedTrainer.train fills in fp16 and skip_available from its
    # own arguments and backend; bf16_available is asked of the GPU (bf16_native) only when a message is written.
    fp16: bool | None = None
    bf16_available: bool | None = None
    skip_available: bool | None = None  # False under DeepSpeed, which refuses on_nonfinite_loss: skip
    skipped_steps: list[int] = field(default_factory=list)
    _skip_pending: bool = False
    _losses: list = field(default_factory=list, repr=False)  # this step's micro-batch losses, on their device

    def last_good(self) -> str:
        found = latest_complete(self.run_dir)
        return str(found) if found else "none (no checkpoint was saved yet)"

    # ---- non-finite loss ------------------------------------------------------------------------------------------
    # Once per optimizer step, not per micro-batch: reading a flag on the host waits for the GPU, and agreeing on it is
    # an all-reduce. Each micro-batch's loss is kept on its device (note_loss); the step's last micro-batch decides for
    # all of them (check_step) before its own backward, because DeepSpeed's engine applies the update inside that
    # backward. The earlier micro-batches' backwards only accumulate gradients: a stop never applies them, and a skip
    # drops them with the zero_grad that follows the step.
    def note_loss(self, loss) -> None:
        """Every training micro-batch: keep its loss (detached, on its device; nothing is read on the host)."""
        self._losses.append(loss.detach().reshape(-1))

    def check_step(self, step: int) -> None:
        """The step's last micro-batch, before its backward. Collective: one host sync and one all-reduce. Raises
        NonFiniteLoss, or marks the step to be skipped, if any micro-batch of the step had a non-finite loss on any
        rank."""
        import torch

        if not self._losses:
            return
        losses = torch.cat(self._losses) if len(self._losses) > 1 else self._losses[0]
        self._losses = []
        finite = torch.isfinite(losses)
        if not any_rank(~finite.all()):
            return
        local_bad = not bool(finite.all())  # only on the bad path: reading the values is a sync
        value = f"{losses[~finite][0].float().item()}" if local_bad else None
        self._bad_step(step, value)

    def check_loss(self, loss, step: int) -> None:
        """One loss that is its step's only micro-batch (note_loss, then check_step)."""
        self.note_loss(loss)
        self.check_step(step)

    def _bad_step(self, step: int, value: str | None) -> None:
        if self._skip_pending:  # this step is already being skipped
            return
        if self.on_nonfinite_loss == "skip" and len(self.skipped_steps) < self.max_nonfinite_skips:
            self._skip_pending = True
            self.skipped_steps.append(step)
            if is_main_process():
                self.log(f"[train] {self.stage} step {step}: {_what(value)}; skipping this step's update "
                         f"(on_nonfinite_loss: skip, {len(self.skipped_steps)} of at most {self.max_nonfinite_skips})")
            return
        if self.on_nonfinite_loss == "skip":
            raise NonFiniteLoss(
                f"{self.stage} step {step}: {_what(value)} again after {len(self.skipped_steps)} skipped "
                f"steps ({', '.join(map(str, self.skipped_steps))}), the limit set by train.max_nonfinite_skips; the "
                f"run is diverging. No weights were changed by this step. Last good checkpoint: {self.last_good()}. "
                f"{self.remedy()}, then run again with --resume")
        skip = ("To skip such steps instead, set train.on_nonfinite_loss: skip in the recipe" if self.skip_available
                is not False else "(train.on_nonfinite_loss: skip is not available under DeepSpeed)")
        raise NonFiniteLoss(
            f"{self.stage} step {step}: {_what(value)}; stopped before the optimizer "
            f"step, so no weights were changed. Last good checkpoint: {self.last_good()}. {self.remedy()}. {skip}, "
            "then run again with --resume")

    def remedy(self) -> str:
        """What to change so that the run stays finite, for this run's precision and GPU: bf16 only where the GPU
        computes it natively; on a V100 in fp16, what works there."""
        lr = "lower train.learning_rate or raise train.warmup_steps/train.warmup_ratio"
        if not self.fp16:
            return f"Usual causes: too high a learning rate ({lr}), a broken row in this step's data"
        bf16 = self.bf16_available if self.bf16_available is not None else bf16_native()
        if bf16:
            return ("Usual causes: fp16 overflow (this GPU computes bf16 natively: train in bf16 instead, with "
                    f"train.bf16: true and train.fp16: false, or a bf16 launch profile), too high a learning rate "
                    f"({lr}), a broken row in this step's data")
        return ("Usual cause: fp16 overflow. This GPU has no native bf16, so stay in fp16 and "
                f"{lr}; keep gradient clipping on (train.max_grad_norm > 0); check this step's rows for a broken one. "
                "fp16's gradient scaler skips a step whose gradients overflow by itself (and lowers its scale), but "
                "a non-finite loss overflowed in the forward pass, before the scaler")

    def take_skip(self) -> bool:
        """True once per skipped step: the optimizer must not apply this step's gradients."""
        pending, self._skip_pending = self._skip_pending, False
        return pending

    def end_step(self, step: int | None = None) -> None:
        """At every step end. Under fp16 the gradient scaler itself declines to call optimizer.step for NaN gradients,
        so the skip may never be taken: it must not carry over to the next, good step."""
        self._skip_pending = False
        if self._losses:  # the step's check never ran: its update was applied unchecked
            self._losses = []
            raise RuntimeError(
                f"{self.stage} step {step}: the non-finite loss check did not run before the optimizer step. "
                "GuardedTrainer.compute_loss checks on the micro-batch where accelerator.sync_gradients is True, which "
                "the Trainer sets before each training_step (transformers 5); this transformers version does not")

    # ---- weights --------------------------------------------------------------------------------------------------
    def check_weights(self, model, step: int, what: str) -> None:
        """Collective: raise on every rank if any rank holds a non-finite trainable weight."""
        import torch


        bad = next((name for name, p in model.named_parameters()
                    if p.requires_grad and not bool(torch.isfinite(local_tensor(p).detach()).all())), None)
        if any_rank(bad is not None):
            where = f"{bad} on rank {rank()}" if bad else "another rank's weights"
            raise NonFiniteWeights(
                f"{self.stage} step {step}: trainable weights hold NaN/inf ({where}); not saving {what}. Last good "
                f"checkpoint: {self.last_good()}. {self.remedy()}, then run again with --resume")

    # ---- saving ---------------------------------------------------------------------------------------------------
    def save_failed(self, err: BaseException, step: int, checkpoint_dir: Path) -> CheckpointSaveError:
        # The partial directory is left alone: other ranks may still be writing into it. It is never resumed from, and
        # CheckpointMarker deletes it when the run starts again.
        code = getattr(err, "errno", None)
        what = f" ({errno.errorcode[code]})" if code in errno.errorcode else ""
        reason = (getattr(err, "strerror", None) or _first_line(err)) + what
        try:
            usage = shutil.disk_usage(self.run_dir)
            space = f"; {usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB there"
        except OSError:
            space = ""
        hint = ("Free disk space (or lower train.save_total_limit)" if code in (errno.ENOSPC, errno.EDQUOT)
                or "space" in reason.lower() or "write failed" in reason.lower() else "Fix the cause")
        return CheckpointSaveError(
            f"{self.stage}: saving checkpoint-{step} failed on rank {rank()}: {reason}, writing "
            f"{getattr(err, 'filename', None) or checkpoint_dir}{space}. The previous checkpoints are intact and the "
            f"partial one is never used; last good checkpoint: {self.last_good()}. {hint}, then run again with "
            "--resume")

    # ---- collectives ----------------------------------------------------------------------------------------------
    def explain(self, err: BaseException, step: int) -> CollectiveFailure | None:
        """A CollectiveFailure for a timed-out collective or a vanished peer rank, else None."""
        import torch.distributed as dist

        if isinstance(err, TrainingFault) or not (dist.is_available() and dist.is_initialized()):
            return None
        chain = list(_chain(err))
        if not any(isinstance(e, dist.DistError) or _BACKEND.search(str(e)) for e in chain):
            return None  # not from a collective: a hub timeout or a file system error keeps its own message
        text = " | ".join(str(e) for e in chain)
        first = _first_line(err)
        if _TIMEOUT.search(text):
            return CollectiveFailure(
                f"rank {rank()}: a collective operation did not finish within collective_timeout_s="
                f"{self.collective_timeout_s} s during {self.stage} step {step}: another rank is hung or died; its "
                f"log says which and why. Last good checkpoint: {self.last_good()}; restart with --resume. If a step "
                "legitimately takes longer (a slow save or evaluation), raise collective_timeout_s in the launch "
                f"profile. (error: {first})")
        if _PEER_LOST.search(text):
            return CollectiveFailure(
                f"rank {rank()}: another rank disconnected during {self.stage} step {step} (it was killed or "
                f"crashed; its log says why). Last good checkpoint: {self.last_good()}; restart with --resume. "
                f"(error: {first})")
        return None


_BACKEND = re.compile(r"gloo|nccl|c10d|ProcessGroup|distributed", re.IGNORECASE)
_TIMEOUT = re.compile(r"timed out|timeout|watchdog caught collective operation", re.IGNORECASE)
_PEER_LOST = re.compile(r"connection (closed|reset) by peer|broken pipe|connection refused|"
                        r"read error|ECONNRESET|EPIPE|recv.*failed|peer.*(closed|disconnected)", re.IGNORECASE)


def _what(value: str | None) -> str:
    return (f"non-finite loss ({value}) on rank {rank()}" if value is not None
            else f"rank {rank()}: another rank saw a non-finite loss")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def is_write_failure(err: BaseException) -> bool:
    """A checkpoint write that failed in the file system: OSError from Python writers, torch.save's RuntimeError
    ("file write failed"), or torch.distributed.checkpoint's CheckpointException (a BaseException) wrapping either."""
    for e in _chain(err):
        if isinstance(e, OSError) or _WRITE.search(str(e)):
            return True
    return False


_WRITE = re.compile(r"file write failed|No space left|Disk quota|Input/output error|Read-only file system|"
                    r"inline_container", re.IGNORECASE)


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


class GuardedTrainer:
    """Mixin placed before TRL's trainer class: staged checkpoint saves, the loss guard and the skip.

    Relies on three Trainer hooks (transformers 5): `_save_checkpoint` writes under `_get_output_dir()`,
    `_save_optimizer_and_scheduler` runs inside it, and `create_optimizer` builds the optimizer. The e2e tests in
    tests/test_faults.py fail if any of them stops being used (no .staging directory, no injected fault, no skip)."""

    guard: Guard | None = None
    _staging = False

    def train(self, *args, **kwargs):
        if self.guard is not None:  # the facts the guard's advice depends on, where the caller left them open
            if self.guard.fp16 is None:
                self.guard.fp16 = bool(self.args.fp16)
            if self.guard.skip_available is None:
                self.guard.skip_available = not getattr(self, "is_deepspeed_enabled", False)
        return super().train(*args, **kwargs)

    # compat: transformers-trainer-staged-checkpoints
    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if self._staging else out

    def _save_checkpoint(self, model, trial):
        if self.guard is None:
            return super()._save_checkpoint(model, trial)
        step = self.state.global_step
        self.guard.check_weights(self.model, step, f"checkpoint-{step}")
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        except BaseException as err:  # torch.distributed.checkpoint raises a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)) or not is_write_failure(err):
                raise
            raise self.guard.save_failed(err, step, staged_checkpoint(Path(self.args.output_dir), step)) from err
        finally:
            self._staging = False

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.guard is not None:
            self.guard.faults.during_save(self.state.global_step, output_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if self.guard is None or not model.training:
            return out
        step = self.state.global_step + 1  # the step this micro-batch belongs to
        loss = self.guard.faults.poison_loss(out[0] if return_outputs else out, step)
        self.guard.note_loss(loss)
        # compat: transformers-trainer-loss-guard
        # The Trainer sets sync_gradients before each training_step (transformers 5, Trainer._run_epoch): True on the
        # step's last micro-batch, whose backward comes next and, under DeepSpeed, applies the update.
        if self.accelerator.sync_gradients:
            self.guard.check_step(step)
        return (loss, *out[1:]) if return_outputs else loss

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.guard is not None and not hasattr(optimizer, "_dpo_dist_guarded"):
            guard, step = self.guard, optimizer.step

            def guarded_step(opt, *a, **k):
                if guard.take_skip():
                    return None  # the gradients are dropped by the zero_grad that follows every step
                return step(*a, **k)

            # Bound as a method, as the original is (code that wraps an optimizer's step may use its __func__).
            optimizer.step = types.MethodType(guarded_step, optimizer)
            optimizer._dpo_dist_guarded = True
        return optimizer


class GuardCallback(TrainerCallback):
    def __init__(self, guard: Guard):
        self.guard = guard

    def on_step_end(self, args, state, control, **kwargs):
        self.guard.end_step(state.global_step)
