"""Saving at step boundaries, for resumable.Run and the CLI: when a save is made, what waits for it, what is reported.

    StepSaver.save(progress, reason, ...)   every rank, at a step boundary; at most once per step
    StepSaver.poll()                        every rank, every step boundary: a background save that became
                                            visible is reported here
    StepSaver.wait()                        every rank, before a stop, the end or the next save: afterwards
                                            no save is in flight

A checkpoint is reported only once it is visible (committed, renamed into place): on the main process it
is handed to the backup uploader (backup_to), the checkpoints beyond the newest `keep_last` are rotated
away (state.rotate_checkpoints: never the newest, never the protected best one), the line
"💾 Saved checkpoint-N (reason, times)" is printed, and `after_report` runs (trainer_state.json for status).
A synchronous save is reported before `save` returns. With background saves (`async_save`) `save` only
snapshots the state; the save is reported at the step boundary where `poll` (or `wait`) sees it visible,
at the same step on every rank: resumable/background_save.py holds that contract. A save that cannot be
made in the background (an unsupported kind of run, too little host memory) is made synchronously, after
one warning line.

Failures: state.NotEnoughDiskSpace or state.SaveFailed, raised by `save`, `poll` or `wait` on every rank
at the same call; the earlier checkpoints are untouched. The caller ends the run with one line.
"""

from __future__ import annotations

import time
from pathlib import Path

from resumable import state


class StepSaver:
    """Saves a step's checkpoint, synchronously or in the background, and reports each one once it is visible.

    accelerator, model   the run's (model: the one the free-space check sizes the checkpoint by, or None)
    output_dir, keep_last    where checkpoints go; how many complete ones rotation keeps
    deadline             a stopping.Deadline: told how long saves take and whether one is in flight
    saved_step           the step whose checkpoint is on disk already (the resumed one), or None
    async_save           write checkpoints in the background; `switch_name` is how the user turned that
                         on (`--async_save` or `async_save`), for the warning lines
    best_checkpoint      a function naming a checkpoint rotation must keep (the best so far), or None
    after_report         called on the main process after each report
    """

    def __init__(self, accelerator, model, output_dir: Path, keep_last: int, deadline, saved_step: int | None, *,
                 async_save: bool = False, switch_name: str = "async_save", best_checkpoint=lambda: None, after_report=lambda: None):  # fmt: skip
        self.accelerator, self.model, self.output_dir, self.keep_last = accelerator, model, Path(output_dir), keep_last
        self.deadline, self.switch_name = deadline, switch_name
        self.best_checkpoint, self.after_report = best_checkpoint, after_report
        self.saved_step = saved_step  # the step whose state is on disk already (or being written), if any
        self.backup = None  # the main process's backup.BackupUploader (backup_to), set once the caller has one
        # This rank's own files for each checkpoint, {name: bytes}, taken in save() at the step being saved
        # (resumable.Run's stream position: resumable/streams.py); written by the sync and the background path alike.
        self.rank_files = dict
        self.background = None
        self.memory_checked = False
        if async_save:
            from resumable import background_save  # imports torch: not before the caller's --max_time clock starts

            reason = background_save.unsupported_reason(accelerator)
            if reason:
                accelerator.print(f"⚠️  {switch_name}: not with {reason}; saving synchronously")
            else:
                self.background = background_save.BackgroundSaver(accelerator)

    def save(self, progress: state.TrainingState, reason: str, log_history: list, run_history: list, training_args: dict) -> None:
        """checkpoint-<progress.global_step>: written now, or snapshotted now and written in the background.

        A step is saved at most once (a stop right after a save_steps save writes nothing more).
        A background save first waits for the one in flight: its buffers are the next snapshot's.
        """
        if self.saved_step == progress.global_step:
            return  # this exact state is on disk already
        rank_files = self.rank_files()  # now, at this step, on the loop's thread: never later from the writer
        if self.background is not None and self._background_fits():
            began = time.monotonic()
            self.wait()
            self.background.start(self.model, self.output_dir, progress, log_history, run_history, training_args, reason, began, rank_files)
            self.saved_step = progress.global_step
            self.deadline.save_in_flight = True
            return
        began = time.monotonic()
        path = state.save_checkpoint(self.accelerator, self.model, self.output_dir, progress, log_history, run_history, training_args, rank_files)
        self.saved_step = progress.global_step
        seconds = time.monotonic() - began
        self._report(path, reason, f"{seconds:.2f}s", seconds)

    def poll(self) -> None:
        """At every step boundary, every rank: report a background save that became visible."""
        if self.background is not None and (done := self.background.poll()):
            self._background_saved(done)

    def wait(self) -> None:
        """Every rank: return once no save is in flight (it is visible and reported, or SaveFailed was raised)."""
        if self.background is not None and (done := self.background.wait()):
            self._background_saved(done)

    def _background_fits(self) -> bool:
        """Decided once, at the first save (the optimizer's state exists by then), by every rank together."""
        if not self.memory_checked:
            self.memory_checked = True
            needed = self.background.snapshot_bytes()
            fits, available = self.background.snapshot_fits(needed)
            if not fits:
                print(f"⚠️  {self.switch_name}: a copy of the state needs {state.human_bytes(needed)} of host memory, "
                      f"{state.human_bytes(available)} is available; saving synchronously", flush=True)  # fmt: skip
            if not state._all_ranks_succeeded(self.accelerator, fits):
                self.background = None
        return self.background is not None

    def _background_saved(self, done) -> None:
        self.deadline.save_in_flight = False
        self._report(done.path, done.reason, f"loop blocked {done.blocked_seconds:.2f}s, written in {done.write_seconds:.2f}s", done.write_seconds)

    def _report(self, path: Path, reason: str, times: str, write_seconds: float) -> None:
        """A checkpoint is complete and visible: hand it to the backup, rotate and report (main process)."""
        self.deadline.save_seconds = write_seconds  # the whole write, not the loop's pause: the deadline's margin
        if self.accelerator.is_main_process:
            if self.backup is not None:
                self.backup.checkpoint_ready(path)  # staged for backup_to before rotation may delete it
            best = self.best_checkpoint()
            deleted = state.rotate_checkpoints(self.output_dir, self.keep_last, protect=(self.output_dir / best,) if best else (), in_background=True)
            gone = f", removed {', '.join(p.name for p in deleted)}" if deleted else ""
            print(f"💾 Saved {path.name} ({reason}, {times}{gone})", flush=True)
            self.after_report()
