"""The CLI's saves: resumable/saving.py's StepSaver, given the flags and the training log.

    CheckpointSaver.save(progress, reason)   every rank, at a step boundary; at most once per step
    CheckpointSaver.poll()                   every rank, every step boundary: a background save that
                                             became visible is rotated and reported here
    CheckpointSaver.wait()                   every rank, before a stop or the end: no save in flight

When a save is made, what waits for it and what is reported is resumable/saving.py's contract (the same
for resumable.Run); the bytes on disk are resumable/state.py's; with --async_save true the writing runs
in resumable/background_save.py, whose docstring holds that contract.
"""

from __future__ import annotations

from pathlib import Path

from cli.config import TrainingConfig
from cli.reporting import TrainingLog
from resumable.saving import StepSaver
from resumable.state import TrainingState
from resumable.stopping import Deadline


class CheckpointSaver:
    """Saves at a step boundary: every rank calls `save`, `poll` at every step boundary and `wait` before it stops.

    Rotation keeps --save_total_limit checkpoints and the best one (--metric_for_best_model);
    after each report trainer_state.json is rewritten for `./launch.sh status`.
    """

    def __init__(self, accelerator, model, config: TrainingConfig, run_args: dict, deadline: Deadline, log: TrainingLog, saved_step: int | None):
        self.config, self.run_args, self.log = config, run_args, log
        self.steps = StepSaver(
            accelerator, model, Path(config.output_dir), config.save_total_limit, deadline, saved_step,
            async_save=config.async_save, switch_name="--async_save",
            best_checkpoint=lambda: log.progress.best_model_checkpoint,
            after_report=lambda: log.write_live_state(steps_per_second=log.bar.steps_per_second()),
        )  # fmt: skip

    @property
    def backup(self):
        """--backup_to: the main process's backup.BackupUploader, set by train_loop (None elsewhere)."""
        return self.steps.backup

    @backup.setter
    def backup(self, uploader) -> None:
        self.steps.backup = uploader

    def save(self, progress: TrainingState, reason: str) -> None:
        if self.steps.saved_step == progress.global_step:
            return  # on disk already: no need for the ranks' loss sums (a collective)
        progress.unlogged_loss_sums = self.log.unlogged_loss_sums()
        self.steps.save(progress, reason, self.log.history, self.log.run_history, self.run_args)

    def poll(self) -> None:
        self.steps.poll()

    def wait(self) -> None:
        self.steps.wait()
