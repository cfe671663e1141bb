"""resumable: a training loop that survives every interruption.

Run it, kill it any way you like, run the same command again: training continues at
the exact sample where the newest complete checkpoint was taken, and the final weights
are the same, bit for bit (on CPU), as those of a run that was never interrupted.

    python train_loop.py [flags]                      one process
    accelerate launch train_loop.py [flags]           as configured
    ./launch.sh [--retries N] [flags]                 the user's entry point

This file is the run itself: `main()` sets up and hands the run to resumable.Run, the library a
user's own loop calls (where to start, which batches, when to save and stop, the end);
`train_micro_batch()` is the numerics of one micro-batch. The CLI's own parts live in cli/:
config.py (flags), model.py (what is trained; --model_module for your own), data.py and
streaming.py (text), resume.py (the batch layout on another number of processes), reporting.py
(the progress line and trackers); the library's in resumable/.

Exit codes: 0 done (or already done) · 1 failed · 2 bad command line or input, nothing
written · 75 stopped early with a fresh checkpoint, run again to continue · 130 aborted
by a second Ctrl+C (the previous checkpoint stays valid).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from pathlib import Path

from cli import lora
from cli import resume
from resumable import state
from cli.config import EXIT_ABORTED, EXIT_FAILED, EXIT_USAGE, TrainingConfig, UsageError, compare_with_checkpoint, parse_config
from cli.data import DataError, eval_dataloader, input_identities
from cli.evaluation import evaluate
from cli.model import apply_training_switches, build_model, build_optimizer, build_tokenizer, loss_of, model_identity, own_model_files
from resumable.randomness import enable_full_determinism
from resumable.run_script import leave_process_group
from cli.reporting import TrainingLog
from resumable.state import TrainingState
from resumable.stopping import StopRequests
from cli.trackers import Trackers, check_trackers_can_start
from cli.training_data import load_training_data, training_batches


def main(config: TrainingConfig, stop: StopRequests) -> int:
    keep_freed_memory_for_reuse()
    if config.full_determinism or compiled_on_cpu(config):
        enable_full_determinism()  # before the accelerator initialises CUDA
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    import resumable

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

    # ---- the run (resumable.Run, the library a user's own loop calls): where it starts, decided once on the main process
    run = resumable.Run(
        accelerator, config.output_dir, max_steps=config.max_steps if config.max_steps > 0 else None,
        num_epochs=None if config.max_steps > 0 else config.num_train_epochs, save_steps=config.save_steps,
        keep_last=config.save_total_limit, async_save=config.async_save, max_time=config.max_time, logging_steps=config.logging_steps,
        allow_settings_change=config.allow_config_change, compare_settings=lambda before, now: compare_with_checkpoint(now, before, config.allow_config_change),
        backup_to=config.backup_to, backup_timeout=config.backup_timeout, backup_keep_last=config.backup_total_limit or config.save_total_limit,
        resume_from=config.resume_from_checkpoint, seed=config.seed, stop_requests=stop, wording=resume.CLI_WORDING,
        evaluate=(lambda: evaluate(accelerator, model, evaluation_batches, config.task)) if eval_data is not None else None,
        eval_steps=config.eval_steps or config.save_steps, best_metric=config.best_metric_name,
        greater_is_better=config.best_is_greater if config.best_metric_name else True,
        on_log=lambda entry: log.on_log(entry),  # the progress line and trackers, made once the run has started (below)
    )  # fmt: skip
    decision = run.find_checkpoint()
    if decision.already_complete:  # finished and cleaned: the final model stays as it is
        run.start()
        return run.finish()
    plan = resume.plan_batches(config, world_size, decision.checkpoint_state)
    if plan.note:
        say(plan.note)

    # ---- batches, optimizer, schedule
    train_batches = training_batches(config, train_data, tokenizer, accelerator, plan, label_names)
    accelerator.gradient_accumulation_steps = plan.accumulation  # accelerator.accumulate syncs every plan.accumulation-th micro-batch
    optimizer = build_optimizer(model, config)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=train_batches.total_steps)
    if train_batches.dataloader is not None:
        model, optimizer, train_batches.dataloader, scheduler = accelerator.prepare(model, optimizer, train_batches.dataloader, scheduler)
    else:  # --streaming: each rank's stream reads its own part, unprepared
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if config.use_lora:
        lora.checkpoint_only_what_trains(accelerator)
    evaluation_batches = accelerator.prepare(eval_dataloader(config, eval_data, tokenizer)) if eval_data is not None else None
    run.settings = {
        **config.result_defining_args(), "model_config": model_identity(config), **input_identities(config, tokenizer),
        "world_size": world_size, "global_batch_size": plan.global_batch, "gradient_accumulation_steps": plan.accumulation,
        "data_fingerprint": train_batches.fingerprint, "train_samples": train_batches.samples,
        "mixed_precision": accelerator.mixed_precision, "labels": label_names, **switches_record,  # labels: a resume reads them here, not in the data
    }  # fmt: skip

    # ---- resume (or start), the batches still to train, and what reports on the run
    run.start()
    batches = run.batches(train_batches.dataloader if train_batches.dataloader is not None else train_batches)
    trackers = Trackers(accelerator, config, run.progress, decision.checkpoint_state)  # the same W&B / MLflow run on every resume
    log = TrainingLog(accelerator, run.progress, run.log_history, trackers)

    # ---- the loop: one micro-batch at a time, an optimizer step every plan.accumulation of them
    model.train()  # from_pretrained returns a model in eval mode: dropout would be off
    step_loss = 0.0
    for batch in batches:
        step_loss += train_micro_batch(accelerator, model, optimizer, scheduler, batch, config.max_grad_norm)
        if accelerator.sync_gradients:  # the step's last micro-batch: an optimizer step was taken
            run.step(loss=step_loss, learning_rate=scheduler.get_last_lr()[0])
            step_loss = 0.0
    log.bar.close()
    train_batches.close()  # --streaming's tokenizing workers end here, not in the exit

    # ---- the end: the final model, loadable with from_pretrained (or load_own_model for --model_module)
    code = run.finish(write_model=lambda: write_final_model(accelerator, model, tokenizer, config, run.progress))
    finish_trackers(accelerator)  # the process group is left later, in run_cli, once the model is gone
    return code


def train_micro_batch(accelerator, model, optimizer, scheduler, batch, max_grad_norm):
    """One micro-batch: its share of the step's gradient, and on the step's last one the optimizer step.

    Returns the micro-batch's share of the step's mean loss (a tensor, on this rank). Under
    accelerator.accumulate, backward scales the loss by 1/accumulation and the gradients are
    all-reduced once per step, on its last micro-batch; resumable.Run has seeded this micro-batch's
    random draws (dropout) from its place in the global batch.
    """
    with accelerator.accumulate(model):
        loss = loss_of(model(**batch))
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()  # skipped by accelerate until the step's last micro-batch
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach() / accelerator.gradient_accumulation_steps


def write_final_model(accelerator, model, tokenizer, config: TrainingConfig, progress: TrainingState) -> None:
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
    except SystemExit as refused:  # resumable.Run's one line (a refused start, a misuse) is printed already
        code = refused.code if isinstance(refused.code, int) else EXIT_FAILED
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
