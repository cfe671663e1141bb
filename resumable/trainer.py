"""resumable for a transformers.Trainer script: verified checkpoints, signals and deadlines, backup_to.

Two lines in a script of the usual shape:

    from resumable.trainer import ResumableCallback, checkpoint_to_resume
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[ResumableCallback(max_time="3h50m")])  # added
    trainer.train(resume_from_checkpoint=checkpoint_to_resume(trainer))                                              # changed
    trainer.save_model()     # reached only when training is complete: a stopped run exits 75 inside train()

What the two lines add to the Trainer's own checkpointing (checkpoint-N = N optimizer steps, as ours):
- Commit. Once every process has written its files of checkpoint-N (the Trainer writes them in place),
  the main process fsyncs them and writes manifest.json (size and XXH3 of each) last: the commit marker.
  That runs on a thread while training goes on (Committer); a stop or the end waits for it.
  The Trainer's rotation (save_total_limit) is switched off and done here instead, after the commit,
  so the newest verified checkpoint is never deleted before the next one is verified.
- Start. checkpoint_to_resume takes OUTPUT_DIR's lock, removes what interrupted deletions left, restores
  from backup_to when it holds a newer state, and names the newest checkpoint whose every byte matches its
  manifest. A newer one without a manifest (a kill inside a save) or with damaged bytes is moved aside
  as checkpoint-N.corrupt with one line. It prints the CLI's lines (🆕 / 🔄 Found checkpoint / ✅ Resumed).
- Stop. SIGINT, SIGTERM and SIGUSR1, `max_time` and a SLURM job's end time (with the margin measured from
  real saves) make every process stop at the same optimizer step; the Trainer saves that step, it is
  committed, and the process exits 75 at the end of trainer.train(). A second Ctrl+C aborts (exit 130).
- The final step is saved too, so a kill after training but before the script's own final save resumes at
  the end and trains nothing again.
- Status. OUTPUT_DIR/trainer_state.json is kept in the CLI's form, so `./launch.sh status` reads the run.

What the Trainer decides itself and this cannot change: its data order on resume (the seedable sampler
plus skip_first_batches), its RNG files (rng_state*.pth, restored after the skipped batches), the files
inside a checkpoint and when it saves them (save_strategy); a Trainer resume is as exact as the Trainer is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from resumable import state
from resumable.errors import EXIT_DONE, EXIT_FAILED, EXIT_STOPPED_EARLY, EXIT_USAGE, UsageError
from resumable.run import refuse
from resumable.starting import Wording

TRAINER_WORDING = Wording(
    output_dir="TrainingArguments.output_dir", backup_to="ResumableCallback(backup_to=...)", resume_from="resume_from_checkpoint",
    start_fresh="move them out of the output_dir to start fresh",
    train_again="to train again from step 0, choose another output_dir",
)  # fmt: skip


class ResumableCallback(TrainerCallback):
    """Verified checkpoints, stops with a checkpoint, backups, for transformers.Trainer. Pair it with checkpoint_to_resume.

    max_time        stop with a checkpoint before this much time since the process started
                    (seconds, or '90m', '1h30m', '01:30:00'); a SLURM job's end time counts too
    backup_to       also copy each committed checkpoint to this folder or s3://bucket/prefix (pip install obstore);
                    an empty or older output_dir is restored from it at start
    backup_timeout  seconds a stop, or the end, waits for the newest checkpoint to reach backup_to
    keep_last       keep the newest K verified checkpoints (default: the Trainer's save_total_limit; None keeps all)

    Signals are caught from the moment it is made, so make it before the Trainer (a signal while the
    model loads then stops the run before its first step, with nothing lost).
    """

    def __init__(self, *, max_time: float | str | None = None, backup_to: str | None = None, backup_timeout: float = 600.0, keep_last: int | None = None):
        from resumable.stopping import StopRequests, parse_duration, process_start_time

        try:
            self.max_time = parse_duration(str(max_time), "ResumableCallback(max_time=...)") if max_time is not None else None
        except UsageError as error:
            refuse(f"error: {error}", EXIT_USAGE)
        if keep_last is not None and keep_last < 1:
            refuse("error: ResumableCallback(keep_last=...) must be at least 1: the newest checkpoint is what a resume needs", EXIT_USAGE)
        self.backup_to, self.backup_timeout, self.keep_last = backup_to, backup_timeout, keep_last
        self.started_at = process_start_time()
        self.requests = StopRequests()
        self.requests.install()
        self.trainer = None  # bound by checkpoint_to_resume
        self.start_step = 0
        self.run_history = []
        self.uploader = None
        self.stopping = None
        self.stop_reason = None
        self.committed_step = None
        self.save_reason = None
        self.save_began = None
        self.step_ended_at = None
        self.rate_from_time, self.rate_from_step = None, 0  # where the last steps/s measurement began
        self.steps_per_second = 0.0

    # ------------------------------------------------------------------ start

    def bind(self, trainer, decision) -> None:
        """checkpoint_to_resume's: the trainer whose checkpoints these are, and where it starts."""
        self.trainer, self.accelerator, self.args = trainer, trainer.accelerator, trainer.args
        self.output_dir = Path(trainer.args.output_dir)
        self.is_main = trainer.accelerator.is_main_process
        self.lock = decision.lock
        self.start_step = decision.checkpoint_state.global_step if decision.checkpoint else 0
        self.run_history = decision.run_history + [{
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": self.start_step, "world_size": trainer.accelerator.num_processes,
            "event": "resume" if decision.checkpoint else "start", "previous_stop": (decision.previous_stop or "killed or crashed") if decision.checkpoint else None,
        }]  # fmt: skip
        self.live = state.LiveState(self.output_dir, min_interval=2.0)

    def on_train_begin(self, args, state_, control, model=None, **kwargs):
        from resumable.stopping import Deadline, StopCheck

        if self.trainer is None:
            self._refuse("error: ResumableCallback: pass resume_from_checkpoint=checkpoint_to_resume(trainer) to trainer.train(...), so that the run starts from a verified checkpoint")
        if state_.global_step != self.start_step:
            self._refuse(f"error: trainer.train(...) resumed at step {state_.global_step}, not at the verified checkpoint's step {self.start_step}: "
                         "pass resume_from_checkpoint=checkpoint_to_resume(trainer)")  # fmt: skip
        if self.start_step:
            self.accelerator.print(f"✅ Resumed from checkpoint (step {self.start_step})")
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) if model is not None else 0
        self.deadline = Deadline(self.max_time, self.started_at, 1.0 + 3 * parameter_bytes / 100e6)  # until a save is measured
        if self.deadline.at is not None:
            self.accelerator.print(f"⏰ Will stop with a checkpoint before {self.deadline.describe()}")
        self.stopping = StopCheck(self.requests, self.accelerator.num_processes, self.deadline)
        if self.backup_to:
            from resumable import backup

            best = lambda: Path(state_.best_model_checkpoint).name if state_.best_model_checkpoint else None  # noqa: E731
            self.uploader = backup.start_uploader(self.accelerator, self.backup_to, self.output_dir, self.keep_last or 10**9, best)
        self.committer = Committer(self.output_dir, self.keep_last, self.uploader, self.deadline) if self.is_main else None
        self.step_ended_at = self.rate_from_time = time.monotonic()
        self.rate_from_step = state_.global_step
        if self.is_main:
            self.live.write(self._progress(state_), state_.log_history, self.run_history)

    # ------------------------------------------------------------------ each optimizer step

    def on_step_end(self, args, state_, control, **kwargs):
        now = time.monotonic()
        self.deadline.record_step(now - self.step_ended_at)
        self.step_ended_at = now
        if self.stopping.requested():  # every process, at the same step
            self.stop_reason = self.stopping.reason
            self.accelerator.print(f"\n🛑 Stopping at step {state_.global_step}: {self.stop_reason}")
            control.should_training_stop = True
            control.should_save = self.committed_step != state_.global_step
            self.save_reason = self.stop_reason
        elif state_.global_step >= state_.max_steps:
            control.should_save = True  # the last step is saved whatever save_strategy says: a kill before the script's final save loses nothing
            self.save_reason = "final step"
        elif control.should_save:
            self.save_reason = "every save_steps" if str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps" else "Trainer"
        if control.should_save:
            self.save_began = now
            if self.is_main:
                self._check_free_space(kwargs.get("model"))
        return control

    def on_epoch_end(self, args, state_, control, **kwargs):
        if control.should_save and (self.stop_reason is not None or self.committed_step == state_.global_step):
            control.should_save = False  # this step is committed already: a second save would rewrite its files in place
        elif control.should_save:
            self.save_reason, self.save_began = "every epoch", time.monotonic()
        return control

    def on_save(self, args, state_, control, **kwargs):
        """Every process, after the Trainer wrote checkpoint-N in place: the main process commits it on a thread (Committer)."""
        self.accelerator.wait_for_everyone()  # every process's files (rng_state_<rank>.pth) are written
        if self.is_main:
            self._wait_for_commit()  # the previous one (long done): commits land in step order
            protect = (state_.best_model_checkpoint,) if state_.best_model_checkpoint else ()
            self.committer.commit(self.output_dir / f"{state.CHECKPOINT_PREFIX}{state_.global_step}", state_.global_step,
                                  self.save_reason or "Trainer", self.save_began or time.monotonic(), protect)  # fmt: skip
        self.committed_step = state_.global_step  # saved: a second save of this step would rewrite its files in place
        self.save_reason = None
        self.step_ended_at = time.monotonic()  # the save is not the next step's time

    def on_log(self, args, state_, control, logs=None, **kwargs):
        now = time.monotonic()
        if state_.global_step > self.rate_from_step:
            self.steps_per_second = (state_.global_step - self.rate_from_step) / max(now - self.rate_from_time, 1e-9)
            self.rate_from_time, self.rate_from_step = now, state_.global_step
        if self.is_main:
            self.live.write_if_due(self._progress(state_), state_.log_history, self.run_history, steps_per_second=round(self.steps_per_second, 3))

    # ------------------------------------------------------------------ the end

    def on_train_end(self, args, state_, control, **kwargs):
        """A stopped run exits 75 here, every process, once its checkpoint is committed; a complete one returns to the script."""
        from resumable import backup

        self.stopping.settle()
        if self.is_main:
            self._wait_for_commit()
            state.wait_for_deletions()
        if self.stop_reason is not None:
            if self.is_main:
                self.live.write(self._progress(state_), state_.log_history, self.run_history, stop_reason=self.stop_reason)
            self.accelerator.print("▶️  To continue, run the same command again.")
            backup.wait_at_stop(self.uploader, self.backup_timeout, "ResumableCallback(backup_timeout=...)")  # a requeued job may land elsewhere
            self.accelerator.wait_for_everyone()
            self.requests.ignore_from_now()
            raise SystemExit(EXIT_STOPPED_EARLY)
        if self.is_main:
            self.live.write(self._progress(state_), state_.log_history, self.run_history, stop_reason="complete", training_complete=True)
            print(f"🏁 Training complete: {state_.global_step} steps, checkpoint-{state_.global_step} committed", flush=True)
        backup.wait_at_stop(self.uploader, self.backup_timeout, "ResumableCallback(backup_timeout=...)")
        self.accelerator.wait_for_everyone()
        self.requests.ignore_from_now()  # training is complete: a stop signal now must not kill the script's own final save half-way

    # ------------------------------------------------------------------ helpers

    def _progress(self, state_) -> state.TrainingState:
        """The Trainer's state in the CLI's trainer_state.json form, for status."""
        progress = self._progress_of(state_.global_step, state_.epoch or 0.0, state_.max_steps)
        progress.best_metric, progress.best_model_checkpoint = state_.best_metric, state_.best_model_checkpoint
        return progress

    def _progress_of(self, global_step: int, epoch: float, total_steps: int | None = None) -> state.TrainingState:
        args, world_size = self.args, self.accelerator.num_processes
        return state.TrainingState(
            global_step=global_step, total_steps=total_steps or global_step, world_size=world_size, stream_epoch=epoch,
            per_device_train_batch_size=args.per_device_train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
            global_batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        )  # fmt: skip

    def _wait_for_commit(self) -> None:
        """The last checkpoint committed; a commit that failed ends the run with one line (exit 1) and the previous checkpoint stands."""
        try:
            self.committer.wait()
        except (OSError, state.NotEnoughDiskSpace, state.SaveFailed) as error:
            self.requests.ignore_from_now()
            refuse(f"error: committing a checkpoint failed ({error}); the previous checkpoint stands: free the space or fix the disk, then run the same command again", EXIT_FAILED)

    def _check_free_space(self, model) -> None:
        """Before the Trainer writes a checkpoint (main process): one line and exit 1 if it will not fit, instead of its traceback half-way."""
        self._wait_for_commit()  # the space the last rotation frees counts
        try:
            state.check_free_space(self.output_dir, model)
        except state.NotEnoughDiskSpace as full:
            self.requests.ignore_from_now()
            refuse(f"error: {full}; the previous checkpoint stands: free some space, then run the same command again", EXIT_FAILED)

    def _refuse(self, line: str):
        self.requests.ignore_from_now()
        refuse(line, EXIT_USAGE)


