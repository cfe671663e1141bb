"""The command line: every flag, its validation, and what a checkpoint compares.

    TrainingConfig          one typed field per flag (names follow transformers' TrainingArguments)
    parse_config(argv)      flags -> TrainingConfig; a bad flag raises UsageError (one line, exit 2)
    TrainingConfig.validate every value checked once at start-up, the message names the flag
    compare_with_checkpoint which changes since a checkpoint would change the result (refused)

UsageError and the exit codes live in errors.py (importable from here too, as callers do).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
from pathlib import Path

from cli.data import TASKS, data_builder_for
from resumable.errors import EXIT_ABORTED, EXIT_DONE, EXIT_FAILED, EXIT_STOPPED_EARLY, EXIT_USAGE, UsageError  # noqa: F401 (re-exported)
from resumable.settings import refuse_changed_settings
from resumable.stopping import parse_duration  # noqa: F401 (re-exported)

REPO_DIR = Path(__file__).resolve().parent.parent  # the checkout: cli/ is in it
DEFAULT_MODEL_CONFIG = REPO_DIR / "configs" / "gpt2-small-byte.json"
TRACKERS = ("tensorboard", "wandb", "mlflow")  # --report_to names, each also the package to install


def flag(default, help, **extra):
    return dataclasses.field(default=default, metadata={"help": help, **extra})


@dataclasses.dataclass
class TrainingConfig:
    """Every command-line flag. Names follow transformers' TrainingArguments."""

    output_dir: str = flag("./results", "where checkpoints, logs and the final model go")
    # what to train
    model_name_or_path: str = flag(None, "a pretrained model: a directory saved with save_pretrained, or a hub id")
    config_name: str = flag(None, "model config file (.json) or directory, random init; default: the built-in small GPT-2")
    model_module: str = flag(None, "your own model: a .py file defining build_model(vocab_size, block_size) -> torch.nn.Module (see examples/)")
    tokenizer_name: str = flag(None, "tokenizer directory or hub id; default: the model's, else a byte-level one (no download)")
    task: str = flag("causal-lm", "causal-lm or sequence-classification")
    train_file: str = flag(None, "training data: .txt, .json/.jsonl, .csv or .parquet (with --streaming also a glob of many)")
    streaming: bool = flag(False, "read --train_file lazily, tokenizing on the fly: for corpora bigger than memory (needs --max_steps)")
    shuffle_buffer_size: int = flag(10_000, "--streaming: examples in the seeded shuffle buffer (0 or 1: stream order)")
    text_column: str = flag("text", "the column of --train_file or --dataset_name that holds the text")
    label_column: str = flag("label", "sequence classification: the column with the labels (integers or strings)")
    label_names: str = flag(None, "sequence classification: the labels, comma-separated, in class-id order (a first start then skips the pass over the data that finds them)")
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
    # GPU switches (all work on CPU too; see README "Mixed precision, compile, LoRA")
    mixed_precision: str = flag(None, "no, bf16 or fp16; default: accelerate_config.yaml's (when launched through it), else no")
    bf16: bool = flag(False, "same as --mixed_precision bf16")
    fp16: bool = flag(False, "same as --mixed_precision fp16 (needs a GPU: its gradient scaler exists only there)")
    torch_compile: bool = flag(False, "compile the model's forward with torch.compile (the first step takes longer)")
    torch_compile_mode: str = flag(None, "default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs; implies --torch_compile")
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward pass: less memory, ~30 % more compute")
    use_lora: bool = flag(False, "train LoRA adapters (peft) on a frozen base model; checkpoints hold only what trains")
    lora_r: int = flag(8, "LoRA rank")
    lora_alpha: int = flag(16, "LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = flag(0.05, "dropout on the LoRA branch")
    lora_target_modules: str = flag(None, "comma-separated module names, or all-linear; default: peft's choice for the model type")
    merge_lora: bool = flag(False, "also write the base model with the adapter merged in, to OUTPUT_DIR/merged")
    full_determinism: bool = flag(False, "deterministic GPU kernels (slower; see README): torch.use_deterministic_algorithms, cuDNN, cuBLAS. No change on CPU without --torch_compile (which turns them on there)")
    # checkpoints and logs
    save_steps: int = flag(1000, "save a checkpoint every N optimizer steps")
    save_total_limit: int = flag(3, "keep the newest N checkpoints")
    logging_steps: int = flag(50, "log loss and learning rate every N steps")
    eval_steps: int = flag(None, "evaluate every N steps when there is validation data (default: --save_steps)")
    metric_for_best_model: str = flag(None, "keep the best checkpoint by this metric, e.g. eval_loss or eval_accuracy")
    greater_is_better: bool | None = flag(None, "true if a larger --metric_for_best_model is better (default: false for losses)")
    load_best_model_at_end: bool = flag(False, "write the best checkpoint's model as the final model")
    async_save: bool = flag(False, "write checkpoints on a background thread while training goes on (one extra host copy of the state)")
    resume_from_checkpoint: str = flag("auto", "auto (newest valid in --output_dir), none (start fresh) or a path")
    allow_config_change: bool = flag(False, "resume even if flags that change the result differ from the checkpoint")
    ddp_timeout: int = flag(1800, "seconds a process waits for the others in a collective before it gives up on a dead or hung machine")
    report_to: str = flag("none", "none, all (the installed ones) or a comma list of tensorboard (OUTPUT_DIR/runs), wandb, mlflow")
    run_name: str = flag(None, "the run's name in W&B and MLflow (default: the output directory's name)")
    backup_to: str = flag(None, "also keep checkpoints and the final model in a directory or s3://bucket/prefix; restored from there by the same command")
    backup_total_limit: int = flag(None, "checkpoints kept in --backup_to (default: --save_total_limit)")
    backup_timeout: float = flag(600.0, "seconds the end of training (or a stop) waits for --backup_to to hold the newest state")
    exit_code_file: str = flag(None, "write the exit code here (default: the file launch.sh names in RESUMABLE_EXIT_CODE_FILE; accelerate launch reports every failure as 1)")

    def validate(self) -> None:
        """Raise UsageError naming the flag for the first bad value."""
        positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "block_size", "save_steps", "logging_steps", "eval_steps", "ddp_timeout"]  # fmt: skip
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
        if self.backup_to is not None:
            self._validate_backup()
        self.validate_gpu_switches()
        if self.lr_scheduler_type not in LR_SCHEDULER_TYPES:
            raise UsageError(f"--lr_scheduler_type {self.lr_scheduler_type!r}: choose one of {', '.join(LR_SCHEDULER_TYPES)}")
        if self.task not in TASKS:
            raise UsageError(f"--task {self.task!r}: choose causal-lm or sequence-classification")
        if sum(bool(source) for source in (self.model_name_or_path, self.config_name, self.model_module)) > 1:
            raise UsageError("give one of --model_name_or_path (pretrained), --config_name (random init) or --model_module (your own), not several")
        if self.model_module and not (Path(self.model_module).is_file() and self.model_module.endswith(".py")):
            raise UsageError(f"--model_module {self.model_module}: no such .py file")
        if self.model_module and self.task != "causal-lm":
            raise UsageError("--model_module supports --task causal-lm (its forward returns the loss); use a transformers model for classification")
        if self.model_name_or_path and self.model_name_or_path.startswith(("/", ".", "~")) and not Path(self.model_name_or_path).is_dir():
            raise UsageError(f"--model_name_or_path {self.model_name_or_path}: no such directory")
        if self.validation_file and not Path(self.validation_file).is_file():
            raise UsageError(f"--validation_file {self.validation_file}: no such file")
        if self.validation_file and self.validation_split_percentage:
            raise UsageError("give either --validation_file or --validation_split_percentage, not both")
        if self.validation_split_percentage is not None and not 0 < self.validation_split_percentage < 100:
            raise UsageError(f"--validation_split_percentage must be between 1 and 99 (got {self.validation_split_percentage})")
        if self.load_best_model_at_end and not (self.validation_file or self.validation_split_percentage or self.dataset_name):
            raise UsageError("--load_best_model_at_end needs evaluation data: add --validation_file or --validation_split_percentage")
        produced = {"causal-lm": ("eval_loss", "eval_perplexity"), "sequence-classification": ("eval_loss", "eval_accuracy")}
        if self.metric_for_best_model and self.metric_for_best_model not in produced.get(self.task, ()):
            raise UsageError(f"--metric_for_best_model {self.metric_for_best_model!r}: --task {self.task} reports {', '.join(produced[self.task])}")
        asked = [name.strip() for name in self.report_to.split(",")]
        mixed = len(asked) > 1 and ("none" in asked or "all" in asked)
        if mixed or any(name not in ("none", "all", *TRACKERS) for name in asked):
            raise UsageError(f"--report_to {self.report_to!r}: choose none, all, or one or more of {', '.join(TRACKERS)} (comma-separated)")
        for name in self.trackers:
            if importlib.util.find_spec(name) is None:
                raise UsageError(f"--report_to {name}: the {name} package is not installed; pip install {name}")
        if self.label_names is not None:
            if self.task != "sequence-classification":
                raise UsageError("--label_names is for --task sequence-classification")
            from cli.class_labels import parse_label_names

            parse_label_names(self.label_names)
        if self.train_file and self.dataset_name:
            raise UsageError("give either --train_file or --dataset_name, not both")
        if self.streaming:
            self._validate_streaming()
        elif self.train_file and not Path(self.train_file).is_file():
            raise UsageError(f"--train_file {self.train_file}: no such file")
        elif self.train_file and data_builder_for(self.train_file) is None:
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

    def _validate_backup(self) -> None:
        from resumable.backup import url_problem

        if problem := url_problem(self.backup_to):
            raise UsageError(problem)
        if self.backup_total_limit is not None and self.backup_total_limit < 1:
            raise UsageError(f"--backup_total_limit must be at least 1 (got {self.backup_total_limit})")
        if self.backup_timeout < 0:
            raise UsageError(f"--backup_timeout must not be negative (got {self.backup_timeout})")

    def _validate_streaming(self) -> None:
        from cli.streaming import expand_train_files

        if self.max_steps <= 0:
            raise UsageError("--streaming needs --max_steps: a stream has no known length")
        if not self.train_file:
            raise UsageError("--streaming reads local files: give --train_file (a file or a glob); --dataset_name streaming is not supported")
        files = expand_train_files(self.train_file)
        if not files:
            raise UsageError(f"--train_file {self.train_file}: no such file, and no file matches it as a glob")
        kinds = {data_builder_for(path) for path in files}
        if None in kinds or len(kinds) > 1:
            raise UsageError(f"--train_file {self.train_file}: with --streaming, all files must be of one kind: .txt, .json/.jsonl (JSON Lines), .csv or .parquet")
        for name in ("max_train_samples", "validation_split_percentage"):
            if getattr(self, name) is not None:
                raise UsageError(f"--{name} needs the whole data set in memory; with --streaming, use --max_steps and --validation_file")
        if self.shuffle_buffer_size < 0:
            raise UsageError(f"--shuffle_buffer_size must not be negative (got {self.shuffle_buffer_size})")

    def validate_gpu_switches(self) -> None:
        if self.bf16 and self.fp16:
            raise UsageError("give either --bf16 or --fp16, not both")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise UsageError(f"--mixed_precision {self.mixed_precision!r}: choose no, bf16 or fp16")
        shorthand = "bf16" if self.bf16 else "fp16" if self.fp16 else None
        if shorthand and self.mixed_precision not in (None, shorthand):
            raise UsageError(f"--{shorthand} contradicts --mixed_precision {self.mixed_precision}; give one of them")
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.torch_compile_mode is not None and self.torch_compile_mode not in modes:
            raise UsageError(f"--torch_compile_mode {self.torch_compile_mode!r}: choose one of {', '.join(modes)}")
        if self.torch_compile_mode is not None:
            self.torch_compile = True  # as in TrainingArguments: a mode implies compiling
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise UsageError(f"--lora_r and --lora_alpha must be positive integers (got {self.lora_r}, {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.merge_lora and not self.use_lora:
            raise UsageError("--merge_lora needs --use_lora")
        if self.use_lora and self.model_module and not self.lora_target_modules:
            raise UsageError("--use_lora with --model_module: name the layers to adapt with --lora_target_modules (e.g. all-linear)")

    @property
    def precision_requested(self) -> tuple[str | None, str]:
        """(mixed precision asked for on the command line or None, where it comes from)."""
        if self.bf16:
            return "bf16", "--bf16"
        if self.fp16:
            return "fp16", "--fp16"
        if self.mixed_precision:
            return self.mixed_precision, "--mixed_precision"
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):  # set by accelerate launch from its --config_file
            return None, "accelerate_config.yaml via accelerate launch"
        return None, "default"

    def result_defining_args(self) -> dict:
        """The flags as recorded in a checkpoint: all but those that only steer this one start."""
        transient = ("exit_code_file", "resume_from_checkpoint", "allow_config_change", "output_dir", "ddp_timeout", "async_save", "backup_to", "backup_total_limit", "backup_timeout")
        return {name: value for name, value in dataclasses.asdict(self).items() if name not in transient}

    @property
    def trackers(self) -> list[str]:
        """The trackers --report_to asks for; `all` is those whose package is installed."""
        asked = [name.strip() for name in self.report_to.split(",")]
        if asked == ["all"]:
            return [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
        return [name for name in TRACKERS if name in asked]

    @property
    def model_config_path(self) -> str:
        return self.model_name_or_path or self.config_name or str(DEFAULT_MODEL_CONFIG)

    @property
    def best_metric_name(self) -> str | None:
        return self.metric_for_best_model or ("eval_loss" if self.load_best_model_at_end else None)

    @property
    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not self.best_metric_name.endswith("loss")


# transformers' SchedulerType values, written out: importing transformers.trainer_utils to read them took 3 s,
# so a bad flag after this check waited that long for its one line. tests/test_flags.py compares them with
# the installed transformers'.
LR_SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy",
)  # fmt: skip

