"""resumable.Run: a hand-written Accelerate loop that survives every interruption.

    run = Run(accelerator, output_dir, max_steps=..., save_steps=...)   signals are caught from here on
    run.register(ema=ema)            more state to checkpoint: anything with state_dict/load_state_dict
    run.start()                      resume from the newest verified checkpoint, or start
    for batch in run.batches(loader):    the micro-batches still to train, epoch after epoch
        ...                              forward, backward, optimizer step (the user's own)
        run.step(loss=loss)              once per optimizer step: count, log, save, maybe stop
    sys.exit(run.finish(model))      the final model; 0 when complete, 75 when stopped early

Guarantees (every rank calls every method, in the same order):
- `checkpoint-N` holds the state after N optimizer steps, whatever the gradient accumulation.
  A checkpoint is written by resumable/state.py's save_checkpoint: a temporary directory, every
  file fsynced, the manifest (size and XXH3 of each file) last, an atomic rename. Old ones are
  rotated away only after the new one is committed, and the newest is never deleted. With
  async_save=True a thread writes the same files while training goes on (resumable/saving.py,
  resumable/background_save.py); rotation, backup_to and the "Saved" line wait for the commit.
- `start` takes OUTPUT_DIR's lock (one run per directory), removes what interrupted saves left,
  and loads the newest checkpoint whose every byte matches its manifest; a damaged newer one is
  moved aside with one line. Everything registered (the accelerator's prepared models,
  optimizers, schedulers and data loaders, and `register`'s objects) must be what the checkpoint
  holds: another set is refused, never loaded into the wrong object.
- `batches` yields exactly the micro-batches an uninterrupted run would train on from here:
  each epoch's order is drawn from (the loader's seed, the epoch), the batches of the resumed
  epoch that were trained already are skipped without being loaded, and later epochs start whole.
- A SIGINT, SIGTERM or SIGUSR1 (or `max_time`, or the SLURM job's end time coming near) stops
  every rank at the same optimizer step, with a checkpoint of that step; `finish` then returns 75.
  A second Ctrl+C aborts at once with 130; the previous checkpoint stays valid.
- With `evaluate=`, every `eval_steps` steps (and at the last) the function runs on every rank before
  any save of that step; its metrics go to log_history (and `on_log`). With `best_metric=` a better value
  saves that step's checkpoint at once and rotation never deletes it (`run.best_checkpoint`).
- Misuse (an object registered after `start`, `step` skipped or called twice, the batches
  iterated twice, a loader whose order cannot be replayed) ends the process with one line naming
  the call and the fix, and exit 2. Nothing is written by a refused start.

The CLI (train_loop.py) is built on these same calls, with run.find_checkpoint() before its data (the batch
layout on another number of processes) and finish(write_model=...) for save_pretrained.

Exit codes (resumable.EXIT_*): 0 done · 2 bad use or input · 75 stopped early, run again · 130 aborted.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import time
from pathlib import Path

from resumable import state
from resumable.errors import EXIT_ABORTED, EXIT_DONE, EXIT_FAILED, EXIT_STOPPED_EARLY, EXIT_USAGE, UsageError

FINAL_MODEL_NAME = "model.safetensors"
ABORTED = "aborted"


def _in_one_line(method):
    """Expected failures of a public call end the process with one line (on the first process of each machine) and an exit code."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except UsageError as error:
            self._refuse(f"error: {error}", EXIT_USAGE)
        except (state.CheckpointError, state.NoValidCheckpoint) as error:
            self._refuse(f"error: checkpoint: {error}", EXIT_USAGE)
        except (state.NotEnoughDiskSpace, state.SaveFailed) as error:
            self._refuse(f"error: {error}", EXIT_FAILED)

    return guarded