class Committer:
    """The main process's commits of the Trainer's checkpoints, one at a time on a thread, so training goes on meanwhile.

    Contract. commit(checkpoint, ...) is called once every process has written its files. The thread fsyncs
    every file and writes manifest.json last (state.write_manifest): from then on the checkpoint is
    verified. Only after that does it hand the checkpoint to backup_to and rotate older ones away, and print
    the 💾 line. A checkpoint is visible to a resume only once committed: a kill before leaves it without a
    manifest, moved aside at the next start, and the previous one is still there. A commit waits for the
    one before it, so they land in step order. wait() blocks until the last one is done and raises its
    error (a full disk, a failed fsync) in the training thread, where the run ends with one line.
    The Trainer does not fsync; this is where that time (tens of ms for a small model, seconds for GBs)
    goes, off the training thread.
    """

    def __init__(self, output_dir: Path, keep_last: int | None, uploader, deadline):
        from concurrent.futures import ThreadPoolExecutor

        self.output_dir, self.keep_last, self.uploader, self.deadline = output_dir, keep_last, uploader, deadline
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
        self.pending = None

    def commit(self, checkpoint: Path, global_step: int, reason: str, began: float, protect: tuple) -> None:
        self.wait()
        self.deadline.save_in_flight = True
        self.pending = self.pool.submit(self._commit, checkpoint, global_step, reason, began, protect)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def _commit(self, checkpoint: Path, global_step: int, reason: str, began: float, protect: tuple) -> None:
        try:
            state.write_manifest(checkpoint, global_step)  # fsyncs every file, then the manifest: the commit
            if self.uploader is not None:
                self.uploader.checkpoint_ready(checkpoint)  # staged before rotation may delete it
            deleted = state.rotate_checkpoints(self.output_dir, self.keep_last, protect=protect, in_background=True) if self.keep_last else []
            seconds = time.monotonic() - began
            self.deadline.save_seconds = seconds
            gone = f", removed {', '.join(p.name for p in deleted)}" if deleted else ""
            print(f"💾 Saved {checkpoint.name} ({reason}, {seconds:.2f}s{gone})", flush=True)
        finally:
            self.deadline.save_in_flight = False


