"""What a run tells people while it trains: the progress line, log_history, trackers, the live state.

    ProgressLine    a tqdm bar on a terminal; one plain line per logging step otherwise (SLURM logs)
    TrainingLog     each entry resumable.Run logs (its on_log): to the progress line and the trackers
                    (trackers.py: TensorBoard, W&B, MLflow); Run keeps log_history and trainer_state.json
"""

from __future__ import annotations

import sys
import time

from resumable import state
from resumable.state import TrainingState
from cli.trackers import Trackers


class ProgressLine:
    """A tqdm bar on a terminal; one plain line per logging step otherwise (SLURM logs)."""

    def __init__(self, accelerator, progress: TrainingState):
        from tqdm.auto import tqdm

        self.enabled = accelerator.is_main_process
        self.interactive = self.enabled and sys.stderr.isatty()
        self.progress = progress
        self.started_at, self.started_step = time.monotonic(), progress.global_step
        self.bar = tqdm(total=progress.total_steps, initial=progress.global_step, unit="step", dynamic_ncols=True) if self.interactive else None

    def steps_per_second(self) -> float:
        elapsed = time.monotonic() - self.started_at
        return (self.progress.global_step - self.started_step) / elapsed if elapsed > 0 else 0.0

    def _speed(self) -> tuple[float, float]:
        steps_per_second = self.steps_per_second()
        eta = (self.progress.total_steps - self.progress.global_step) / steps_per_second if steps_per_second else float("nan")
        return steps_per_second, eta

    def log(self, entry: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(entry["step"] - self.bar.n)
        steps_per_second, eta = self._speed()
        samples_per_second = steps_per_second * self.progress.global_batch_size
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['learning_rate']:.2e}", samples_s=f"{samples_per_second:.1f}")
            return
        total = self.progress.total_steps
        print(
            f"step {entry['step']}/{total} ({100 * entry['step'] / total:.1f}%) epoch {entry['epoch']:.2f} "
            f"loss {entry['loss']:.4f} lr {entry['learning_rate']:.2e} {samples_per_second:.1f} samples/s ETA {state.human_duration(eta)}",
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainingLog:
    """The outlets of resumable.Run's log entries (Run(on_log=...), main process): the progress line and the trackers.

    Run keeps log_history (the loss averaged over the steps since the last line and over the ranks),
    trainer_state.json and the evaluation lines; this adds what the CLI shows besides.
    """

    def __init__(self, accelerator, progress: TrainingState, history: list, trackers: Trackers):
        self.progress = progress
        self.trackers = trackers
        trackers.catch_up(history)
        self.bar = ProgressLine(accelerator, progress)

    def on_log(self, entry: dict) -> None:
        if "loss" in entry:
            self.trackers.log({
                "train/loss": entry["loss"], "train/learning_rate": entry["learning_rate"],
                "train/samples_per_second": self.bar.steps_per_second() * self.progress.global_batch_size,
            }, step=entry["step"])  # fmt: skip
            self.bar.log(entry)  # after the trackers: once the line is out, they have this step
        else:
            self.trackers.log({name.replace("eval_", "eval/"): value for name, value in entry.items() if name.startswith("eval_")}, step=entry["step"])