class Run:
    """One training run in OUTPUT_DIR: where it starts, which batches it trains, when it saves and stops.

    accelerator           an accelerate.Accelerator; on a machine without GPUs build it with cpu=True, or
                          several processes are not a real process group
    output_dir            checkpoints, trainer_state.json, the lock and the final model.safetensors
    max_steps / num_epochs    how long to train: optimizer steps, or whole epochs of the first loader
    save_steps            save every N optimizer steps (and at the last one)
    save_minutes          and/or whenever this much wall time has passed since the last save
    keep_last             keep the newest K checkpoints (never fewer than one complete one)
    async_save            write each checkpoint in the background: the loop stops only to copy the state into host
                          memory, and the checkpoint is rotated, handed to backup_to and reported once it is committed
                          (resumable/background_save.py holds the contract). A stop, the end and the next save wait for
                          it. Saved synchronously instead, after one warning line: with too little host memory for the
                          copy, or under FSDP/DeepSpeed/Megatron/XLA. Objects given to register() are copied with the
                          rest, at the step
    max_time              stop with a checkpoint before this much time since the process started
                          (seconds, or '90m', '1h30m', '01:30:00'); a SLURM job's end time counts too
    settings              the run's result-defining settings (learning rate, batch size, ...; run.settings may be
                          assigned until start(), once what they name is built): recorded
                          in each checkpoint; a resume with other values is refused with a table
    allow_settings_change accept such a change knowingly (the result then differs from an uninterrupted run)
    logging_steps         every N steps, the mean of the values passed to step() (over those steps and the ranks) goes to
                          trainer_state.json's log_history
    backup_to             also copy each checkpoint and the final model to this folder or s3://bucket/prefix, in the
                          background (resumable/backup.py; pip install obstore); an empty or older output_dir is
                          restored from it at start, so a run moves to a fresh machine by running the same script
    backup_timeout        seconds a stop, or the end, waits for the newest state to reach backup_to
    evaluate              a function of no arguments returning {metric: number}, called on every rank (it may gather)
                          every eval_steps optimizer steps and at the last one, before that step's saves; the
                          metrics go to log_history. Put the model back in train mode in it
    eval_steps            how often evaluate runs (default: save_steps)
    best_metric           the metric of evaluate's that picks the best checkpoint: a better value saves the step's
                          checkpoint at once, rotation keeps it, run.best_checkpoint names it (greater_is_better)
    on_log                called on the main process with each log_history entry (a dict), for your tracker
    resume_from           "auto": the newest verified checkpoint; "none": start at step 0 (earlier checkpoints are moved
                          to OUTPUT_DIR/previous-run-<time>/, never deleted); or a checkpoint's path: resume from it
                          (verified first; the newer ones move to OUTPUT_DIR/superseded-<time>/)
    compare_settings      your own comparison of the checkpoint's settings with these: a function (before, now) that
                          raises resumable.UsageError to refuse and returns lines to print (default: the table above)
    backup_keep_last      checkpoints backup_to keeps (default: keep_last)
    stop_requests         a resumable.stopping.StopRequests installed earlier (a program that catches signals before its
                          accelerator exists); by default Run installs its own when it is made
    wording               a resumable.starting.Wording: the names of these settings in your program's messages (a CLI's flags)
    seed                  before each micro-batch the random generators (CPU and this rank's device) are seeded from
                          (seed, step, the micro-batch's place in the global batch), so that dropout and any other draw
                          in the step follow the samples, not the rank: a resume on another number of processes trains
                          the same samples with the same masks. Default: the loader's shuffle seed (data_seed), else 0
    """

    def __init__(
        self,
        accelerator,
        output_dir,
        *,
        max_steps: int | None = None,
        num_epochs: float | None = None,
        save_steps: int | None = 500,
        save_minutes: float | None = None,
        keep_last: int = 3,
        async_save: bool = False,
        max_time: float | str | None = None,
        settings: dict | None = None,
        allow_settings_change: bool = False,
        logging_steps: int = 10,
        backup_to: str | None = None,
        backup_timeout: float = 600.0,
        seed: int | None = None,
        evaluate=None,
        eval_steps: int | None = None,
        best_metric: str | None = None,
        greater_is_better: bool = True,
        on_log=None,
        resume_from: str | os.PathLike = "auto",
        compare_settings=None,
        backup_keep_last: int | None = None,
        stop_requests=None,
        wording=None,
    ):
        from resumable.stopping import StopRequests, parse_duration, process_start_time

        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.is_main = accelerator.is_main_process
        self._check_arguments(max_steps, num_epochs, save_steps, save_minutes, keep_last, async_save, logging_steps)
        self._check_evaluation(evaluate, eval_steps if eval_steps is not None else save_steps, best_metric, on_log)
        self.max_steps, self.num_epochs = max_steps, num_epochs
        self.save_steps, self.save_minutes, self.keep_last, self.async_save = save_steps, save_minutes, keep_last, async_save
        self.max_time = parse_duration(str(max_time), "max_time") if max_time is not None else None
        self.settings = dict(settings or {})
        self.allow_settings_change = allow_settings_change
        self.logging_steps = logging_steps
        self.backup_to, self.backup_timeout = backup_to, backup_timeout
        self.seed = seed  # keys each micro-batch's random draws; None: the loader's shuffle seed
        self.resume_from = str(resume_from)
        self.compare_settings = compare_settings
        self.backup_keep_last = backup_keep_last if backup_keep_last is not None else keep_last
        from resumable.starting import Wording

        self.wording = wording or Wording()
        self.decision = None  # find_checkpoint's, once made
        self.evaluate, self.eval_steps = evaluate, eval_steps if eval_steps is not None else save_steps
        self.best_metric, self.greater_is_better, self.on_log = best_metric, greater_is_better, on_log
        self.resume_notes = []  # what a resume on another number of processes changed, said before loading
        self.uploader = None  # the main process's backup.BackupUploader, with backup_to
        self.started_at = process_start_time()  # max_time counts from the process's start, imports included
        self.registered = {}  # name -> object with state_dict/load_state_dict, in registration order
        self.progress = state.TrainingState(world_size=accelerator.num_processes)
        self.log_history, self.run_history = [], []
        self.started = self.stopped = self.complete = self.already_complete = False
        self.stop_reason = None
        self.batches_started = False
        self.stream = self.resumed_checkpoint = None  # a streams.RankStream once run.batches(stream); the checkpoint start() loaded
        self.micro_batches_in_step = 0
        self.saver = None  # a saving.StepSaver, made by start(): saves, waits for background ones, rotates, reports
        self.last_save_at = time.monotonic()
        self.step_began = None
        self.values = StepValues()  # what step() was given since the last log line
        self.steps_per_second = 0.0
        self.lock = None
        # trainer_state.json for status: at log steps, but at most every 2 s (a step of a few ms logged every 10 steps
        # rewrote it ~7 times a second: 1.6 % of the loop's time in bench/library_overhead.py)
        self.live = state.LiveState(self.output_dir, min_interval=2.0)
        # At once: a signal while the model loads must not kill the process either.
        self.requests = stop_requests
        if self.requests is None:
            self.requests = StopRequests(on_abort=lambda: None)
            self.requests.install()

    # ------------------------------------------------------------------ what to checkpoint

    @_in_one_line
    def register(self, **objects) -> None:
        """Checkpoint these objects too (an EMA, a second model's extra state, the user's counters), by name.

        Each needs state_dict() and load_state_dict(); the state is saved from the main process.
        The accelerator's prepared models, optimizers, schedulers and data loaders are checkpointed
        without this. Call before start().
        """
        if self.started:
            raise UsageError(f"run.register({', '.join(objects)}) after run.start(): register every object before run.start(), so that the resume loads it")
        for name, thing in objects.items():
            if not (callable(getattr(thing, "state_dict", None)) and callable(getattr(thing, "load_state_dict", None))):
                raise UsageError(f"run.register({name}=...): a {type(thing).__name__} has no state_dict()/load_state_dict(); wrap it in an object that has both")
            if name in self.registered:
                raise UsageError(f"run.register({name}=...): {name!r} is registered already; give each object its own name")
            self.registered[name] = thing
            self.accelerator.register_for_checkpointing(thing)

    # ------------------------------------------------------------------ start or resume

    @_in_one_line
    def find_checkpoint(self):
        """Decide where the run starts, before anything is built from it. Every rank; at most once (start() reuses it).

        The main process takes OUTPUT_DIR's lock, removes what interrupted saves left, restores from backup_to
        when that is newer, and chooses the checkpoint (resume_from); every rank gets the same answer, a
        resumable.starting.StartDecision: `.checkpoint` (its path, or None), `.checkpoint_state` (its progress:
        world_size, global_batch_size, ... e.g. to size a schedule the same way), `.already_complete`.
        Nothing is loaded. A start that cannot be made ends the process with one line (exit 2, or 1).
        """
        if self.decision is None:
            from resumable import starting

            decision = starting.decide_start(self.accelerator, self.output_dir, backup_to=self.backup_to, resume_from=self.resume_from, wording=self.wording)
            if decision.error:
                self._refuse(f"error: {decision.error}", decision.exit_code)
            self.decision = decision
            self.lock = decision.lock
        return self.decision

    @_in_one_line
    def start(self) -> "Run":
        """Resume from the newest verified checkpoint in OUTPUT_DIR, or start at step 0. Every rank.

        Prints what it does (🆕 Starting new training / 🔄 Found checkpoint / ✅ Resumed). Call after
        accelerator.prepare(...) and register(...), before batches().
        """
        if self.started:
            raise UsageError("run.start() called twice: call it once, before the loop")
        self.started = True
        say = self.accelerator.print
        decision = self.find_checkpoint()
        for note in decision.notes:
            say(note)
        self.run_history = decision.run_history
        checkpoint = decision.checkpoint
        saved_step = None
        if decision.already_complete:  # finished, and its checkpoints cleaned away: the final model stays as it is
            say(decision.already_complete)
            self.already_complete = True
        elif checkpoint is None:
            say("🆕 Starting new training")
        else:
            self._check_against_checkpoint(Path(checkpoint))
            for note in self.resume_notes + state.software_changes(checkpoint, self.accelerator.device.type):
                say(note)
            say(f"🔄 Found checkpoint: {Path(checkpoint).name}")
            saved, self.log_history, _ = state.load_checkpoint(self.accelerator, checkpoint)
            # accelerate's save_state keeps its micro-batch counter, which accelerator.accumulate syncs on every K-th
            # of: a checkpoint is a step boundary, and with another accumulation (an elastic resume) the saved count
            # would put the next sync mid-step.
            self.accelerator.step = 0
            self.progress.global_step = saved.global_step
            saved_step = saved.global_step
            self.resumed_checkpoint = Path(checkpoint)  # a stream's position is loaded from it when run.batches(stream) comes
            # The log line after a resume averages exactly the steps the uninterrupted run's line did.
            self.values = StepValues(self._own_unlogged_sums(saved.unlogged_values, saved.world_size), saved.unlogged_steps)
            self.progress.best_metric, self.progress.best_model_checkpoint = saved.best_metric, saved.best_model_checkpoint
            say(f"✅ Resumed from checkpoint (step {self.progress.global_step}, epoch {saved.epoch:.2f})")
        self.run_history = self.run_history + [{
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": self.progress.global_step, "world_size": self.accelerator.num_processes,
            "event": "resume" if checkpoint else "start", "previous_stop": (decision.previous_stop or "killed or crashed") if checkpoint else None,
        }]  # fmt: skip
        self._start_stopping()
        self.objects_at_start = self._objects_record()
        if self.backup_to:
            from resumable import backup

            self.uploader = backup.start_uploader(self.accelerator, self.backup_to, self.output_dir, self.backup_keep_last, lambda: self.progress.best_model_checkpoint)
        self._start_saving(saved_step)
        return self

    def _start_saving(self, saved_step: int | None) -> None:
        from resumable.saving import StepSaver

        self.saver = StepSaver(
            self.accelerator, self.accelerator._models[0] if self.accelerator._models else None, self.output_dir, self.keep_last,
            self.deadline, saved_step, async_save=self.async_save, switch_name=self.wording.async_save,
            best_checkpoint=lambda: self.progress.best_model_checkpoint,
            after_report=lambda: self.live.write(self.progress, self.log_history, self.run_history, steps_per_second=round(self.steps_per_second, 3)),
        )  # fmt: skip
        self.saver.backup = self.uploader

    def _objects_record(self) -> dict:
        """What this run checkpoints: how many of each prepared kind, and the registered names in order."""
        accelerator = self.accelerator
        return {
            "models": len(accelerator._models), "optimizers": len(accelerator._optimizers), "schedulers": len(accelerator._schedulers),
            "dataloaders": len(accelerator._dataloaders), "registered": list(self.registered),
        }  # fmt: skip

    def _run_record(self) -> dict:
        """training_args.json of each checkpoint: the settings, the objects, the data order and the step's meaning."""
        from resumable.batches import data_order_seed

        return {
            "settings": self.settings, "objects": self._objects_record(),
            "data_order_seeds": [data_order_seed(loader) for loader in self.accelerator._dataloaders],
            "batch_sizes": [getattr(getattr(loader, "batch_sampler", None), "batch_size", None) for loader in self.accelerator._dataloaders],
            "gradient_accumulation_steps": self.accelerator.gradient_accumulation_steps, "world_size": self.accelerator.num_processes,
        }  # fmt: skip

    def _check_against_checkpoint(self, checkpoint: Path) -> None:
        """Refuse another set of objects, data order or settings than the checkpoint's (before anything is loaded)."""
        from resumable import streams

        recorded = state.read_training_args(checkpoint)
        now = self._run_record()
        if "objects" not in recorded:  # the CLI's checkpoints before it ran on Run: its flags, flat
            recorded = {"settings": state.recorded_settings(recorded), "world_size": recorded["world_size"], "gradient_accumulation_steps": recorded["gradient_accumulation_steps"],
                        "objects": now["objects"], "data_order_seeds": now["data_order_seeds"]}  # fmt: skip
        if recorded.get("objects") != now["objects"]:
            raise UsageError(
                f"{checkpoint.name} holds {describe_objects(recorded.get('objects') or {})}, this run has {describe_objects(now['objects'])}: "
                "prepare and register the same objects, in the same order, as the run that wrote it (or choose another output_dir to start fresh)"
            )
        if recorded["world_size"] != now["world_size"] and (checkpoint / streams.STREAM_STATE_PATTERN.format(rank=0)).is_file():
            if self.allow_settings_change:  # each rank starts the checkpoint's epoch of its part afresh (streams.RankStream.load)
                self.resume_notes.append(
                    f"⚠️  {self.wording.allow_settings_change}: {recorded['world_size']} → {now['world_size']} processes; each of the {now['world_size']} "
                    "processes starts its part of the checkpoint's current epoch from the beginning (examples already trained on in that "
                    "epoch are trained on again)"
                )
            else:
                raise UsageError(
                    f"{checkpoint.name} was written by {recorded['world_size']} process(es), each reading its own part of a stream, this run has "
                    f"{now['world_size']}: each position belongs to its process; resume with {recorded['world_size']} (or choose another output_dir to start fresh)"
                )
        if recorded["world_size"] * recorded["gradient_accumulation_steps"] != now["world_size"] * now["gradient_accumulation_steps"]:
            self._keep_the_global_batch(checkpoint, recorded["world_size"], recorded["gradient_accumulation_steps"])
        self._compare_settings(recorded.get("settings") or {})
        if self.allow_settings_change:
            return  # another batch size or shuffle seed is a change the user accepted (a settings table names it, if recorded)
        if recorded.get("batch_sizes", now["batch_sizes"]) != now["batch_sizes"]:
            raise UsageError(
                f"the data loaders' per-process batch sizes {now['batch_sizes']} differ from the checkpoint's {recorded['batch_sizes']}, so "
                "the resumed steps would not train the samples the run skipped: build them with the checkpoint's batch sizes"
            )
        seeds_then, seeds_now = recorded.get("data_order_seeds"), now["data_order_seeds"]
        if seeds_then != seeds_now:
            raise UsageError(
                f"the data loaders' shuffle seeds {seeds_now} differ from the checkpoint's {seeds_then}, so the resumed batches would not be "
                "the ones the run skipped: seed them (DataLoaderConfiguration(use_seedable_sampler=True, data_seed=SEED), or "
                "accelerate.utils.set_seed(SEED) before accelerator.prepare)"
            )

    def _compare_settings(self, before: dict) -> None:
        """The settings first: a changed seed or batch size is refused with the table that names it, before the checks below."""
        from resumable.settings import refuse_changed_settings

        current = self.settings
        if self.compare_settings is not None:  # the caller's own rules (the CLI's flags); it refuses with UsageError
            self.resume_notes += list(self.compare_settings(before, current))
            return
        changed = [name for name in sorted(set(before) | set(current), key=str) if before.get(name) != current.get(name)]
        if self.allow_settings_change:
            if changed:
                self.accelerator.print(f"⚠️  {self.wording.allow_settings_change}: {', '.join(map(str, changed))} differ from the checkpoint; the result will differ from an uninterrupted run")
            return
        refuse_changed_settings(changed, before, current, "settings", "", "Run with the checkpoint's values, or pass allow_settings_change=True to accept the change knowingly.")

    def _keep_the_global_batch(self, checkpoint: Path, world_then: int, accumulation_then: int) -> None:
        """Another number of processes than the checkpoint's: the same micro-batches per optimizer step, by gradient accumulation.

        The checkpoint's micro-batches per step (processes x accumulation) are kept on every resume, also when
        the accelerator was built with another accumulation (the same command after an elastic resume): the
        accumulation is set here, with a line saying so. To change the global batch, start a new output_dir.
        The prepared loaders deal each epoch's per-device batches round-robin over the ranks, so a step of
        W processes x A slots trains the global batches [s*A*W, (s+1)*A*W) in any layout with the same A*W:
        the same samples, each with the same random draws (seeded per micro-batch). Only the order in which
        the gradients are summed changes (an all-reduce against accumulation): equal to rounding.
        """
        world_now = self.accelerator.num_processes
        micro_batches = world_then * accumulation_then
        if micro_batches % world_now:
            layouts = ", ".join(str(n) for n in range(1, micro_batches + 1) if micro_batches % n == 0)
            raise UsageError(
                f"{checkpoint.name} was written by {world_then} process(es) x gradient accumulation {accumulation_then}: {micro_batches} "
                f"micro-batch(es) per optimizer step, which {world_now} processes cannot share equally; resume with {layouts} "
                "process(es) (or choose another output_dir to start fresh)"
            )
        accumulation_built, accumulation_now = self.accelerator.gradient_accumulation_steps, micro_batches // world_now
        self.accelerator.gradient_accumulation_steps = accumulation_now  # accelerator.accumulate and backward's loss scaling follow it
        if world_then != world_now:
            change = f"world size {world_then} → {world_now}: gradient accumulation {accumulation_then} → {accumulation_now}"
        else:
            change = f"gradient accumulation {accumulation_built} → {accumulation_now} (the checkpoint's, on {world_now} process(es))"
        self.resume_notes.append(f"🔀 {change}, {micro_batches} micro-batches per optimizer step unchanged")

    def _start_stopping(self) -> None:
        from resumable.stopping import Deadline, StopCheck

        parameter_bytes = sum(p.numel() * p.element_size() for model in self.accelerator._models for p in model.parameters() if p.requires_grad)
        estimated_save_seconds = 1.0 + 3 * parameter_bytes / 100e6  # weights + two Adam moments at ~100 MB/s, until a save is measured
        self.deadline = Deadline(self.max_time, self.started_at, estimated_save_seconds)
        if self.deadline.at is not None:
            self.accelerator.print(f"⏰ Will stop with a checkpoint before {self.deadline.describe()}")
        self.stopping = StopCheck(self.requests, self.accelerator.num_processes, self.deadline)

    # ------------------------------------------------------------------ the batches

    def batches(self, dataloader):
        """The micro-batches still to train, epoch after epoch, until max_steps (or num_epochs) or a stop.

        Each yielded item is what the prepared loader yields. With gradient accumulation
        (Accelerator(gradient_accumulation_steps=K)) an optimizer step takes K of them, and
        run.step() is called once after the K-th (when accelerator.sync_gradients is True).
        Or a stream, not prepared: this rank's micro-batches from an iterable with state_dict()/load_state_dict()
        (torchdata's StatefulDataLoader, or a DataLoader(num_workers=0) over such an IterableDataset), which
        each checkpoint holds per rank; max_steps ends it (resumable/streams.py holds the contract).
        """
        self._check_batches_may_begin(dataloader)
        return self._micro_batches(dataloader)

    @_in_one_line
    def _check_batches_may_begin(self, dataloader) -> None:
        from resumable import streams
        from resumable.batches import data_order_seed, resumability_problem, steps_per_epoch, total_steps

        if not self.started:
            raise UsageError("run.batches(...) before run.start(): call run.start() first, so that the batches begin at the resumed step")
        if self.batches_started:
            raise UsageError("run.batches(...) started a second time: iterate it once; it runs every remaining epoch by itself")
        self.accumulation = self.accelerator.gradient_accumulation_steps
        if streams.is_stream(dataloader):
            self.stream = streams.begin(dataloader, self.accelerator, self.resumed_checkpoint, self.num_epochs, self.allow_settings_change)
            self.saver.rank_files = self.stream.checkpoint_files  # every checkpoint holds each rank's position at its step
            self.progress.stream_epoch = self.stream.reported_epoch
            self.steps_per_epoch, total = 0, self.max_steps  # no known length
            self.micro_batch_seed = self.seed if self.seed is not None else 0
        else:
            if problem := resumability_problem(dataloader):
                raise UsageError(f"run.batches(dataloader): {problem}")
            if dataloader not in self.accelerator._dataloaders:
                raise UsageError("run.batches(dataloader): pass the loader that accelerator.prepare(...) returned")
            streams.refuse_stream_checkpoint(self.resumed_checkpoint)
            self.steps_per_epoch = steps_per_epoch(dataloader, self.accumulation, self.accelerator.num_processes)
            self.micro_batch_seed = self.seed if self.seed is not None else (data_order_seed(dataloader) or 0)
            if self.steps_per_epoch == 0:
                raise UsageError(f"run.batches(dataloader): one epoch has {len(dataloader)} batches on each process, fewer than one optimizer step of {self.accumulation}")
            total = total_steps(self.max_steps, self.num_epochs, self.steps_per_epoch)
        self.batches_started = True
        self.progress.total_steps, self.progress.steps_per_epoch = total, self.steps_per_epoch
        self.progress.gradient_accumulation_steps = self.accumulation
        self.progress.per_device_train_batch_size = getattr(dataloader, "batch_size", None) or getattr(getattr(dataloader, "batch_sampler", None), "batch_size", 0)
        self.progress.global_batch_size = self.progress.per_device_train_batch_size * self.accumulation * self.accelerator.num_processes
        if self.progress.global_step >= total:
            self.accelerator.print(f"✅ Training is already complete ({self.progress.global_step} of {total} steps); nothing to do")
        if self.is_main and not self.already_complete:  # status shows the run from its start: this start in run_history, its length
            self.live.write(self.progress, self.log_history, self.run_history)

    def _micro_batches(self, dataloader):
        from resumable.randomness import MicroBatchSeeding

        if self.already_complete:
            return
        if self.stopping.requested(at_step_boundary=False):  # signalled while loading: the last checkpoint stands
            self._stop_here()
            return
        self.step_began = self.last_log_at = time.monotonic()
        seeding = MicroBatchSeeding(self.micro_batch_seed, self.accelerator.process_index, self.accelerator.num_processes, self.accelerator.device)
        try:
            for batch in self._remaining_micro_batches(dataloader):
                if self.stopped:  # run.step() agreed to stop after the previous micro-batch
                    return
                if self.micro_batches_in_step == self.accumulation:
                    self._refuse(f"error: run.step() was not called after step {self.progress.global_step + 1}'s {self.accumulation} micro-batch(es): call it once after each optimizer step", EXIT_USAGE)
                seeding.before(self.progress.global_step + 1, self.micro_batches_in_step)
                self.micro_batches_in_step += 1
                yield batch
        except UsageError as error:  # a stream's epoch that yielded no batch
            self._refuse(f"error: {error}", EXIT_USAGE)
        if self.stopped:
            return
        if self.micro_batches_in_step:
            self._refuse(f"error: run.step() was not called after step {self.progress.global_step + 1}'s micro-batches: call it once after each optimizer step", EXIT_USAGE)

    def _remaining_micro_batches(self, dataloader):
        """An iterator over the micro-batches to train, epoch after epoch, from the resume point on."""
        if self.stream is not None:
            return self._stream_micro_batches()
        # chain.from_iterable: each micro-batch passes through no Python frame of its own (a generator per batch
        # costs µs between two model steps); the next epoch's iterator is made when this one is used up.
        return itertools.chain.from_iterable(self._epochs_to_train(dataloader))

    def _epochs_to_train(self, dataloader):
        from resumable.batches import micro_batches_of_epoch

        while not self.stopped and self.progress.global_step < self.progress.total_steps:
            epoch, steps_done_in_epoch = divmod(self.progress.global_step, self.steps_per_epoch)
            steps_to_take = min(self.steps_per_epoch - steps_done_in_epoch, self.progress.total_steps - self.progress.global_step)
            yield micro_batches_of_epoch(dataloader, epoch, steps_done_in_epoch, steps_to_take, self.accumulation)

    def _stream_micro_batches(self):
        for batch in self.stream.micro_batches(until=lambda: self.stopped or self.progress.global_step >= self.progress.total_steps):
            self.progress.stream_epoch = self.stream.reported_epoch  # trainer_state.json's epoch: the main process's passes completed
            yield batch

    # ------------------------------------------------------------------ the per-step call

    @_in_one_line
    def step(self, **values) -> bool:
        """Once after each optimizer step, every rank: count it, log `values`, save when due, stop when asked.

        Returns True when the loop is to end here (a stop, or the last step): the batches end by
        themselves, so a loop that ignores it is right too. Values (floats or tensors, e.g. loss=)
        are averaged over the steps between log lines and over the ranks, into trainer_state.json.
        """
        if not self.batches_started:
            raise UsageError("run.step() before any batch: iterate run.batches(loader) and call run.step() after each optimizer step")
        if self.micro_batches_in_step != self.accumulation:
            twice = self.micro_batches_in_step == 0
            raise UsageError(
                f"run.step() {'called twice in one step' if twice else f'after {self.micro_batches_in_step} of the {self.accumulation} micro-batches of a step'}: "
                "call it once per optimizer step (with accumulation, when accelerator.sync_gradients is True)"
            )
        self.micro_batches_in_step = 0
        progress = self.progress
        progress.global_step += 1
        self.values.add(values)
        now = time.monotonic()
        self.deadline.record_step(now - self.step_began)
        self.step_began = now
        last_step = progress.global_step >= progress.total_steps
        if progress.global_step % self.logging_steps == 0 or last_step:
            self._log()
        if self.evaluate is not None and (progress.global_step % self.eval_steps == 0 or last_step):
            self._evaluate()
        save_due = self.save_minutes is not None and now - self.last_save_at >= self.save_minutes * 60
        self.saver.poll()  # a background save that finished becomes visible here (every rank, same step)
        stop, save_due = self.stopping.requested_with(save_due)
        if stop:
            self._stop_here()
            return True
        if last_step or save_due or (self.save_steps and progress.global_step % self.save_steps == 0):
            self._save("final step" if last_step else f"every {self.wording.save_minutes}" if save_due else f"every {self.wording.save_steps}")
        return last_step

    def _log(self) -> None:
        """Every rank (a collective): each value's mean over the steps since the last line and over the ranks."""
        if not self.values.steps:
            return
        sums = self.values.sums()
        if sums and self.accelerator.num_processes > 1:
            sums = dict(zip(sums, self.accelerator.reduce(self._sums_tensor(sums), reduction="mean").tolist()))
        entry = {"step": self.progress.global_step, "epoch": round(self.progress.epoch, 4)}
        entry.update({name: round(total / self.values.steps, 6) for name, total in sums.items()})
        now = time.monotonic()
        self.steps_per_second = self.values.steps / max(now - self.last_log_at, 1e-9)
        self.values, self.last_log_at = StepValues(), now
        self._record(entry)

    def _record(self, entry: dict) -> None:
        self.log_history.append(entry)
        if self.is_main:
            if self.on_log is not None:
                self.on_log(dict(entry))
            self.live.write_if_due(self.progress, self.log_history, self.run_history, steps_per_second=round(self.steps_per_second, 3))

    def _sums_tensor(self, sums: dict):
        import torch

        return torch.tensor(list(sums.values()), dtype=torch.float64, device=self.accelerator.device)

    def _unlogged_sums_of_every_rank(self) -> dict:
        """Every rank (a collective): {name: [each rank's sum since the last line]}, for the checkpoint."""
        sums = self.values.sums()
        if not sums:
            return {}
        if self.accelerator.num_processes == 1:
            return {name: [total] for name, total in sums.items()}
        gathered = self.accelerator.gather(self._sums_tensor(sums).reshape(1, -1)).reshape(-1, len(sums)).tolist()
        return {name: [row[column] for row in gathered] for column, name in enumerate(sums)}

    def _own_unlogged_sums(self, saved: dict, saved_world_size: int) -> dict:
        """This rank's share of the checkpoint's unlogged sums: its own on the same number of processes, else their mean
        (which keeps the mean over ranks the next line reports)."""
        own = {}
        for name, sums in saved.items():
            if not isinstance(sums, list):  # written before the sums were kept per rank: the main process's alone
                own[name] = float(sums)
            elif len(sums) == self.accelerator.num_processes == saved_world_size:
                own[name] = sums[self.accelerator.process_index]
            else:
                own[name] = sum(sums) / len(sums)
        return own

    def _evaluate(self) -> None:
        """Every rank: the user's evaluate(), logged; a better best_metric saves this step's checkpoint at once."""
        metrics = self.evaluate()
        if not isinstance(metrics, dict) or not all(isinstance(value, (int, float)) or hasattr(value, "item") for value in metrics.values()):
            raise UsageError(f"Run(evaluate=...) returned {type(metrics).__name__} {str(metrics)[:80]}: return a dict of numbers, e.g. {{'accuracy': 0.93}}")
        metrics = {name: round(float(value), 6) for name, value in metrics.items()}
        step = self.progress.global_step
        self._record({"step": step, "epoch": round(self.progress.epoch, 4), **metrics})
        self.accelerator.print(f"📊 step {step}: " + ", ".join(f"{name} {value}" for name, value in metrics.items()))
        if self.best_metric is None:
            return
        if self.best_metric not in metrics:
            raise UsageError(f"Run(best_metric={self.best_metric!r}): evaluate() returned {sorted(metrics)}; name one of them, or return {self.best_metric!r} too")
        value, best = metrics[self.best_metric], self.progress.best_metric
        if best is None or (value > best if self.greater_is_better else value < best):
            self.progress.best_metric, self.progress.best_model_checkpoint = value, f"{state.CHECKPOINT_PREFIX}{step}"
            self._save(f"best {self.best_metric} so far")  # the best must exist as a checkpoint, whatever save_steps is

    def _save(self, reason: str) -> None:
        """Every rank: checkpoint-<global_step>, committed (or, with async_save, snapshotted and committed in the background)."""
        if self._objects_record() != self.objects_at_start:
            raise UsageError("accelerator.prepare(...) or accelerator.register_for_checkpointing(...) after run.start(): prepare and register everything before run.start()")
        if self.saver.saved_step == self.progress.global_step:
            return  # on disk already (a best checkpoint, then save_steps): no need for the ranks' sums (a collective)
        self.progress.unlogged_values = self._unlogged_sums_of_every_rank()
        self.progress.unlogged_steps = self.values.steps
        self.saver.save(self.progress, reason, self.log_history, self.run_history, self._run_record())
        self.last_save_at = time.monotonic()

    def _stop_here(self) -> None:
        """Every rank, at the same step boundary: save this step and end the batches."""
        self.stopped = True
        self.stop_reason = self.stopping.reason
        self.accelerator.print(f"\n🛑 Stopping at step {self.progress.global_step}: {self.stop_reason}")
        if self.progress.global_step > 0:
            self._save(self.stop_reason)
        self.saver.wait()  # the stop's save, or one still in flight: committed before the exit
        self.stopping.settle()

    # ------------------------------------------------------------------ the end

    @_in_one_line
    def finish(self, models=None, *, write_model=None) -> int:
        """Every rank: end the run; returns the exit code (0 complete, 75 stopped early: run again).

        When complete, the final weights go to OUTPUT_DIR/model.safetensors, written atomically:
        `models` is one model (its state dict as is) or a dict {name: model} (keys prefixed `name.`).
        Or `write_model`, a function of no arguments called on every rank in that place (after the last
        checkpoint is committed, before trainer_state.json says the run is complete), writes it your way
        (save_pretrained with a tokenizer, say); it must leave a *.safetensors in OUTPUT_DIR.
        """
        if not self.started:
            raise UsageError("run.finish() before run.start(): call run.start(), then iterate run.batches(loader)")
        code = self._finish(models, write_model)
        self.requests.ignore_from_now()  # a stop signal arriving during exit must not kill a finished run
        return code

    def _finish(self, models, write_model=None) -> int:
        say = self.accelerator.print
        if self.already_complete:
            return EXIT_DONE  # the final model in OUTPUT_DIR is the finished run's: nothing is trained or written
        if self.stopped:
            if self.is_main:
                state.wait_for_deletions()
                self.live.write(self.progress, self.log_history, self.run_history, stop_reason=self.stop_reason)
            say("▶️  To continue, run the same command again.")
            if self.uploader is not None:
                from resumable import backup

                backup.wait_at_stop(self.uploader, self.backup_timeout, self.wording.backup_timeout)  # a requeued job may land on another machine
            return EXIT_STOPPED_EARLY
        if not self.batches_started or self.progress.global_step < self.progress.total_steps:
            raise UsageError(f"run.finish() at step {self.progress.global_step} of {self.progress.total_steps or '?'}: iterate run.batches(loader) to its end first")
        self.stopping.settle()
        self._save("final step")
        self.saver.wait()
        named = models if isinstance(models, dict) else ({"": models} if models is not None else {})
        weights = {}
        for name, model in named.items():
            for key, tensor in self.accelerator.get_state_dict(model).items():  # a collective under FSDP / ZeRO-3: every rank
                weights[f"{name}.{key}" if name else key] = tensor
        if write_model is not None:
            write_model()
        self.accelerator.wait_for_everyone()
        if self.is_main:
            if weights:
                write_weights_atomically(weights, self.output_dir / FINAL_MODEL_NAME)
            state.wait_for_deletions()  # a failed deletion of an old checkpoint is reported, not lost at exit
            self.live.write(self.progress, self.log_history, self.run_history, stop_reason="complete", training_complete=True)
            print(f"🏁 Training complete: {self.progress.total_steps} steps. Final model in {self.output_dir}", flush=True)
        code = EXIT_DONE
        if self.uploader is not None:
            from resumable import backup

            code = backup.finish(self.uploader, self.backup_timeout, self.progress.global_step, EXIT_DONE, EXIT_FAILED, self.wording.backup_timeout)  # 0 only once backup_to holds the final model
        self.accelerator.wait_for_everyone()
        self.complete = code == EXIT_DONE
        return code

    @property
    def total_steps(self) -> int:
        """The optimizer steps the run trains in all (known once run.batches(...) has begun)."""
        return self.progress.total_steps

    @property
    def global_step(self) -> int:
        """Optimizer steps completed (a resumed run counts on from its checkpoint's)."""
        return self.progress.global_step

    @property
    def best_checkpoint(self) -> Path | None:
        """The checkpoint of the best evaluation so far (best_metric), or None."""
        name = self.progress.best_model_checkpoint
        return self.output_dir / name if name else None

    @property
    def epoch(self) -> float:
        return self.progress.epoch

    # ------------------------------------------------------------------ helpers

    def _refuse(self, line: str, code: int):
        self.requests.ignore_from_now()
        refuse(line, code)

    @staticmethod
    def _check_evaluation(evaluate, eval_steps, best_metric, on_log) -> None:
        def refuse_arguments(message):
            refuse(f"error: resumable.Run(...): {message}", EXIT_USAGE)

        if evaluate is not None and not callable(evaluate):
            refuse_arguments("evaluate must be a function of no arguments returning {metric: number}")
        if evaluate is not None and not eval_steps:
            refuse_arguments("evaluate needs eval_steps (or save_steps) to say how often it runs")
        if best_metric is not None and evaluate is None:
            refuse_arguments(f"best_metric={best_metric!r} needs evaluate=, the function that measures it")
        if on_log is not None and not callable(on_log):
            refuse_arguments("on_log must be a function taking one log entry (a dict)")

    @staticmethod
    def _check_arguments(max_steps, num_epochs, save_steps, save_minutes, keep_last, async_save, logging_steps) -> None:
        def refuse_arguments(message):
            refuse(f"error: resumable.Run(...): {message}", EXIT_USAGE)

        if (max_steps is None) == (num_epochs is None):
            refuse_arguments("give max_steps or num_epochs (one of them)")
        if max_steps is not None and max_steps <= 0 or num_epochs is not None and num_epochs <= 0:
            refuse_arguments("max_steps and num_epochs must be positive")
        if save_steps is not None and save_steps <= 0 or save_minutes is not None and save_minutes <= 0:
            refuse_arguments("save_steps and save_minutes must be positive (or None for never)")
        if keep_last < 1:
            refuse_arguments("keep_last must be at least 1: the newest checkpoint is what a resume needs")
        if not isinstance(async_save, bool):
            refuse_arguments(f"async_save must be True or False, not {async_save!r}")
        if logging_steps < 1:
            refuse_arguments("logging_steps must be at least 1")