def checkpoint_to_resume(trainer) -> str | None:
    """The newest verified checkpoint of trainer.args.output_dir, for trainer.train(resume_from_checkpoint=...); None to start.

    Every process calls it (it is a collective). The main process takes the output directory's lock for
    the life of the process. A finished run whose checkpoints were cleaned away prints so and exits 0.
    """
    from resumable import starting

    callbacks = [callback for callback in trainer.callback_handler.callbacks if isinstance(callback, ResumableCallback)]
    if len(callbacks) != 1:
        refuse("error: checkpoint_to_resume(trainer): give the Trainer one ResumableCallback (Trainer(..., callbacks=[ResumableCallback()]))", EXIT_USAGE)
    callback, args = callbacks[0], trainer.args
    if args.save_only_model:
        callback._refuse("error: TrainingArguments(save_only_model=True) checkpoints hold no optimizer, scheduler or RNG state, so a resume is not the stopped run: set it to False")
    if args.ignore_data_skip:
        callback._refuse("error: TrainingArguments(ignore_data_skip=True) resumes with the epoch's first batches again, not the ones the run had left: set it to False")
    if trainer.hp_search_backend is not None:
        callback._refuse("error: ResumableCallback does not follow hyperparameter search runs (their checkpoints are in run-<id>/ folders)")
    if callback.keep_last is None:
        callback.keep_last = args.save_total_limit if args.save_total_limit and args.save_total_limit > 0 else None
    args.save_total_limit = None  # the Trainer rotates before a save is committed; ResumableCallback rotates after (keep_last)

    decision = starting.decide_start(trainer.accelerator, args.output_dir, backup_to=callback.backup_to, wording=TRAINER_WORDING, unfinished_first_save=True)
    if decision.error:
        callback._refuse(f"error: {decision.error}")
    say = trainer.accelerator.print
    for note in decision.notes:
        say(note)
    if decision.already_complete:
        say(decision.already_complete)
        callback.requests.ignore_from_now()
        raise SystemExit(EXIT_DONE)
    callback.bind(trainer, decision)
    if decision.checkpoint is None:
        say("🆕 Starting new training")
        return None
    say(f"🔄 Found checkpoint: {Path(decision.checkpoint).name}")
    recorded = json.loads((Path(decision.checkpoint) / state.TRAINER_STATE_NAME).read_text())
    if recorded.get("max_steps") and recorded.get("global_step", 0) >= recorded["max_steps"]:
        _train_nothing_but_load(trainer, callback, decision.checkpoint, recorded)
    return decision.checkpoint


