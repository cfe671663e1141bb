"""Where a run starts: the checkpoint to resume from, and how the batch is laid out on this world size.

    decide_start(config, accelerator)   resumable.starting's: the main process takes the output directory's
                                        lock, tidies up, and chooses the checkpoint; every rank gets the same answer
    plan_batches(...)                   per-rank batch and accumulation that keep a checkpoint's
                                        global batch on a different number of processes
    restore(...)                        load the checkpoint into the prepared objects and progress
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from cli.config import TrainingConfig, UsageError
from resumable import starting, state
from resumable.starting import StartDecision
from resumable.state import TrainingState


# The library's start, in the CLI's words.
CLI_WORDING = starting.Wording(
    output_dir="--output_dir", backup_to="--backup_to", resume_from="--resume_from_checkpoint",
    start_fresh="pass --resume_from_checkpoint none to start fresh",
    train_again="to train again from step 0 (overwriting it), add --resume_from_checkpoint none",
)  # fmt: skip


def decide_start(config: TrainingConfig, accelerator) -> StartDecision:
    """resumable.starting.decide_start with the CLI's flags: decided once on the main process (which takes the lock), the same on every rank."""
    return starting.decide_start(
        accelerator, Path(config.output_dir), backup_to=config.backup_to, resume_from=config.resume_from_checkpoint, wording=CLI_WORDING
    )


@dataclasses.dataclass
class BatchPlan:
    per_device: int
    accumulation: int
    global_batch: int
    note: str | None = None


def plan_batches(config: TrainingConfig, world_size: int, checkpoint_state: TrainingState | None) -> BatchPlan:
    """Per-rank batch, accumulation and global batch; keeps a checkpoint's global batch on a new world size.

    With --streaming another number of processes is refused first (each reads its own part of the
    stream), or with --allow_config_change noted beside the layout's own note.
    """
    stream_note = None
    if config.streaming:
        from cli import streaming

        stream_note = streaming.check_world_size(checkpoint_state, world_size, config.allow_config_change)
    plan = _keep_the_global_batch(config, world_size, checkpoint_state)
    plan.note = "\n".join(filter(None, [stream_note, plan.note])) or None
    return plan


def _keep_the_global_batch(config: TrainingConfig, world_size: int, checkpoint_state: TrainingState | None) -> BatchPlan:
    per_device = config.per_device_train_batch_size
    accumulation = config.gradient_accumulation_steps
    if checkpoint_state is None or checkpoint_state.world_size == world_size:
        return BatchPlan(per_device, accumulation, per_device * accumulation * world_size)
    global_batch = checkpoint_state.global_batch_size
    per_device = checkpoint_state.per_device_train_batch_size
    if global_batch % (per_device * world_size):
        raise UsageError(
            f"the checkpoint's global batch {global_batch} cannot be split over {world_size} processes of "
            f"{per_device} samples; resume with a number of processes that divides {global_batch // per_device}, "
            "or start over with --resume_from_checkpoint none"
        )
    accumulation = global_batch // (per_device * world_size)
    note = (
        f"🔀 world size {checkpoint_state.world_size} → {world_size}: gradient accumulation "
        f"{checkpoint_state.gradient_accumulation_steps} → {accumulation}, global batch {global_batch} unchanged"
    )
    return BatchPlan(per_device, accumulation, global_batch, note)


def restore(accelerator, checkpoint: str, progress: TrainingState) -> tuple[list, list]:
    """Load model, optimizer, scheduler and RNG from `checkpoint` (every rank); put its progress into `progress`.

    Returns the checkpoint's log_history. Only progress that does not depend on the world size is
    taken over: the layout fields stay as planned for this run.
    """
    saved, log_history, _ = state.load_checkpoint(accelerator, checkpoint)
    progress.global_step = saved.global_step
    progress.unlogged_steps = saved.unlogged_steps
    progress.unlogged_loss_sums = saved.unlogged_loss_sums
    progress.best_metric, progress.best_model_checkpoint = saved.best_metric, saved.best_model_checkpoint
    return log_history


def resume_or_start(accelerator, decision: StartDecision, run_args: dict, progress: TrainingState, allow_config_change: bool, train_batches) -> list:
    """Every rank: load the chosen checkpoint into the prepared objects and `progress`, saying what it
    does; the log_history to continue (empty for a new run). A result-changing difference from the
    checkpoint's flags raises UsageError (unless allowed)."""
    from cli.config import compare_with_checkpoint

    say = accelerator.print
    if not decision.checkpoint:
        say("🆕 Starting new training")
        return []
    for note in compare_with_checkpoint(run_args, decision.checkpoint_args, allow_config_change):
        say(note)
    for note in state.software_changes(decision.checkpoint, accelerator.device.type):
        say(note)
    say(f"🔄 Found checkpoint: {Path(decision.checkpoint).name}")
    log_history = restore(accelerator, decision.checkpoint, progress)
    progress.stream_epoch = train_batches.epoch  # a stream counts its own epochs (restored with it)
    say(f"✅ Resumed from checkpoint (step {progress.global_step}, epoch {progress.epoch:.2f})")
    if progress.global_step >= progress.total_steps:
        say(f"✅ Training is already complete ({progress.global_step} of {progress.total_steps} steps); nothing to do")
    return log_history


def record_start(accelerator, decision: StartDecision, output_dir: Path, global_step: int) -> list:
    """The run history with this start appended (a start, or a resume and why the last run ended)."""
    previous_stop = None
    if decision.checkpoint and accelerator.is_main_process:
        previous_stop = (state.read_live_state(output_dir) or {}).get("stop_reason")
    return decision.run_history + [{
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": global_step, "world_size": accelerator.num_processes,
        "event": "resume" if decision.checkpoint else "start",
        "previous_stop": (previous_stop or "killed or crashed") if decision.checkpoint else None,
    }]  # fmt: skip
