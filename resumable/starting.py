"""Where a run starts: decided once on the main process, which takes the output directory's lock; every rank gets the answer.

    decide_start(accelerator, output_dir, backup_to=..., resume_from=..., wording=...)
        the main process takes OUTPUT_DIR's lock, removes what interrupted saves and deletions left,
        restores from backup_to when that holds a newer committed state, and chooses the checkpoint:
        the newest verified one ("auto"; damaged newer ones are moved aside, one line each), none
        ("none": earlier checkpoints are moved to previous-run-<time>/), or a given one (verified;
        the ones after it move to superseded-<time>/). Every rank receives the same StartDecision.

Nothing is loaded here: resumable.Run and the CLI's resume.py load the chosen checkpoint into their objects.
Messages name the settings in the caller's words (`Wording`): the CLI's flags, or Run's arguments.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from resumable import state
from resumable.errors import EXIT_DONE, EXIT_FAILED, EXIT_USAGE


@dataclasses.dataclass(frozen=True)
class Wording:
    """How the caller's user names things, for the lines a start prints."""

    output_dir: str = "output_dir"
    backup_to: str = "backup_to"
    resume_from: str = "resume_from"
    start_fresh: str = "choose another output_dir to start fresh"
    train_again: str = "to train again from step 0, choose another output_dir"
    save_steps: str = "save_steps"
    save_minutes: str = "save_minutes"
    async_save: str = "async_save"
    backup_timeout: str = "backup_timeout"
    allow_settings_change: str = "allow_settings_change"


@dataclasses.dataclass
class StartDecision:
    """What the main process decided before training; broadcast so every rank does the same."""

    error: str | None = None
    exit_code: int = EXIT_DONE
    checkpoint: str | None = None
    checkpoint_args: dict | None = None  # its training_args.json (None in a transformers.Trainer checkpoint)
    checkpoint_state: state.TrainingState | None = None  # read by every rank after the broadcast
    run_history: list = dataclasses.field(default_factory=list)
    previous_stop: str | None = None  # why the last run ended, as it wrote it in trainer_state.json
    notes: list = dataclasses.field(default_factory=list)
    already_complete: str | None = None  # the run ended and its checkpoints were cleaned away: say so, train nothing
    lock: state.OutputDirLock | None = None  # the main process's, set after the broadcast


def decide_start(accelerator, output_dir, *, backup_to: str | None = None, resume_from: str = "auto", wording: Wording = Wording(),
                 unfinished_first_save: bool = False) -> StartDecision:
    """Decided once on the main process, which then holds the lock for the life of the process; the same decision on every rank.

    unfinished_first_save: the checkpoints are written in place (transformers.Trainer), see state.newest_valid_checkpoint.
    """
    from accelerate.utils import broadcast_object_list

    lock = state.OutputDirLock(Path(output_dir))
    decision = [_decide_on_main_process(Path(output_dir), lock, backup_to, resume_from, wording, unfinished_first_save) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    decision = decision[0]
    decision.lock = lock  # kept with the decision; the kernel drops it when the process ends
    if decision.checkpoint:
        decision.checkpoint_state, _, _ = state.read_trainer_state(Path(decision.checkpoint) / state.TRAINER_STATE_NAME)
    return decision


def _decide_on_main_process(output_dir: Path, lock: state.OutputDirLock, backup_to: str | None, resume_from: str, wording: Wording,
                            unfinished_first_save: bool = False) -> StartDecision:
    """Main process only: take the lock, tidy up, choose the checkpoint to resume from."""
    from resumable import backup

    if backup_to and (problem := backup.startup_problem(backup_to)):  # before anything is written
        return StartDecision(error=problem, exit_code=EXIT_USAGE)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except state.OutputDirBusy as busy:
        return StartDecision(error=f"{output_dir} is in use by another run ({busy}); wait for it or choose another {wording.output_dir}", exit_code=EXIT_USAGE)
    except OSError as error:
        return StartDecision(error=f"{wording.output_dir} {output_dir}: {error.strerror}", exit_code=EXIT_USAGE)
    decision = StartDecision()
    for leftover in state.clean_leftovers(output_dir):
        interrupted = "deletion" if leftover.name.startswith(state.DELETING_PREFIX) else "save"
        decision.notes.append(f"🧹 Removed {leftover.name}, left by a {interrupted} that was interrupted")
    cleaned_here = (state.read_live_state(output_dir) or {}).get("training_complete") and any(output_dir.glob("*.safetensors"))
    if backup_to and resume_from == "auto" and not cleaned_here:  # a fresh machine, or DEST ahead of OUTPUT_DIR; not a finished run whose checkpoints `clean` removed
        try:
            decision.notes += backup.restore_newer(backup_to, output_dir)
        except backup.BackupUnavailable as away:
            return StartDecision(error=f"could not restore from {wording.backup_to} {backup_to} ({away}); run the same command again", exit_code=EXIT_FAILED)
    if backup_to and resume_from != "auto":  # DEST must not hold a later state than the one chosen
        start_step = None if resume_from == "none" else state.checkpoint_step(Path(resume_from))
        if problem := backup.newer_than_the_start(backup_to, start_step):
            return StartDecision(error=problem, exit_code=EXIT_USAGE)
    live = state.read_live_state(output_dir) or {}
    decision.run_history = live.get("run_history", [])
    decision.previous_stop = live.get("stop_reason")

    if resume_from == "none":
        archive, moved = state.archive_checkpoints(output_dir)
        if archive:
            decision.notes.append(f"📦 {wording.resume_from} none: moved {len(moved)} earlier checkpoint(s) to {archive.name}/")
        decision.run_history = []
        return decision
    if resume_from == "auto":
        try:
            chosen = state.newest_valid_checkpoint(output_dir, warn=decision.notes.append, unfinished_first_save=unfinished_first_save)
        except state.NoValidCheckpoint as none_valid:
            return StartDecision(error=f"no valid checkpoint in {output_dir} ({none_valid}); fix or move them, or {wording.start_fresh}", exit_code=EXIT_USAGE)
    else:
        chosen = Path(resume_from)
        try:
            state.verify_checkpoint(chosen)
        except state.CheckpointError as damaged:
            return StartDecision(error=f"{wording.resume_from} {chosen}: {damaged}", exit_code=EXIT_USAGE)
    if chosen is None and live.get("training_complete"):  # without this, a rerun after `./launch.sh clean` trained again from step 0
        decision.already_complete = (
            f"✅ Training in {output_dir} is already complete ({live.get('global_step')} steps) and its checkpoints are gone "
            f"(./launch.sh clean, or deleted by hand): nothing to resume, nothing trained. The final model is in {output_dir}; "
            f"{wording.train_again}"
        )
    if chosen is not None:
        archive, moved = state.archive_checkpoints(output_dir, newer_than=state.checkpoint_step(chosen))
        if archive:
            decision.notes.append(f"📦 Resuming from an older checkpoint: moved {', '.join(moved)} to {archive.name}/")
        decision.checkpoint = str(chosen)
        if (chosen / state.TRAINING_ARGS_NAME).is_file():  # a transformers.Trainer checkpoint has training_args.bin instead
            decision.checkpoint_args = state.read_training_args(chosen)
    return decision