def _train_nothing_but_load(trainer, callback: ResumableCallback, checkpoint: str, recorded: dict) -> None:
    """The run ended at its last step (killed before the script's own final save, or run again): trainer.train() loads
    that checkpoint's weights, as for any resume, and returns without a step, so the script's code after it writes the
    final model as the uninterrupted run did.

    Why: resumed at max_steps in the middle of an epoch, the Trainer trains one step more before it checks max_steps
    (transformers 5.24: _run_epoch checks after a step) and saves checkpoint-<max_steps + 1>, at every rerun. train()
    looks up self._inner_training_loop after it has loaded the weights: that is what is replaced, on this trainer only.
    Under DeepSpeed or FSDP the weights load inside that loop, so there the Trainer is left as it is.
    """
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return
    step = recorded["global_step"]

    def training_loop_already_done(*args, **kwargs):
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / state.TRAINER_STATE_NAME))
        if callback.is_main:
            callback.live.write(callback._progress_of(step, recorded.get("epoch") or 0.0), recorded.get("log_history", []), callback.run_history,
                                stop_reason="complete", training_complete=True)  # fmt: skip
        callback.requests.ignore_from_now()
        return TrainOutput(step, 0.0, {})

    trainer.accelerator.print(f"✅ Training is already complete ({step} of {recorded['max_steps']} steps): {Path(checkpoint).name}'s weights are loaded, nothing is trained")
    trainer._inner_training_loop = training_loop_already_done


__all__ = ["ResumableCallback", "checkpoint_to_resume"]
