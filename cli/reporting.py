"""What a run tells people while it trains: the progress line, log_history, trackers, the live state.

    ProgressLine    a tqdm bar on a terminal; one plain line per logging step otherwise (SLURM logs)
    TrainingLog     the loss since the last log line, and every logged entry: into log_history
                    (saved in each checkpoint), the progress line, the trackers (trackers.py: TensorBoard,
                    W&B, MLflow), and OUTPUT_DIR/trainer_state.json for `./launch.sh status`
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

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

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, entry: dict) -> None:
        if not self.enabled:
            return
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
    """log_history and its outlets. Every rank holds one; only the main process writes files.

    The loss is summed per rank on the device between log lines (no host sync per step); a
    resume restores the sums saved in the checkpoint, so the first line after it averages
    exactly the steps an uninterrupted run would have averaged.
    """

    def __init__(self, accelerator, progress: TrainingState, history: list, run_history: list, output_dir: Path, trackers: Trackers):
        import torch

        self.accelerator = accelerator
        self.progress = progress
        self.history = history
        self.run_history = run_history
        self.live_state = state.LiveState(output_dir)
        sums, world_size = progress.unlogged_loss_sums, accelerator.num_processes
        own_sum = sums[accelerator.process_index] if len(sums) == world_size else (sum(sums) / len(sums) if sums else 0.0)
        self.unlogged_loss = torch.tensor(own_sum, dtype=torch.float32, device=accelerator.device)
        self.trackers = trackers
        trackers.catch_up(history)
        self.write_live_state()
        self.bar = ProgressLine(accelerator, progress)

    def add_step(self, loss) -> None:
        """One optimizer step done with this rank's mean loss (a tensor, not synced)."""
        self.unlogged_loss += loss
        self.progress.unlogged_steps += 1

    def log_training(self, learning_rate: float) -> None:
        """A collective: the mean loss over ranks and steps since the last line."""
        progress = self.progress
        mean_loss = self.accelerator.reduce(self.unlogged_loss, reduction="mean").item() / progress.unlogged_steps
        entry = {"step": progress.global_step, "loss": round(mean_loss, 6), "learning_rate": learning_rate, "epoch": round(progress.epoch, 4)}
        self.history.append(entry)
        self.unlogged_loss.zero_()
        progress.unlogged_steps = 0
        self.trackers.log({
            "train/loss": mean_loss, "train/learning_rate": learning_rate,
            "train/samples_per_second": self.bar.steps_per_second() * progress.global_batch_size,
        }, step=progress.global_step)  # fmt: skip
        self.bar.log(entry)  # after the trackers: once the line is out, they have this step
        if self.accelerator.is_main_process:
            self.live_state.write_if_due(progress, self.history, self.run_history, steps_per_second=self.bar.steps_per_second())

    def log_evaluation(self, metrics: dict) -> None:
        step = self.progress.global_step
        self.history.append({"step": step, **metrics, "epoch": round(self.progress.epoch, 4)})
        self.trackers.log({name.replace("eval_", "eval/"): value for name, value in metrics.items()}, step=step)
        self.accelerator.print(f"📊 step {step}: " + ", ".join(f"{name} {value}" for name, value in metrics.items()))

    def unlogged_loss_sums(self) -> list:
        """A collective: every rank's loss sum since the last line, for the checkpoint."""
        return self.accelerator.gather(self.unlogged_loss.reshape(1)).tolist()

    def write_live_state(self, **extra) -> None:
        """Rewrite trainer_state.json now (main process; the others return)."""
        if self.accelerator.is_main_process:
            self.live_state.write(self.progress, self.history, self.run_history, **extra)