# Flags whose change makes a resumed run differ from an uninterrupted one.
# Files and directories are compared by content (data.input_identities), not by path.
RESULT_CHANGING_FLAGS = [
    "seed", "per_device_train_batch_size", "global_batch_size", "block_size", "model_config", "model_weights",
    "task", "label_column", "tokenizer", "data_content", "dataset_name", "dataset_config_name", "text_column",
    "max_train_samples", "data_fingerprint", "validation_content", "learning_rate", "weight_decay", "warmup_steps",
    "lr_scheduler_type", "max_grad_norm", "num_train_epochs", "mixed_precision", "lora",
]  # fmt: skip
# Where the inputs live: a change is a note, since their content is compared above.
INPUT_PATH_FLAGS = ["train_file", "validation_file", "model_name_or_path", "config_name", "tokenizer_name", "model_module"]
# Checkpoints written before content identities recorded paths and a path-based data fingerprint.
BY_PATH_BEFORE = {
    "model_weights": "model_name_or_path", "tokenizer": "tokenizer_name", "data_content": "train_file",
    "data_fingerprint": None, "validation_content": None,
}  # fmt: skip
# What a checkpoint written before a flag existed means by its absence.
ABSENT_FROM_OLDER_CHECKPOINTS = {"mixed_precision": "no", "torch_compile": False, "gradient_checkpointing": False}
# Changes accepted with a note. (A compiled run rounds differently from an uncompiled one: README.)
HARMLESS_CHANGES = ("save_steps", "save_total_limit", "logging_steps", "max_time", "max_steps", "torch_compile", "torch_compile_mode", "gradient_checkpointing")