class StepValues:
    """The values run.step() was given since the last log line: this rank's sum of each, in float64, added in step order.

    A number on the CPU is read at its step (`.item()`: no wait, and no tensor kept). A tensor on a GPU is kept as it
    is until a log line or a save needs the sums: reading it at its step would make the host wait for that step's
    kernels (a host-device sync per step). Read at once, then added one by one in step order, the sums of a resumed
    run (which start from the checkpoint's sums) are the uninterrupted run's to the last bit.
    """

    FOLD_EVERY = 1000  # steps: bounds the tensors held when log lines are far apart

    def __init__(self, sums: dict | None = None, steps: int = 0):
        self.totals = dict(sums or {})
        self.pending = {name: [] for name in self.totals}  # per name, the values not yet added to its total
        self.steps = steps

    def add(self, values: dict) -> None:
        for name, value in values.items():
            pending = self.pending.get(name)
            if pending is None:
                pending = self.pending[name] = []
                self.totals[name] = 0.0
            if not hasattr(value, "detach"):
                pending.append(float(value))
            elif value.is_cpu:
                if value.numel() != 1:
                    raise _batch_of_numbers(name, value.numel())
                pending.append(float(value.item()))  # float(): an integer tensor's item() is an int
            else:
                pending.append(value.detach())
        self.steps += 1
        if self.steps % self.FOLD_EVERY == 0:
            self._fold()

    def sums(self) -> dict:
        """{name: this rank's sum}, by name."""
        self._fold()
        return {name: self.totals[name] for name in sorted(self.totals)}

    def _fold(self) -> None:
        for name, pending in self.pending.items():
            tensors = [value for value in pending if not isinstance(value, float)]
            if tensors:
                if any(tensor.numel() != 1 for tensor in tensors):
                    raise _batch_of_numbers(name, max(tensor.numel() for tensor in tensors))
                import torch

                read = iter(torch.stack(tensors).reshape(-1).tolist())  # all of them in one copy to the host
                pending = [value if isinstance(value, float) else next(read) for value in pending]
            total = self.totals[name]
            for value in pending:
                total += value
            self.totals[name] = total
            self.pending[name] = []


