"""resumable: a training loop that survives every interruption.

Run it, kill it any way you like, run the same command again: training continues at
the exact sample where the newest complete checkpoint was taken, and the final weights
are the same, bit for bit (on CPU), as those of a run that was never interrupted.

    python train_loop.py [flags]                      one process
    accelerate launch train_loop.py [flags]           as configured
    ./launch.sh [--retries N] [flags]                 the user's entry point

Exit codes: 0 done (or already done) · 1 failed · 2 bad command line or input, nothing
written · 75 stopped early with a fresh checkpoint, run again to continue · 130 aborted
by a second Ctrl+C (the previous checkpoint stays valid).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import state
from data import TASKS, Collator, DataError, data_builder_for, prepare_datasets
from state import TrainingState

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED_EARLY, EXIT_ABORTED = 0, 1, 2, 75, 130
REPO_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_CONFIG = REPO_DIR / "configs" / "gpt2-small-byte.json"


class UsageError(Exception):
    """Bad command line or input: one line for the user, exit 2, nothing written."""


# --------------------------------------------------------------------------- configuration


def flag(default, help, **extra):
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class TrainingConfig:
    """Every command-line flag. Names follow transformers' TrainingArguments."""

    output_dir: str = flag("./results", "where checkpoints, logs and the final model go")
    # what to train
    model_name_or_path: str = flag(None, "a pretrained model: a directory saved with save_pretrained, or a hub id")
    config_name: str = flag(None, "model config file (.json) or directory, random init; default: the built-in small GPT-2")
    tokenizer_name: str = flag(None, "tokenizer directory or hub id; default: the model's, else a byte-level one (no download)")
    task: str = flag("causal-lm", "causal-lm or sequence-classification")
    train_file: str = flag(None, "training data: .txt, .json/.jsonl, .csv or .parquet")
    text_column: str = flag("text", "the column of --train_file or --dataset_name that holds the text")
    label_column: str = flag("label", "sequence classification: the column with the labels (integers or strings)")
    validation_file: str = flag(None, "evaluation data, same format as --train_file")
    validation_split_percentage: int = flag(None, "hold out this percentage of the training data for evaluation")
    dataset_name: str = flag(None, "a data set on the Hugging Face hub")
    dataset_config_name: str = flag(None, "the configuration of --dataset_name")
    max_train_samples: int = flag(None, "train on the first N samples (blocks) only")
    block_size: int = flag(128, "tokens per training sample (the maximum length for classification)")
    # how long
    max_steps: int = flag(-1, "optimizer steps to train; overrides --num_train_epochs when > 0")
    num_train_epochs: float = flag(3.0, "epochs to train when --max_steps is not set")
    max_time: str = flag(None, "stop with a checkpoint before this much wall time: 5400, 90m, 1h30m or 01:30:00")
    # optimization
    per_device_train_batch_size: int = flag(8, "samples per process per micro-batch")
    per_device_eval_batch_size: int = flag(8, "samples per process per evaluation batch")
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer step")
    learning_rate: float = flag(5e-4, "peak learning rate of AdamW")
    weight_decay: float = flag(0.0, "AdamW weight decay (not applied to biases and norms)")
    warmup_steps: int = flag(0, "linear warm-up steps")
    lr_scheduler_type: str = flag("linear", "linear, cosine, constant, constant_with_warmup, ...")
    max_grad_norm: float = flag(1.0, "clip gradients to this norm (0 disables)")
    seed: int = flag(42, "seed for initialization, data order and dropout")
    dataloader_num_workers: int = flag(0, "data-loading worker processes per rank")
    # checkpoints and logs
    save_steps: int = flag(1000, "save a checkpoint every N optimizer steps")
    save_total_limit: int = flag(3, "keep the newest N checkpoints")
    logging_steps: int = flag(50, "log loss and learning rate every N steps")
    eval_steps: int = flag(None, "evaluate every N steps when there is validation data (default: --save_steps)")
    metric_for_best_model: str = flag(None, "keep the best checkpoint by this metric, e.g. eval_loss or eval_accuracy")
    greater_is_better: str = flag(None, "true if a larger --metric_for_best_model is better (default: false for losses)")
    load_best_model_at_end: bool = flag(False, "write the best checkpoint's model as the final model")
    resume_from_checkpoint: str = flag("auto", "auto (newest valid in --output_dir), none (start fresh) or a path")
    allow_config_change: bool = flag(False, "resume even if flags that change the result differ from the checkpoint")
    report_to: str = flag("none", "none or tensorboard (logs under OUTPUT_DIR/runs)")
    exit_code_file: str = flag(None, "write the exit code here (launch.sh: accelerate launch reports every failure as 1)")

    def validate(self) -> None:
        """Raise UsageError naming the flag for the first bad value."""
        positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "block_size", "save_steps", "logging_steps", "eval_steps"]  # fmt: skip
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be a positive integer (got {getattr(self, name)})")
        if self.learning_rate < 0:
            raise UsageError(f"--learning_rate must not be negative (got {self.learning_rate})")
        if self.weight_decay < 0:
            raise UsageError(f"--weight_decay must not be negative (got {self.weight_decay})")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise UsageError("set --max_steps or --num_train_epochs to a positive number")
        if self.save_total_limit < 1:
            raise UsageError(f"--save_total_limit must be at least 1 (got {self.save_total_limit}); resuming needs a checkpoint")
        if self.max_train_samples is not None and self.max_train_samples <= 0:
            raise UsageError(f"--max_train_samples must be positive (got {self.max_train_samples})")
        if self.dataloader_num_workers < 0:
            raise UsageError(f"--dataloader_num_workers must not be negative (got {self.dataloader_num_workers})")
        if self.max_time is not None:
            parse_duration(self.max_time)
        from transformers.trainer_utils import SchedulerType

        schedules = [kind.value for kind in SchedulerType]
        if self.lr_scheduler_type not in schedules:
            raise UsageError(f"--lr_scheduler_type {self.lr_scheduler_type!r}: choose one of {', '.join(schedules)}")
        if self.task not in TASKS:
            raise UsageError(f"--task {self.task!r}: choose causal-lm or sequence-classification")
        if self.model_name_or_path and self.config_name:
            raise UsageError("give either --model_name_or_path (pretrained) or --config_name (random init), not both")
        if self.model_name_or_path and self.model_name_or_path.startswith(("/", ".", "~")) and not Path(self.model_name_or_path).is_dir():
            raise UsageError(f"--model_name_or_path {self.model_name_or_path}: no such directory")
        if self.validation_file and not Path(self.validation_file).is_file():
            raise UsageError(f"--validation_file {self.validation_file}: no such file")
        if self.validation_file and self.validation_split_percentage:
            raise UsageError("give either --validation_file or --validation_split_percentage, not both")
        if self.validation_split_percentage is not None and not 0 < self.validation_split_percentage < 100:
            raise UsageError(f"--validation_split_percentage must be between 1 and 99 (got {self.validation_split_percentage})")
        if self.greater_is_better not in (None, "true", "false", "True", "False"):
            raise UsageError(f"--greater_is_better takes true or false (got {self.greater_is_better!r})")
        if self.load_best_model_at_end and not (self.validation_file or self.validation_split_percentage or self.dataset_name):
            raise UsageError("--load_best_model_at_end needs evaluation data: add --validation_file or --validation_split_percentage")
        produced = {"causal-lm": ("eval_loss", "eval_perplexity"), "sequence-classification": ("eval_loss", "eval_accuracy")}
        if self.metric_for_best_model and self.metric_for_best_model not in produced.get(self.task, ()):
            raise UsageError(f"--metric_for_best_model {self.metric_for_best_model!r}: --task {self.task} reports {', '.join(produced[self.task])}")
        if self.report_to not in ("none", "tensorboard"):
            raise UsageError(f"--report_to {self.report_to!r}: choose none or tensorboard")
        if self.train_file and self.dataset_name:
            raise UsageError("give either --train_file or --dataset_name, not both")
        if self.train_file and not Path(self.train_file).is_file():
            raise UsageError(f"--train_file {self.train_file}: no such file")
        if self.train_file and data_builder_for(self.train_file) is None:
            raise UsageError(f"--train_file {self.train_file}: use a .txt, .json, .jsonl, .csv or .parquet file")
        if self.config_name and not Path(self.config_name).exists():
            raise UsageError(f"--config_name {self.config_name}: no such file or directory")
        output_dir = Path(self.output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise UsageError(f"--output_dir {self.output_dir} is a file; give a directory")
        existing = next((p for p in [output_dir, *output_dir.parents] if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--output_dir {self.output_dir} is not writable ({existing} is read-only); choose another")
        if self.resume_from_checkpoint not in ("auto", "none") and not Path(self.resume_from_checkpoint).is_dir():
            raise UsageError(f"--resume_from_checkpoint {self.resume_from_checkpoint}: no such checkpoint directory")

    @property
    def model_config_path(self) -> str:
        return self.model_name_or_path or self.config_name or str(DEFAULT_MODEL_CONFIG)

    @property
    def best_metric_name(self) -> str | None:
        return self.metric_for_best_model or ("eval_loss" if self.load_best_model_at_end else None)

    @property
    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better.lower() == "true"
        return not self.best_metric_name.endswith("loss")


# Flags whose change makes a resumed run differ from an uninterrupted one.
RESULT_CHANGING_FLAGS = [
    "seed", "per_device_train_batch_size", "global_batch_size", "block_size", "model_config", "model_name_or_path",
    "task", "label_column", "tokenizer_name", "train_file", "dataset_name", "dataset_config_name", "text_column",
    "max_train_samples", "data_fingerprint", "learning_rate", "weight_decay", "warmup_steps",
    "lr_scheduler_type", "max_grad_norm", "num_train_epochs",
]  # fmt: skip


class _ArgumentParser(__import__("argparse").ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UsageError(message)


def parse_config(argv) -> TrainingConfig:
    parser = _ArgumentParser(prog="train_loop.py", description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(TrainingConfig):
        if field.type == "bool":
            parser.add_argument(f"--{field.name}", action="store_true", help=field.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(field.type, str)
            parser.add_argument(f"--{field.name}", type=kind, default=field.default, help=field.metadata["help"])
    return TrainingConfig(**vars(parser.parse_args(argv)))


def parse_duration(text: str) -> float:
    """Seconds in '5400', '90m', '1h30m', '2h', '45s' or '01:30:00'."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if re.fullmatch(r"(\d+:)?\d+:\d+", text):
        seconds = 0.0
        for part in text.split(":"):
            seconds = seconds * 60 + int(part)
        return seconds
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if text and match:
        hours, minutes, seconds = (int(group or 0) for group in match.groups())
        return hours * 3600 + minutes * 60 + seconds
    raise UsageError(f"--max_time {text!r}: use seconds (5400), 90m, 1h30m or 01:30:00")


# --------------------------------------------------------------------------- stopping early


class StopRequests:
    """Signals and deadlines that ask the run to stop at the next step boundary.

    The handler only records the request: the loop saves and exits at a step boundary
    where every rank agrees to stop.
    """

    def __init__(self, on_abort=lambda: None):
        self.reason = None
        self._first_interrupt_at = None
        self._on_abort = on_abort  # records exit 130 for launch.sh before the process vanishes

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, self._on_signal)

    def _on_signal(self, number, frame) -> None:
        now = time.monotonic()
        if number == signal.SIGINT and self._first_interrupt_at is not None:
            # A second Ctrl+C aborts at once. torchrun forwards the terminal's SIGINT to
            # every worker, so the same key press can arrive twice within milliseconds:
            # only a press a moment later counts as the second one.
            if now - self._first_interrupt_at > 1.0:
                self._on_abort()
                os._exit(EXIT_ABORTED)  # saves are atomic: the previous checkpoint stays valid
            return
        if number == signal.SIGINT:
            self._first_interrupt_at = now
        self.reason = self.reason or signal.Signals(number).name

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason


class StopAgreement:
    """Makes every rank stop at the same optimizer step when any rank is asked to stop.

    `accelerator.check_trigger()` would do it with a blocking all-reduce and `.item()` at every
    step: on GPUs a host-device sync per step, which keeps the CPU from queueing the next step's
    kernels. Here the flags travel on a CPU (gloo) group instead: each rank contributes its flag
    at one step boundary and reads the sum at the next, so the all-reduce runs while the step
    computes. A request is acted on one step later; every rank reads the same sum at the same
    step, so all stop together. One process needs no collective at all.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.group = None
        self.pending = None
        if world_size > 1:
            import torch.distributed as dist

            # On CPU the default group is gloo already; on GPUs (NCCL) a gloo group keeps the flags off the device.
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _all_reduce(self, asked: bool, wait: bool):
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if asked else 0], dtype=torch.int32)
        work = dist.all_reduce(flag, group=self.group, async_op=True)
        if wait:
            work.wait()
            return flag.item() > 0
        return work, flag

    def now(self, asked: bool) -> bool:
        """Decide at once (blocking); for moments outside the step loop."""
        return asked if self.world_size == 1 else self._all_reduce(asked, wait=True)

    def at_step_boundary(self, asked: bool) -> bool:
        """True on every rank at the same call if any rank was asked at this call or the one before."""
        if self.world_size == 1:
            return asked
        agreed = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()  # long finished: it was started a whole step ago
            agreed = flag.item() > 0
        # Every rank reads the same sum here, so either all start another round or none does.
        self.pending = None if agreed else self._all_reduce(asked, wait=False)
        return agreed

    def settle(self) -> None:
        """Wait for the round in flight, before other collectives run or the group is torn down."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


class Deadline:
    """The wall-clock time by which this process must have saved and exited, if any.

    The margin kept before it is derived from measured save and step times, so a run
    stops early enough to finish its last save.
    """

    def __init__(self, max_time_seconds: float | None, started_at: float, estimated_save_seconds: float):
        limits = []
        if max_time_seconds is not None:
            limits.append(started_at + max_time_seconds)
        slurm_end = slurm_job_end_time()
        if slurm_end is not None:
            limits.append(slurm_end)
        self.at = min(limits) if limits else None
        self.save_seconds = estimated_save_seconds  # replaced by the measured time of each save
        self.step_seconds = 0.0

    def reached(self, now: float) -> bool:
        if self.at is None:
            return False
        margin = 1.5 * self.save_seconds + 3 * self.step_seconds + 2.0
        return now + margin >= self.at

    def describe(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at))


def slurm_job_end_time() -> float | None:
    """The SLURM job's end time (epoch seconds), when running inside a SLURM job with a time limit."""
    if os.environ.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(os.environ["SLURM_JOB_END_TIME"])
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    questions = [
        (["squeue", "-h", "-j", job_id, "-o", "%e"], lambda out: out.strip()),
        (["scontrol", "show", "job", job_id], lambda out: re.search(r"EndTime=(\S+)", out).group(1)),
    ]
    for command, read_end in questions:
        if not shutil.which(command[0]):
            continue
        try:
            answer = subprocess.run(command, capture_output=True, text=True, timeout=20)
            return time.mktime(time.strptime(read_end(answer.stdout), "%Y-%m-%dT%H:%M:%S"))
        except (subprocess.SubprocessError, OSError, ValueError, AttributeError):
            continue  # "NONE"/"Unknown" (no limit), or this tool is not usable here
    return None


# --------------------------------------------------------------------------- the model


def build_tokenizer(config: TrainingConfig):
    from transformers import AutoTokenizer, ByT5Tokenizer

    source = config.tokenizer_name or config.model_name_or_path
    if source is None:
        return ByT5Tokenizer()  # bytes in, bytes out: needs no vocabulary file and no download
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise UsageError(f"cannot load a tokenizer from {source}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2-style tokenizers have none; classification pads
    return tokenizer


def build_model(config: TrainingConfig, tokenizer, label_names: list | None):
    """The model for --task: pretrained from --model_name_or_path, else random init from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    extra = {}
    if config.task == "sequence-classification":
        # The user's own label names travel with the model, so predictions come back in their words.
        extra = {
            "num_labels": len(label_names), "id2label": {i: str(name) for i, name in enumerate(label_names)},
            "label2id": {str(name): i for i, name in enumerate(label_names)}, "pad_token_id": tokenizer.pad_token_id,
        }  # fmt: skip
    model_class = AutoModelForCausalLM if config.task == "causal-lm" else AutoModelForSequenceClassification
    try:
        if config.model_name_or_path:
            return model_class.from_pretrained(config.model_name_or_path, **extra)
        model_config = AutoConfig.from_pretrained(config.model_config_path, **extra)
    except OSError as error:
        raise UsageError(f"cannot load a model from {config.model_config_path}: {str(error).splitlines()[0]}") from None
    if getattr(model_config, "vocab_size", len(tokenizer)) < len(tokenizer):
        raise UsageError(f"--config_name: vocab_size {model_config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    model = model_class.from_config(model_config)
    if config.task == "causal-lm" and getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, minus its warning at every start
    return model


def build_optimizer(model, config: TrainingConfig):
    import torch

    # Biases and normalization weights are not decayed (the usual AdamW practice).
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    not_decayed = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def is_better(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


def train_step(accelerator, model, optimizer, scheduler, micro_batches, max_grad_norm):
    """One optimizer step over the micro-batches; returns this rank's mean loss (a tensor)."""
    step_loss = 0.0
    for index, batch in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        # Gradients are all-reduced once per step, on the last micro-batch.
        with contextlib.nullcontext() if is_last else accelerator.no_sync(model):
            loss = model(**batch).loss / len(micro_batches)
            accelerator.backward(loss)
        step_loss += loss.detach()
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def evaluate(accelerator, model, eval_dataloader, task: str) -> dict:
    """Evaluation loss (and perplexity or accuracy) over the whole validation set, all ranks.

    The global RNG is left exactly as it was: starting a DataLoader draws from it, and
    training after an evaluation must not depend on whether a resume re-ran it.
    """
    import torch

    rng_before = state.capture_rng_state()
    model.eval()
    loss_sum, examples, correct = 0.0, 0, 0
    for batch in eval_dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        size = batch["labels"].shape[0]
        # gather_for_metrics drops the samples repeated to give every rank the same batch count.
        losses = accelerator.gather_for_metrics(outputs.loss.detach().float().repeat(size))
        loss_sum += losses.sum().item()
        examples += losses.numel()
        if task == "sequence-classification":
            predictions, labels = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
            correct += (predictions == labels).sum().item()
    model.train()
    state.restore_rng_state(rng_before)
    metrics = {"eval_loss": round(loss_sum / examples, 6)}
    if task == "causal-lm":
        metrics["eval_perplexity"] = round(math.exp(min(metrics["eval_loss"], 50.0)), 4)
    else:
        metrics["eval_accuracy"] = round(correct / examples, 6)
    return metrics


def optimizer_steps_of_epoch(dataloader, epoch, steps_done_in_epoch, steps_to_take, accumulation):
    """Yield lists of `accumulation` micro-batches: the optimizer steps still to take this epoch.

    Mid-epoch (after a resume) the batches already trained on are skipped without being
    loaded, so the next batch is the one the uninterrupted run took next.
    """
    from accelerate import skip_first_batches

    dataloader.set_epoch(epoch)  # the sample order is a function of (seed, epoch)
    batches_to_skip = steps_done_in_epoch * accumulation
    if batches_to_skip:
        rng_before = state.capture_rng_state()
        batches = iter(skip_first_batches(dataloader, batches_to_skip))
        first = next(batches)
        # Starting the skipping iterator drew from the global torch RNG, which the
        # uninterrupted run did not do at this point: undo it, or dropout would differ.
        state.restore_rng_state(rng_before)
        batches = itertools.chain([first], batches)
    else:
        batches = iter(dataloader)
    batches = itertools.islice(batches, steps_to_take * accumulation)
    while step := list(itertools.islice(batches, accumulation)):
        yield step


# --------------------------------------------------------------------------- start-up decisions


@dataclasses.dataclass
class StartDecision:
    """What the main process decided before training; broadcast so every rank does the same."""

    error: str | None = None
    exit_code: int = EXIT_DONE
    checkpoint: str | None = None
    checkpoint_args: dict | None = None
    run_history: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)


def decide_start(config: TrainingConfig, lock: state.OutputDirLock) -> StartDecision:
    """Main process only: take the lock, tidy up, choose the checkpoint to resume from."""
    output_dir = Path(config.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except state.OutputDirBusy as busy:
        return StartDecision(error=f"{output_dir} is in use by another run ({busy}); wait for it or choose another --output_dir", exit_code=EXIT_USAGE)
    except OSError as error:
        return StartDecision(error=f"--output_dir {output_dir}: {error.strerror}", exit_code=EXIT_USAGE)
    decision = StartDecision()
    for leftover in state.clean_leftovers(output_dir):
        decision.notes.append(f"🧹 Removed {leftover.name}, left by a save that was interrupted")
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
    if chosen is not None:
        archive, moved = state.archive_checkpoints(output_dir, newer_than=state.checkpoint_step(chosen))
        if archive:
            decision.notes.append(f"📦 Resuming from an older checkpoint: moved {', '.join(moved)} to {archive.name}/")
        decision.checkpoint = str(chosen)
        decision.checkpoint_args = state.read_training_args(chosen)
    return decision


def compare_with_checkpoint(now: dict, before: dict, allow_change: bool) -> list[str]:
    """Notes on harmless changes; raises UsageError for result-changing ones (unless allowed)."""
    changed = [name for name in RESULT_CHANGING_FLAGS if before.get(name) != now.get(name)]
    notes = []
    if changed and not allow_change:
        width = max(len(name) for name in changed) + 2
        rows = "\n".join(f"  --{name:<{width}}| {before.get(name)!s:<24}| {now.get(name)}" for name in changed)
        raise UsageError(
            "these flags differ from the checkpoint and would change the result:\n"
            f"  {'flag':<{width + 2}}| {'in checkpoint':<24}| now\n{rows}\n"
            "Run with the checkpoint's values, or add --allow_config_change to accept the change knowingly."
        )
    if changed:
        notes.append(f"⚠️  --allow_config_change: {', '.join(changed)} differ from the checkpoint; the result will differ from an uninterrupted run")
    harmless = [n for n in ("save_steps", "save_total_limit", "logging_steps", "max_time", "max_steps") if before.get(n) != now.get(n)]
    if harmless:
        notes.append("ℹ️  Changed since the checkpoint: " + ", ".join(f"--{n} {before.get(n)} → {now.get(n)}" for n in harmless))
    return notes


def plan_batches(config: TrainingConfig, world_size: int, checkpoint_state: TrainingState | None):
    """(per-rank batch, accumulation, global batch); keeps a checkpoint's global batch on a new world size."""
    per_device = config.per_device_train_batch_size
    accumulation = config.gradient_accumulation_steps
    if checkpoint_state is None or checkpoint_state.world_size == world_size:
        return per_device, accumulation, per_device * accumulation * world_size, None
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
    return per_device, accumulation, global_batch, note


# --------------------------------------------------------------------------- the run


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


def main(config: TrainingConfig, stop: StopRequests) -> int:
    started_at = time.time()
    keep_freed_memory_for_reuse()
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
    from transformers import get_scheduler

    # Tied input/output embeddings are stored once in model.safetensors; accelerate warns
    # about it at every save although nothing is lost (load_state re-ties them).
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)

    # ---- accelerator: with no GPU, cpu=True makes the ranks a real gloo group
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the world size
        log_with="tensorboard" if config.report_to == "tensorboard" else None,
        project_dir=config.output_dir,
    )
    say = accelerator.print
    world_size = accelerator.num_processes
    output_dir = Path(config.output_dir)
    say(f"⚙️  {accelerator.distributed_type.value.lower()}: {world_size} process(es), device {accelerator.device}, mixed precision {accelerator.mixed_precision}")

    # ---- data and model: every bad input is found here, before anything is written
    tokenizer = build_tokenizer(config)
    train_data, eval_data, label_names = prepare_datasets(config, tokenizer, accelerator)
    set_seed(config.seed)
    model = build_model(config, tokenizer, label_names)

    # ---- where to start: decided once on the main process, shared with every rank
    lock = state.OutputDirLock(output_dir)
    decision = [decide_start(config, lock) if accelerator.is_main_process else None]
    if world_size > 1:
        broadcast_object_list(decision)
    decision = decision[0]
    if decision.error:
        if accelerator.is_main_process:
            print(f"error: {decision.error}", file=sys.stderr)
        return decision.exit_code
    for note in decision.notes:
        say(note)

    checkpoint_state = None
    if decision.checkpoint:
        checkpoint_state, _, _ = state.read_trainer_state(Path(decision.checkpoint) / state.TRAINER_STATE_NAME)
    per_device, accumulation, global_batch, world_note = plan_batches(config, world_size, checkpoint_state)
    if world_note:
        say(world_note)

    # ---- batches, optimizer, schedule
    steps_per_epoch = len(train_data) // global_batch
    if steps_per_epoch == 0:
        raise UsageError(f"the training data has {len(train_data)} blocks, fewer than one global batch of {global_batch}; use more data or a smaller --per_device_train_batch_size")
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    collate = Collator(config.task, tokenizer.pad_token_id)
    train_dataloader = torch.utils.data.DataLoader(
        train_data, batch_size=per_device, shuffle=True, drop_last=True,
        collate_fn=collate, num_workers=config.dataloader_num_workers,
    )  # fmt: skip
    eval_dataloader = None
    if eval_data is not None:
        eval_dataloader = torch.utils.data.DataLoader(eval_data, batch_size=config.per_device_eval_batch_size, collate_fn=collate)
    eval_steps = config.eval_steps or config.save_steps

    optimizer = build_optimizer(model, config)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    if eval_dataloader is not None:
        eval_dataloader = accelerator.prepare(eval_dataloader)

    run_args = {
        **dataclasses.asdict(config),
        "model_config": Path(config.model_config_path).read_text() if Path(config.model_config_path).is_file() else config.model_config_path,
        "world_size": world_size, "global_batch_size": global_batch, "gradient_accumulation_steps": accumulation,
        "data_fingerprint": train_data._fingerprint, "train_samples": len(train_data),
    }  # fmt: skip
    for transient in ("exit_code_file", "resume_from_checkpoint", "allow_config_change", "output_dir"):
        run_args.pop(transient)

    # ---- resume
    progress = TrainingState(
        total_steps=total_steps, steps_per_epoch=steps_per_epoch, global_batch_size=global_batch,
        world_size=world_size, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
    )  # fmt: skip
    log_history, run_history = [], decision.run_history
    if decision.checkpoint:
        for note in compare_with_checkpoint(run_args, decision.checkpoint_args, config.allow_config_change):
            say(note)
        say(f"🔄 Found checkpoint: {Path(decision.checkpoint).name}")
        saved, log_history, _ = state.load_checkpoint(accelerator, decision.checkpoint)
        progress.global_step = saved.global_step
        progress.unlogged_steps = saved.unlogged_steps
        progress.unlogged_loss_sums = saved.unlogged_loss_sums
        progress.best_metric, progress.best_model_checkpoint = saved.best_metric, saved.best_model_checkpoint
        say(f"✅ Resumed from checkpoint (step {progress.global_step}, epoch {progress.epoch:.2f})")
        if progress.global_step >= total_steps:
            say(f"✅ Training is already complete ({progress.global_step} of {total_steps} steps); nothing to do")
    else:
        say("🆕 Starting new training")
    previous_stop = (state.read_live_state(output_dir) or {}).get("stop_reason") if accelerator.is_main_process else None
    run_history.append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": progress.global_step, "world_size": world_size,
        "event": "resume" if decision.checkpoint else "start",
        "previous_stop": (previous_stop or "killed or crashed") if decision.checkpoint else None,
    })  # fmt: skip
    last_saved_step = progress.global_step if decision.checkpoint else None

    # This rank's loss sum since the last log line; restored so the next line averages
    # exactly the steps an uninterrupted run would have averaged.
    sums = progress.unlogged_loss_sums
    own_sum = sums[accelerator.process_index] if len(sums) == world_size else (sum(sums) / len(sums) if sums else 0.0)
    unlogged_loss = torch.tensor(own_sum, dtype=torch.float32, device=accelerator.device)

    # Until the first save is measured: weights + two Adam moments written at ~100 MB/s, plus fsyncs.
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_time_seconds = parse_duration(config.max_time) if config.max_time else None
    deadline = Deadline(max_time_seconds, started_at, estimated_save_seconds=1.0 + 3 * parameter_bytes / 100e6)
    if deadline.at is not None:
        say(f"⏰ Will stop with a checkpoint before {deadline.describe()}")

    live_state = state.LiveState(output_dir)  # written by the main process only

    def save(reason: str) -> None:
        nonlocal last_saved_step
        if last_saved_step == progress.global_step:
            return  # this exact state is on disk already
        progress.unlogged_loss_sums = accelerator.gather(unlogged_loss.reshape(1)).tolist()
        began = time.monotonic()
        path = state.save_checkpoint(accelerator, model, output_dir, progress, log_history, run_history, run_args)
        deadline.save_seconds = time.monotonic() - began
        last_saved_step = progress.global_step
        if accelerator.is_main_process:
            best = (output_dir / progress.best_model_checkpoint,) if progress.best_model_checkpoint else ()
            deleted = state.rotate_checkpoints(output_dir, config.save_total_limit, protect=best, in_background=True)
            gone = f", removed {', '.join(p.name for p in deleted)}" if deleted else ""
            say(f"💾 Saved {path.name} ({reason}, {deadline.save_seconds:.2f}s{gone})")
            live_state.write(progress, log_history, run_history, steps_per_second=progress_bar.steps_per_second())

    if accelerator.is_main_process:
        live_state.write(progress, log_history, run_history)
    if config.report_to == "tensorboard":
        # Points an interrupted run logged after this checkpoint are hidden (purged) by TensorBoard,
        # so the curve continues from here without going back in steps.
        accelerator.init_trackers("runs", init_kwargs={"tensorboard": {"purge_step": progress.global_step + 1}})

    agreement = StopAgreement(world_size)

    def stop_requested(at_step_boundary: bool = True) -> bool:
        """A collective: True on every rank if any rank was signalled or the deadline is near."""
        if deadline.reached(time.time()):
            stop.request("deadline")
        if at_step_boundary:
            return agreement.at_step_boundary(stop.reason is not None)
        return agreement.now(stop.reason is not None)

    def stop_early() -> int:
        progress_bar.close()
        reason = stop.reason or "another rank was asked to stop"
        say(f"\n🛑 Stopping at step {progress.global_step}: {reason}")
        if progress.global_step > 0:
            save(reason)  # nothing to save before the first step
        if accelerator.is_main_process:
            live_state.write(progress, log_history, run_history, stop_reason=reason)
        say("▶️  To continue, run the same command again.")
        accelerator.end_training()  # last: it also tears down the process group
        return EXIT_STOPPED_EARLY

    # ---- the loop
    model.train()  # from_pretrained returns a model in eval mode: dropout would be off
    progress_bar = ProgressLine(accelerator, progress)
    if stop_requested(at_step_boundary=False):  # signalled while loading
        return stop_early()
    step_began = time.monotonic()
    while progress.global_step < total_steps:
        epoch, steps_done_in_epoch = divmod(progress.global_step, steps_per_epoch)
        steps_to_take = min(steps_per_epoch - steps_done_in_epoch, total_steps - progress.global_step)
        for micro_batches in optimizer_steps_of_epoch(train_dataloader, epoch, steps_done_in_epoch, steps_to_take, accumulation):
            unlogged_loss += train_step(accelerator, model, optimizer, scheduler, micro_batches, config.max_grad_norm)
            progress.global_step += 1
            progress.unlogged_steps += 1
            now = time.monotonic()
            deadline.step_seconds, step_began = now - step_began, now

            if progress.global_step % config.logging_steps == 0 or progress.global_step == total_steps:
                mean_loss = accelerator.reduce(unlogged_loss, reduction="mean").item() / progress.unlogged_steps
                log_history.append({
                    "step": progress.global_step, "loss": round(mean_loss, 6),
                    "learning_rate": scheduler.get_last_lr()[0], "epoch": round(progress.epoch, 4),
                })  # fmt: skip
                unlogged_loss.zero_()
                progress.unlogged_steps = 0
                progress_bar.log(log_history[-1])
                accelerator.log({
                    "train/loss": mean_loss, "train/learning_rate": log_history[-1]["learning_rate"],
                    "train/samples_per_second": progress_bar.steps_per_second() * global_batch,
                }, step=progress.global_step)  # fmt: skip
                if accelerator.is_main_process:
                    live_state.write_if_due(progress, log_history, run_history, steps_per_second=progress_bar.steps_per_second())
            progress_bar.advance()

            if eval_dataloader is not None and (progress.global_step % eval_steps == 0 or progress.global_step == total_steps):
                metrics = evaluate(accelerator, model, eval_dataloader, config.task)
                log_history.append({"step": progress.global_step, **metrics, "epoch": round(progress.epoch, 4)})
                accelerator.log({name.replace("eval_", "eval/"): value for name, value in metrics.items()}, step=progress.global_step)
                say("📊 step " + str(progress.global_step) + ": " + ", ".join(f"{name} {value}" for name, value in metrics.items()))
                if config.best_metric_name and is_better(metrics[config.best_metric_name], progress.best_metric, config.best_is_greater):
                    progress.best_metric = metrics[config.best_metric_name]
                    progress.best_model_checkpoint = f"{state.CHECKPOINT_PREFIX}{progress.global_step}"
                    save(f"best {config.best_metric_name} so far")  # the best must exist as a checkpoint

            if stop_requested():
                return stop_early()
            if progress.global_step % config.save_steps == 0 or progress.global_step == total_steps:
                save("every --save_steps" if progress.global_step < total_steps else "final step")
    agreement.settle()
    progress_bar.close()

    # ---- the end: the final model, loadable with from_pretrained
    save("final step")
    if config.load_best_model_at_end and progress.best_model_checkpoint:
        from safetensors.torch import load_model

        load_model(accelerator.unwrap_model(model), str(output_dir / progress.best_model_checkpoint / "model.safetensors"))
        say(f"🏆 The final model is the best one: {progress.best_model_checkpoint} ({config.best_metric_name} {progress.best_metric})")
    full_state_dict = accelerator.get_state_dict(model)  # a collective under FSDP / ZeRO-3: every rank
    if accelerator.is_main_process:
        state.save_final_model(accelerator.unwrap_model(model), tokenizer, output_dir, full_state_dict)
        state.wait_for_removals()  # a failed deletion of an old checkpoint is reported, not lost at exit
        live_state.write(progress, log_history, run_history, stop_reason="complete", training_complete=True)
        say(f"🏁 Training complete: {total_steps} steps. Final model in {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also tears down the process group
    return EXIT_DONE


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
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        print(
            f"step {entry['step']}/{total} ({100 * entry['step'] / total:.1f}%) epoch {entry['epoch']:.2f} "
            f"loss {entry['loss']:.4f} lr {entry['learning_rate']:.2e} {samples_per_second:.1f} samples/s ETA {eta_text}",
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set by accelerate launch / torchrun


def report(line: str) -> None:
    """An error line, once, not once per rank (every rank meets the same error)."""
    if is_main_rank():
        print(line, file=sys.stderr)


def run_cli(argv=None) -> int:
    """Parse, run, and turn every expected failure into one line and an exit code."""
    config = None
    code = EXIT_FAILED
    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
        config.validate()
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
    finally:
        record_exit_code(config, code)
    return code


def record_exit_code(config: TrainingConfig | None, code: int) -> None:
    if config is not None and config.exit_code_file and is_main_rank():
        Path(config.exit_code_file).write_text(f"{code}\n")


if __name__ == "__main__":
    sys.exit(run_cli())
