"""Where a run starts: the checkpoint to resume from, and how the batch is laid out on this world size.

    decide_start(config, accelerator)   the main process takes the output directory's lock, tidies
                                        up, and chooses the checkpoint; every rank gets the same answer
    plan_batches(...)                   per-rank batch and accumulation that keep a checkpoint's
                                        global batch on a different number of processes
    restore(...)                        load the checkpoint into the prepared objects and progress
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from resumable import backup
from resumable import state
from config import EXIT_DONE, EXIT_FAILED, EXIT_USAGE, TrainingConfig, UsageError
from resumable.state import TrainingState


@dataclasses.dataclass
class StartDecision:
    """What the main process decided before training; broadcast so every rank does the same."""

    error: str | None = None
    exit_code: int = EXIT_DONE
    checkpoint: str | None = None
    checkpoint_args: dict | None = None
    checkpoint_state: TrainingState | None = None  # read by every rank after the broadcast
    run_history: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    already_complete: str | None = None  # the run ended and its checkpoints were cleaned away: say so, train nothing
    lock: state.OutputDirLock | None = None  # the main process's, set after the broadcast


def _decide_on_main_process(config: TrainingConfig, lock: state.OutputDirLock) -> StartDecision:
    """Main process only: take the lock, tidy up, choose the checkpoint to resume from."""
    output_dir = Path(config.output_dir)
    if config.backup_to and (problem := backup.startup_problem(config.backup_to)):  # before anything is written
        return StartDecision(error=problem, exit_code=EXIT_USAGE)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except state.OutputDirBusy as busy:
        return StartDecision(error=f"{output_dir} is in use by another run ({busy}); wait for it or choose another --output_dir", exit_code=EXIT_USAGE)
    except OSError as error:
        return StartDecision(error=f"--output_dir {output_dir}: {error.strerror}", exit_code=EXIT_USAGE)
    decision = StartDecision()
    for leftover in state.clean_leftovers(output_dir):
        interrupted = "deletion" if leftover.name.startswith(state.DELETING_PREFIX) else "save"
        decision.notes.append(f"🧹 Removed {leftover.name}, left by a {interrupted} that was interrupted")
    cleaned_here = (state.read_live_state(output_dir) or {}).get("training_complete") and any(output_dir.glob("*.safetensors"))
    if config.backup_to and config.resume_from_checkpoint == "auto" and not cleaned_here:  # a fresh machine, or DEST ahead of OUTPUT_DIR; not a finished run whose checkpoints `clean` removed
        try:
            decision.notes += backup.restore_newer(config.backup_to, output_dir)
        except backup.BackupUnavailable as away:
            return StartDecision(error=f"could not restore from --backup_to {config.backup_to} ({away}); run the same command again", exit_code=EXIT_FAILED)
    if config.backup_to and config.resume_from_checkpoint != "auto":  # DEST must not hold a later state than the one chosen
        start_step = None if config.resume_from_checkpoint == "none" else state.checkpoint_step(Path(config.resume_from_checkpoint))
        if problem := backup.newer_than_the_start(config.backup_to, start_step):
            return StartDecision(error=problem, exit_code=EXIT_USAGE)
    live = state.read_live_state(output_dir) or {}
    decision.run_history = live.get("run_history", [])

    if config.resume_from_checkpoint == "none":
        archive, moved = state.archive_checkpoints(output_dir)
        if archive:
            decision.notes.append(f"📦 --resume_from_checkpoint none: moved {len(moved)} earlier checkpoint(s) to {archive.name}/")
        decision.run_history = []
        return decision
    if config.resume_from_checkpoint == "auto":
        try:
            chosen = state.newest_valid_checkpoint(output_dir, warn=decision.notes.append)
        except state.NoValidCheckpoint as none_valid:
            return StartDecision(
                error=f"no valid checkpoint in {output_dir} ({none_valid}); fix or move them, or pass --resume_from_checkpoint none to start fresh",
                exit_code=EXIT_USAGE,
            )
    else:
        chosen = Path(config.resume_from_checkpoint)
        try:
            state.verify_checkpoint(chosen)
        except state.CheckpointError as damaged:
            return StartDecision(error=f"--resume_from_checkpoint {chosen}: {damaged}", exit_code=EXIT_USAGE)
    if chosen is None and live.get("training_complete"):  # without this, a rerun after `./launch.sh clean` trained again from step 0
        decision.already_complete = (
            f"✅ Training in {output_dir} is already complete ({live.get('global_step')} steps) and its checkpoints are gone "
            f"(./launch.sh clean, or deleted by hand): nothing to resume, nothing trained. The final model is in {output_dir}; "
            "to train again from step 0 (overwriting it), add --resume_from_checkpoint none"
        )
    if chosen is not None:
        archive, moved = state.archive_checkpoints(output_dir, newer_than=state.checkpoint_step(chosen))
        if archive:
            decision.notes.append(f"📦 Resuming from an older checkpoint: moved {', '.join(moved)} to {archive.name}/")
        decision.checkpoint = str(chosen)
        decision.checkpoint_args = state.read_training_args(chosen)
    return decision


def decide_start(config: TrainingConfig, accelerator) -> StartDecision:
    """Decided once on the main process, which then holds the lock; the same decision on every rank."""
    from accelerate.utils import broadcast_object_list

    lock = state.OutputDirLock(Path(config.output_dir))
    decision = [_decide_on_main_process(config, lock) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    decision = decision[0]
    decision.lock = lock  # kept with the decision for the whole run; the kernel drops it when the process ends
    if decision.checkpoint:
        decision.checkpoint_state, _, _ = state.read_trainer_state(Path(decision.checkpoint) / state.TRAINER_STATE_NAME)
    return decision


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
        import streaming

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
    from config import compare_with_checkpoint

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
