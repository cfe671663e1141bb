"""Saving at step boundaries: when the loop asks, what it waits for, what it reports.

    CheckpointSaver.save(progress, reason)   every rank, at a step boundary; at most once per step
    CheckpointSaver.poll()                   every rank, every step boundary: a background save that
                                             became visible is rotated and reported here
    CheckpointSaver.wait()                   every rank, before a stop or the end: no save in flight

The bytes on disk are state.py's (save_checkpoint, rotate_checkpoints); with --async_save true the
writing runs in resumable/background_save.py, whose docstring holds that contract.
"""

from __future__ import annotations

import time
from pathlib import Path

from resumable import state
from config import TrainingConfig
from reporting import TrainingLog
from resumable.state import TrainingState
from resumable.stopping import Deadline


class CheckpointSaver:
    """Saves at a step boundary: every rank calls `save`, `poll` at every step boundary and `wait` before it stops.

    A step is saved at most once (a stop right after a --save_steps save writes nothing more).
    With --async_save true, `save` only snapshots the state and a background thread writes it
    (resumable/background_save.py holds the contract); the checkpoint is rotated and reported when `poll`
    or `wait` sees it visible. A second save waits for the first. The save's duration (the
    whole write, not the loop's pause) feeds the deadline's margin.
    """

    def __init__(self, accelerator, model, config: TrainingConfig, run_args: dict, deadline: Deadline, log: TrainingLog, saved_step: int | None):
        self.accelerator, self.model, self.config, self.run_args = accelerator, model, config, run_args
        self.deadline, self.log = deadline, log
        self.saved_step = saved_step  # the step whose state is on disk already (or being written), if any
        self.background = None
        self.backup = None  # --backup_to: the main process's backup.BackupUploader, set by train_loop
        self.memory_checked = False
        if config.async_save:
            from resumable import background_save  # imports torch: not before main() starts the --max_time clock

            reason = background_save.unsupported_reason(accelerator)
            if reason:
                accelerator.print(f"⚠️  --async_save: not with {reason}; saving synchronously")
            else:
                self.background = background_save.BackgroundSaver(accelerator)

    def save(self, progress: TrainingState, reason: str) -> None:
        if self.saved_step == progress.global_step:
            return  # this exact state is on disk already
        output_dir = Path(self.config.output_dir)
        progress.unlogged_loss_sums = self.log.unlogged_loss_sums()
        if self.background is not None and self.background_fits():
            began = time.monotonic()
            self.wait()  # one save at a time: its buffers are the next snapshot's
            self.background.start(self.model, output_dir, progress, self.log.history, self.log.run_history, self.run_args, reason, began)
            self.saved_step = progress.global_step
            self.deadline.save_in_flight = True
            return
        began = time.monotonic()
        path = state.save_checkpoint(self.accelerator, self.model, output_dir, progress, self.log.history, self.log.run_history, self.run_args)
        self.saved_step = progress.global_step
        seconds = time.monotonic() - began
        self.saved(path, reason, f"{seconds:.2f}s", seconds)

    def poll(self) -> None:
        """At every step boundary, every rank: report a background save that became visible."""
        if self.background is not None and (done := self.background.poll()):
            self.background_saved(done)

    def wait(self) -> None:
        """Every rank: return once no save is in flight (it is visible, or SaveFailed was raised)."""
        if self.background is not None and (done := self.background.wait()):
            self.background_saved(done)

    def background_fits(self) -> bool:
        """Decided once, at the first save (the optimizer's state exists by then), by every rank together."""
        if not self.memory_checked:
            self.memory_checked = True
            needed = self.background.snapshot_bytes()
            fits, available = self.background.snapshot_fits(needed)
            if not fits:
                print(f"⚠️  --async_save: a copy of the state needs {state.human_bytes(needed)} of host memory, "
                      f"{state.human_bytes(available)} is available; saving synchronously", flush=True)  # fmt: skip
            if not state._all_ranks_succeeded(self.accelerator, fits):
                self.background = None
        return self.background is not None

    def background_saved(self, done) -> None:
        self.deadline.save_in_flight = False
        self.saved(done.path, done.reason, f"loop blocked {done.blocked_seconds:.2f}s, written in {done.write_seconds:.2f}s", done.write_seconds)

    def saved(self, path: Path, reason: str, times: str, write_seconds: float) -> None:
        """A checkpoint is complete and visible: rotate (main process) and report."""
        self.deadline.save_seconds = write_seconds
        if self.accelerator.is_main_process:
            if self.backup is not None:
                self.backup.checkpoint_ready(path)  # staged for --backup_to before rotation may delete it
            output_dir = Path(self.config.output_dir)
            best = (output_dir / self.log.progress.best_model_checkpoint,) if self.log.progress.best_model_checkpoint else ()
            deleted = state.rotate_checkpoints(output_dir, self.config.save_total_limit, protect=best, in_background=True)
            gone = f", removed {', '.join(p.name for p in deleted)}" if deleted else ""
            self.accelerator.print(f"💾 Saved {path.name} ({reason}, {times}{gone})")
            self.log.write_live_state(steps_per_second=self.log.bar.steps_per_second())