def _batch_of_numbers(name: str, numbers: int) -> UsageError:
    return UsageError(f"run.step({name}=...) was given a tensor of {numbers} numbers: pass one number per step (loss=loss, not a batch of losses)")


def refuse(line: str, code: int):
    """End the process with `line` on stderr, printed once per machine (every rank meets the same misuse), and `code`."""
    if os.environ.get("LOCAL_RANK", "0") == "0":  # set by accelerate launch / torchrun
        print(line, file=sys.stderr, flush=True)
    raise SystemExit(code)


def describe_objects(record: dict) -> str:
    kinds = [f"{record.get(kind, 0)} {kind[:-1]}(s)" for kind in ("models", "optimizers", "schedulers", "dataloaders")]
    registered = record.get("registered") or []
    return ", ".join(kinds) + (f" and registered {registered}" if registered else " and nothing registered")


def write_weights_atomically(weights: dict, path: Path) -> None:
    """safetensors file at `path`: written beside it, fsynced, renamed. Tensors that share memory (tied weights) are copied."""
    from safetensors.torch import save_file

    storages, tensors = set(), {}
    for key, tensor in weights.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()  # safetensors refuses shared storage; the bytes are the same
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata={"format": "pt"})
    state._fsync_path(temporary)
    os.replace(temporary, path)
    state._fsync_path(path.parent)


__all__ = ["Run", "EXIT_DONE", "EXIT_FAILED", "EXIT_USAGE", "EXIT_STOPPED_EARLY", "EXIT_ABORTED"]
