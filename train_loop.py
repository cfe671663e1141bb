"""resumable: a training loop that survives every interruption.

Run it, kill it any way you like, run the same command again: training continues at
the exact sample where the newest complete checkpoint was taken, and the final weights
are the same, bit for bit (on CPU), as those of a run that was never interrupted.

    python train_loop.py [flags]                      one process
    accelerate launch train_loop.py [flags]           as configured
    ./launch.sh [--retries N] [flags]                 the user's entry point

This file is the run itself: `main()` sets up, resumes, trains and ends; `train_step()` is
the numerics of one optimizer step. The rest lives in files named for it: config.py (flags),
model.py (what is trained; --model_module for your own), data.py, stopping.py (signals,
deadlines), resume.py (where to start), state.py (every byte on disk), reporting.py (logs).

Exit codes: 0 done (or already done) · 1 failed · 2 bad command line or input, nothing
written · 75 stopped early with a fresh checkpoint, run again to continue · 130 aborted
by a second Ctrl+C (the previous checkpoint stays valid).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import time
from pathlib import Path

from resumable import backup
from cli import lora
from cli import resume
from resumable import state
from cli.config import EXIT_ABORTED, EXIT_DONE, EXIT_FAILED, EXIT_STOPPED_EARLY, EXIT_USAGE, TrainingConfig, UsageError, parse_config, parse_duration
from cli.data import DataError, eval_dataloader, input_identities
from cli.evaluation import evaluate, is_better
from cli.model import apply_training_switches, build_model, build_optimizer, build_tokenizer, loss_of, model_identity, own_model_files
from resumable.randomness import enable_full_determinism, micro_batch_seeds, seed_micro_batch
from resumable.run_script import leave_process_group
from cli.reporting import TrainingLog
from cli.saving import CheckpointSaver
from resumable.state import TrainingState
from resumable.stopping import Deadline, StopCheck, StopRequests, process_start_time
from cli.trackers import Trackers, check_trackers_can_start
from cli.training_data import load_training_data, training_batches


def main(config: TrainingConfig, stop: StopRequests) -> int:
    keep_freed_memory_for_reuse()
    if config.full_determinism or compiled_on_cpu(config):
        enable_full_determinism()  # before the accelerator initialises CUDA
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    # ---- accelerator: with no GPU, cpu=True makes the ranks a real gloo group
    accelerator = build_accelerator(config)
    say = accelerator.print
    world_size = accelerator.num_processes
    say(describe_processes(accelerator, precision_source=config.precision_requested[1], determinism_source="--full_determinism" if config.full_determinism else "--torch_compile on CPU"))

    # ---- data and model: every bad input is found here, before anything is written
    tokenizer = build_tokenizer(config)
    train_data, eval_data, label_names = load_training_data(config, tokenizer, accelerator)
    set_seed(config.seed)
    model, switches_record = apply_training_switches(build_model(config, tokenizer, label_names), config)  # checkpointing, LoRA, compile

    # ---- where to start: decided once on the main process (which takes the lock), shared with every rank
    decision = resume.decide_start(config, accelerator)
    if decision.error:
        if accelerator.is_main_process:
            print(f"error: {decision.error}", file=sys.stderr)
        return decision.exit_code
    if decision.already_complete:  # finished and cleaned: the final model stays as it is
        say(decision.already_complete)
        return EXIT_DONE
    plan = resume.plan_batches(config, world_size, decision.checkpoint_state)
    for note in decision.notes + ([plan.note] if plan.note else []):
        say(note)

    # ---- batches, optimizer, schedule
    train_batches = training_batches(config, train_data, tokenizer, accelerator, plan, label_names)
    total_steps = train_batches.total_steps
    optimizer = build_optimizer(model, config)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)
    model, optimizer, train_batches.dataloader, scheduler = accelerator.prepare(model, optimizer, train_batches.dataloader, scheduler)
    if config.use_lora:
        lora.checkpoint_only_what_trains(accelerator)
    evaluation_batches = accelerator.prepare(eval_dataloader(config, eval_data, tokenizer)) if eval_data is not None else None
    run_args = {
        **config.result_defining_args(), "model_config": model_identity(config), **input_identities(config, tokenizer),
        "world_size": world_size, "global_batch_size": plan.global_batch, "gradient_accumulation_steps": plan.accumulation,
        "data_fingerprint": train_batches.fingerprint, "train_samples": train_batches.samples,
        "mixed_precision": accelerator.mixed_precision, "labels": label_names, **switches_record,  # labels: a resume reads them here, not in the data
    }  # fmt: skip

    # ---- resume
    progress = TrainingState(
        total_steps=total_steps, steps_per_epoch=train_batches.steps_per_epoch, global_batch_size=plan.global_batch,
        world_size=world_size, per_device_train_batch_size=plan.per_device, gradient_accumulation_steps=plan.accumulation,
    )  # fmt: skip
    log_history = resume.resume_or_start(accelerator, decision, run_args, progress, config.allow_config_change, train_batches)
    run_history = resume.record_start(accelerator, decision, Path(config.output_dir), progress.global_step)
    deadline = Deadline(parse_duration(config.max_time) if config.max_time else None, process_start_time(), estimated_save_seconds(model))
    if deadline.at is not None:
        say(f"⏰ Will stop with a checkpoint before {deadline.describe()}")
    stopping = StopCheck(stop, world_size, deadline)
    trackers = Trackers(accelerator, config, progress, decision.checkpoint_state)  # the same W&B / MLflow run on every resume
    log = TrainingLog(accelerator, progress, log_history, run_history, Path(config.output_dir), trackers)
    saver = CheckpointSaver(accelerator, model, config, run_args, deadline, log, saved_step=progress.global_step if decision.checkpoint else None)
    saver.backup = backup.start_uploader(accelerator, config.backup_to, Path(config.output_dir), config.backup_total_limit or config.save_total_limit, lambda: progress.best_model_checkpoint)  # copies each checkpoint in the background

    # ---- the loop
    model.train()  # from_pretrained returns a model in eval mode: dropout would be off
    if stopping.requested(at_step_boundary=False):  # signalled while loading
        return stop_early(accelerator, stopping, saver, log, progress, train_batches)
    step_began = time.monotonic()
    while progress.global_step < total_steps:  # an epoch per round (a stream: one endless round)
        for micro_batches in train_batches.optimizer_steps(progress.global_step, total_steps, plan.accumulation):
            seeds = micro_batch_seeds(config.seed, progress.global_step + 1, accelerator.process_index, world_size, plan.accumulation)
            loss = train_step(accelerator, model, optimizer, scheduler, micro_batches, config.max_grad_norm, seeds)
            progress.global_step += 1
            progress.stream_epoch = train_batches.epoch
            log.add_step(loss)
            now = time.monotonic()
            deadline.record_step(now - step_began)
            step_began = now
            last_step = progress.global_step == total_steps

            if progress.global_step % config.logging_steps == 0 or last_step:
                log.log_training(learning_rate=scheduler.get_last_lr()[0])
            log.bar.advance()

            if evaluation_batches is not None and (progress.global_step % (config.eval_steps or config.save_steps) == 0 or last_step):
                metrics = evaluate(accelerator, model, evaluation_batches, config.task)
                log.log_evaluation(metrics)
                if config.best_metric_name and is_better(metrics[config.best_metric_name], progress.best_metric, config.best_is_greater):
                    progress.best_metric = metrics[config.best_metric_name]
                    progress.best_model_checkpoint = f"{state.CHECKPOINT_PREFIX}{progress.global_step}"
                    saver.save(progress, f"best {config.best_metric_name} so far")  # the best must exist as a checkpoint

            saver.poll()  # a background save that finished becomes visible here (every rank, same step)
            if stopping.requested():
                return stop_early(accelerator, stopping, saver, log, progress, train_batches)
            if progress.global_step % config.save_steps == 0 or last_step:
                saver.save(progress, "final step" if last_step else "every --save_steps")
    stopping.settle()
    log.bar.close()
    train_batches.close()

    # ---- the end: the final model, loadable with from_pretrained (or load_own_model for --model_module)
    saver.save(progress, "final step")
    saver.wait()
    write_final_model(accelerator, model, tokenizer, config, progress, log)
    accelerator.wait_for_everyone()
    finish_trackers(accelerator)  # the process group is left later, in run_cli, once the model is gone
    return backup.finish(saver.backup, config.backup_timeout, progress.global_step, EXIT_DONE, EXIT_FAILED)  # 0 only once --backup_to holds the final model


def train_step(accelerator, model, optimizer, scheduler, micro_batches, max_grad_norm, seeds):
    """One optimizer step over the micro-batches; returns this rank's mean loss (a tensor).

    seeds[i] keys micro-batch i's random draws (dropout) to its place in the global batch.
    """
    step_loss = 0.0
    for index, (batch, seed) in enumerate(zip(micro_batches, seeds, strict=True)):
        is_last = index == len(micro_batches) - 1
        seed_micro_batch(seed, accelerator.device)  # the same dropout masks on any number of processes
        # Gradients are all-reduced once per step, on the last micro-batch.
        with contextlib.nullcontext() if is_last else accelerator.no_sync(model):
            loss = loss_of(model(**batch)) / len(micro_batches)
            accelerator.backward(loss)
        step_loss += loss.detach()
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def stop_early(accelerator, stopping: StopCheck, saver: CheckpointSaver, log: TrainingLog, progress: TrainingState, train_batches) -> int:
    """Every rank, at the same step boundary: save this step, say how to continue, exit 75."""
    log.bar.close()
    accelerator.print(f"\n🛑 Stopping at step {progress.global_step}: {stopping.reason}")
    if progress.global_step > 0:
        saver.save(progress, stopping.reason)  # nothing to save before the first step
    saver.wait()  # the stop's save, or one still in flight
    train_batches.close()  # the position is saved: --streaming's tokenizing workers end here, not in the exit
    log.write_live_state(stop_reason=stopping.reason)
    accelerator.print("▶️  To continue, run the same command again.")
    finish_trackers(accelerator)  # the process group is left later, in run_cli, once the model is gone
    backup.wait_at_stop(saver.backup, saver.config.backup_timeout)  # the stop's checkpoint to --backup_to (a requeued job may land elsewhere)
    return EXIT_STOPPED_EARLY


def write_final_model(accelerator, model, tokenizer, config: TrainingConfig, progress: TrainingState, log: TrainingLog) -> None:
    """Every rank: the final model into OUTPUT_DIR (the best checkpoint's with --load_best_model_at_end)."""
    output_dir = Path(config.output_dir)
    if config.load_best_model_at_end and progress.best_model_checkpoint:
        state.load_model_weights(accelerator.unwrap_model(model), output_dir / progress.best_model_checkpoint / "model.safetensors")
        accelerator.print(f"🏆 The final model is the best one: {progress.best_model_checkpoint} ({config.best_metric_name} {progress.best_metric})")
    full_state_dict = accelerator.get_state_dict(model)  # a collective under FSDP / ZeRO-3: every rank
    if accelerator.is_main_process:
        state.save_final_model(accelerator.unwrap_model(model), tokenizer, output_dir, full_state_dict, extra_files=own_model_files(config))
        if config.merge_lora:  # the adapter is in OUTPUT_DIR; the merged model beside it, for from_pretrained
            state.save_final_model(lora.merged(accelerator.unwrap_model(model)), tokenizer, output_dir / "merged", None)
        state.wait_for_deletions()  # a failed deletion of an old checkpoint is reported, not lost at exit
        log.write_live_state(stop_reason="complete", training_complete=True)
        accelerator.print(f"🏁 Training complete: {progress.total_steps} steps. Final model in {output_dir}")


# --------------------------------------------------------------------------- setting up the process


def build_accelerator(config: TrainingConfig):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    # Tied input/output embeddings are stored once in model.safetensors; accelerate warns
    # about it at every save although nothing is lost (load_state re-ties them).
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # with no GPU, this makes several processes real gloo ranks
        mixed_precision=config.precision_requested[0],  # None: accelerate launch's config (its environment), else no
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the world size
        project_dir=config.output_dir,
        # A process waits this long in a collective for the others: a dead or hung machine ends the run then.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=config.ddp_timeout))],
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate makes no GradScaler and no fp16 autocast on CPU: it would train in fp32 and say fp16.
        raise UsageError("fp16 needs a GPU: on CPU Accelerate has no gradient scaler and would silently train in fp32; use --bf16 (or --mixed_precision no) on CPU")
    return accelerator


def describe_processes(accelerator, precision_source: str = "default", determinism_source: str = "--full_determinism") -> str:
    """The run's first line: processes, device, threads per process, precision and where it was set, in plain words."""
    import torch

    count = accelerator.num_processes
    machines = count // int(os.environ.get("LOCAL_WORLD_SIZE", count))  # torchrun sets it: the processes on this machine
    layout = "single process" if count == 1 else f"{accelerator.distributed_type.value.lower()}: {count} process(es)"
    if machines > 1:
        layout += f" on {machines} machines (this is machine {os.environ.get('GROUP_RANK', '?')})"
    threads = f", {torch.get_num_threads()} CPU thread(s) each" if accelerator.device.type == "cpu" else ""
    exact = f", deterministic algorithms ({determinism_source})" if torch.are_deterministic_algorithms_enabled() else ""
    return f"⚙️  {layout}, device {accelerator.device}{threads}, mixed precision {accelerator.mixed_precision} (from {precision_source}){exact}"


def compiled_on_cpu(config: TrainingConfig) -> bool:
    """--torch_compile with no GPU turns deterministic algorithms on, as --full_determinism does.

    With more than one thread, two compiled runs differed (1.4e-6 after 300 steps at 2 threads):
    Inductor compiles scatter-adds (likely the embedding's backward) into parallel code. Deterministic
    algorithms make it fall back to ATen's deterministic kernel: byte-identical runs, at
    no measurable cost (0.93x the step time of the built-in model; README, "Exactness and thread counts").
    """
    import torch

    return config.torch_compile and not torch.cuda.is_available()


def estimated_save_seconds(model) -> float:
    """Until the first save is measured: weights + two Adam moments written at ~100 MB/s, plus fsyncs."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # a frozen base (LoRA) is not saved
    return 1.0 + 3 * parameter_bytes / 100e6


def keep_freed_memory_for_reuse() -> None:
    """Ask glibc's malloc to reuse freed memory rather than hand it back to the kernel at every step.

    On CPU, activations and gradients are allocated and freed at every step. By default glibc
    returns large freed blocks to the kernel (munmap, heap trimming) at thresholds that depend on
    what the process happened to free earlier, and the next step page-faults them back in:
    measured 13,000 faults per step with the built-in model against 6,000 for a plain loop,
    whose earlier history happened to differ, and ~0 with these limits (BENCHMARKS.md). The cost
    is that the process keeps its peak memory. GPU memory is untouched (PyTorch caches it).
    A user's own MALLOC_* environment settings win.
    """
    if not sys.platform.startswith("linux") or any(name.startswith("MALLOC_") for name in os.environ):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MiB (glibc's maximum) come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and up to 1 GiB of free heap is kept for the next step


def is_main_rank() -> bool:
    """The first process on this machine: the one that reports for it (each machine's log and launch.sh)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"  # set by accelerate launch / torchrun


def report(line: str) -> None:
    """An error line, once, not once per rank (every rank meets the same error)."""
    if is_main_rank():
        print(line, file=sys.stderr)


def run_cli(argv=None) -> int:
    """Parse, run, and turn every expected failure into one line and an exit code."""
    config = stop = None
    code = EXIT_FAILED
    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
        config.validate()
        check_trackers_can_start(config.trackers)  # before anything is written
        stop = StopRequests(on_abort=lambda: record_exit_code(config, EXIT_ABORTED))
        stop.install()  # at once: a signal while the data loads must not kill the process either
        code = main(config, stop)
    except UsageError as error:
        report(f"error: {error}")
        code = EXIT_USAGE
    except DataError as error:
        report(f"error: {error}")
        code = EXIT_USAGE
    except (state.CheckpointError, state.NoValidCheckpoint) as error:
        report(f"error: checkpoint: {error}")
        code = EXIT_USAGE
    except (state.NotEnoughDiskSpace, state.SaveFailed) as error:
        report(f"error: {error}")
        code = EXIT_FAILED
    except RuntimeError as error:
        if not lost_another_process(error):
            raise
        timeout = f"{config.ddp_timeout} s" if config else "--ddp_timeout"
        print(  # every surviving rank says it: the others' output may be on another machine
            f"error: rank {os.environ.get('RANK', 0)} lost contact with another process of this run (it died, or hung for over "
            f"--ddp_timeout {timeout}): {str(error).splitlines()[0][:200]}. Every complete checkpoint is kept; "
            "run the same command again (on every machine) to resume.",
            file=sys.stderr,
        )
        code = EXIT_FAILED
    finally:
        record_exit_code(config, code)
        if stop is not None:
            stop.ignore_from_now()
    leave_process_group()  # (resumable.run_script's) not after an unexpected error: its traceback still holds the model
    return code


def finish_trackers(accelerator) -> None:
    """accelerator.end_training() without its destroy_process_group(): see leave_process_group for why."""
    for tracker in accelerator.trackers:
        tracker.finish()


def lost_another_process(error: RuntimeError) -> bool:
    """A collective failed because a peer process (or its machine) died or stopped answering."""
    import torch.distributed

    markers = ("Connection reset by peer", "Connection closed by peer", "Timed out", "timed out", "timeout", "NCCL communicator", "Broken pipe")
    return isinstance(error, torch.distributed.DistError) or any(marker in str(error) for marker in markers)


def record_exit_code(config: TrainingConfig | None, code: int) -> None:
    """For the supervisor (launch.sh's is resumable.launch's): --exit_code_file, else the file it named in the environment."""
    from resumable.launch import record_exit_code as record

    record(code, config.exit_code_file if config is not None else None)


if __name__ == "__main__":
    from resumable.launch import exit_status_for_the_launcher

    sys.exit(exit_status_for_the_launcher(run_cli()))  # the code itself is recorded for launch.sh