class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other bad input
        raise UsageError(message)


def parse_config(argv) -> TrainingConfig:
    parser = _ArgumentParser(prog="train_loop.py", description="resumable: a training loop that survives every interruption.")
    for field in dataclasses.fields(TrainingConfig):
        help_text = field.metadata["help"].replace("%", "%%")  # argparse formats help with %: a plain "30 %" broke --help
        if field.type in ("bool", "bool | None"):  # --flag, --flag true, --flag false, as in TrainingArguments
            parser.add_argument(f"--{field.name}", type=yes_or_no, nargs="?", const=True, default=field.default, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(field.type, str)
            parser.add_argument(f"--{field.name}", type=kind, default=field.default, help=help_text)
    return TrainingConfig(**vars(parser.parse_args(argv)))


def yes_or_no(text: str) -> bool:
    """A boolean flag's value: true/false, yes/no, 1/0 (any case), as transformers' string_to_bool."""
    answers = {"true": True, "t": True, "yes": True, "y": True, "1": True, "false": False, "f": False, "no": False, "n": False, "0": False}
    if text.lower() not in answers:
        raise argparse.ArgumentTypeError(f"takes true or false, or nothing for true (got {text!r})")
    return answers[text.lower()]


def compare_with_checkpoint(now: dict, before: dict, allow_change: bool) -> list[str]:
    """Notes on harmless changes; raises UsageError for result-changing ones (unless allowed).

    A LoRA checkpoint holds only the adapter: resuming it on another base model is refused
    even with --allow_config_change (the adapter was trained for those exact weights).
    """
    before, now = {**ABSENT_FROM_OLDER_CHECKPOINTS, **before}, {**ABSENT_FROM_OLDER_CHECKPOINTS, **now}
    fingerprints = before.get("base_model_fingerprint"), now.get("base_model_fingerprint")
    if allow_change and bool(fingerprints[0]) != bool(fingerprints[1]):  # LoRA then or now, not both: the file cannot load (without the flag, the `lora` row refuses)
        holds = "only a LoRA adapter; resume it with --use_lora (and its LoRA flags)" if fingerprints[0] else "a whole model trained without LoRA; resume it without --use_lora"
        raise UsageError(f"the checkpoint holds {holds}, or start over with --resume_from_checkpoint none (--allow_config_change cannot bridge this)")
    if all(fingerprints) and fingerprints[0] != fingerprints[1]:  # LoRA then and now, on another base model
        raise UsageError(
            f"the base model is not the one this LoRA run started from (weights fingerprint {before.get('base_model_fingerprint')} "
            f"in the checkpoint, {now['base_model_fingerprint']} now); the checkpoint holds only the adapter. Use the original base "
            "model, or start over with --resume_from_checkpoint none"
        )
    compared, notes = RESULT_CHANGING_FLAGS, []
    if "data_content" not in before:  # an older checkpoint: its inputs can only be compared by path
        compared = [BY_PATH_BEFORE.get(name, name) for name in compared if BY_PATH_BEFORE.get(name, name)]
        if not str(before.get("model_config", "")).lstrip().startswith("{"):  # it held a directory's path or a hub id
            now = {**now, "model_config": now.get("model_name_or_path") or now.get("config_name")}
        notes.append("ℹ️  The checkpoint predates content identities: data, tokenizer and model are compared by path this once")
    changed = [name for name in compared if before.get(name) != now.get(name)]
    if not allow_change:
        refuse_changed_settings(changed, before, now, "flags", "--", "Run with the checkpoint's values, or add --allow_config_change to accept the change knowingly.")
    if changed:
        notes.append(f"⚠️  --allow_config_change: {', '.join(changed)} differ from the checkpoint; the result will differ from an uninterrupted run")
    moved = [n for n in INPUT_PATH_FLAGS if n not in compared and before.get(n) != now.get(n)]
    if moved:
        same = "same content at another path" if not changed and "data_content" in before else "paths changed"
        notes.append(f"ℹ️  Inputs moved since the checkpoint ({same}): " + ", ".join(f"--{n} {before.get(n)} → {now.get(n)}" for n in moved))
    harmless = [n for n in HARMLESS_CHANGES if before.get(n) != now.get(n)]
    if harmless:
        notes.append("ℹ️  Changed since the checkpoint: " + ", ".join(f"--{n} {before.get(n)} → {now.get(n)}" for n in harmless))
    return notes
