"""Training and evaluation data: loading with `datasets`, tokenizing once (cached), batching.

Two tasks:
  causal-lm                 text cut into blocks of exactly --block_size tokens
  sequence-classification   one example per row, truncated to --block_size, with a label

Preprocessing runs through `datasets.map` with cache keys we name ourselves, so a restart
reads the cache instead of tokenizing again, and the keys double as the data's identity
that a resume compares with the checkpoint's. The keys start from the content of the local
files (identity.py), not from their path: the same bytes elsewhere are the same data.
"""

from __future__ import annotations

import hashlib
import itertools
import sysconfig
from pathlib import Path

from cli import class_labels
from cli import identity
from resumable import batches
from resumable.errors import DataError  # noqa: F401 (re-exported: callers import it from here)

TASKS = ("causal-lm", "sequence-classification")


def data_builder_for(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    return {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)


def builtin_corpus_files() -> list[str]:
    """The Python standard library's top-level .py files: text every machine has."""
    return sorted(str(path) for path in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def fingerprint(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def training_files(config) -> list[str] | None:
    """The local files the training data is read from, in order; None for a hub data set, or for a
    stream (--streaming), whose identity is streaming.stream_identity: a full hash would read the corpus."""
    if config.dataset_name or config.streaming:
        return None
    return [config.train_file] if config.train_file else builtin_corpus_files()


def input_identities(config, tokenizer) -> dict:
    """What the run reads, by content (recorded in each checkpoint, compared on resume)."""
    files = training_files(config)
    return {
        "data_content": identity.content_hash(files) if files else None,
        "validation_content": identity.content_hash([config.validation_file]) if config.validation_file else None,
        "tokenizer": identity.tokenizer_identity(tokenizer, config.tokenizer_name or config.model_name_or_path),
        "model_weights": identity.model_identity(config.model_name_or_path),
    }


def with_content_fingerprint(raw, files: list[str]):
    """`raw` with a fingerprint of its files' bytes instead of datasets' own (path and mtime).

    Every fingerprint derived from it (our cache keys, a seeded split, a selection) is then
    a function of the content, so the same data at another path is recognized as such.
    """
    import datasets

    return datasets.Dataset(raw.data, info=raw.info, split=raw.split, fingerprint=fingerprint("files", identity.content_hash(files)))


def load_splits(config) -> tuple:
    """(train, validation or None) as raw `datasets.Dataset`s with the user's columns."""
    import datasets

    validation = None
    if config.dataset_name:
        splits = datasets.load_dataset(config.dataset_name, config.dataset_config_name)
        train = splits["train"]
        validation = splits["validation"] if "validation" in splits else None
        if validation is not None:
            check_columns(validation, "validation", config)
    elif config.train_file:
        train = datasets.load_dataset(data_builder_for(config.train_file), data_files={"train": config.train_file}, split="train")
    else:
        files = builtin_corpus_files()
        train = datasets.load_dataset("text", data_files={"train": files}, sample_by="document", split="train")
    if not config.dataset_name:
        train = with_content_fingerprint(train, training_files(config))
    if config.validation_file:
        validation = load_validation_file(config)
    elif config.validation_split_percentage:
        # A fixed split: the same rows are held out on every start (seeded, cached by `datasets`).
        parts = train.train_test_split(test_size=config.validation_split_percentage / 100, seed=config.seed)
        train, validation = parts["train"], parts["test"]
    check_columns(train, "training", config)  # a split of it (--validation_split_percentage) has the same columns
    return train, validation


def load_validation_file(config):
    """--validation_file as a raw `datasets.Dataset` (content-fingerprinted, columns checked); also for --streaming."""
    import datasets

    validation = datasets.load_dataset(data_builder_for(config.validation_file), data_files={"validation": config.validation_file}, split="validation")
    validation = with_content_fingerprint(validation, [config.validation_file])
    check_columns(validation, "validation", config)
    return validation


def check_columns(split, split_name: str, config) -> None:
    """DataError naming the flag if --text_column (or --label_column, for classification) is not in `split`."""
    needed = [config.text_column] + ([config.label_column] if config.task == "sequence-classification" else [])
    for column in needed:
        if column not in split.column_names:
            flag = "--text_column" if column == config.text_column else "--label_column"
            columns = ", ".join(split.column_names)
            raise DataError(f"{flag} {column!r} is not in the {split_name} data (columns: {columns}); pass one of them")


def tokenizer_identity(tokenizer, config) -> str:
    return identity.tokenizer_identity(tokenizer, config.tokenizer_name or config.model_name_or_path)


def causal_lm_blocks(raw, tokenizer, config, accelerator):
    """Token blocks of exactly --block_size (the remainder of the concatenated text is dropped)."""
    text_column, block_size = config.text_column, config.block_size
    tokenized_key = fingerprint(raw._fingerprint, tokenizer_identity(tokenizer, config), text_column)
    blocks_key = fingerprint(tokenized_key, block_size)

    def tokenize(batch):
        return {"input_ids": tokenizer(batch[text_column])["input_ids"]}

    def group_into_blocks(batch):
        tokens = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(tokens) - len(tokens) % block_size
        return {"input_ids": [tokens[i : i + block_size] for i in range(0, usable, block_size)]}

    # The main process fills the cache first; the others then read it instead of redoing it.
    with accelerator.main_process_first():
        tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names, new_fingerprint=tokenized_key, desc="Tokenizing")
        return tokenized.map(group_into_blocks, batched=True, new_fingerprint=blocks_key, desc=f"Grouping into blocks of {block_size}")


def label_names(raw_train, config) -> list:
    """The sorted distinct labels of the training data; their positions are the class ids."""
    names = sorted(set(raw_train[config.label_column]))
    if any(name is None for name in names):
        raise DataError(f"--label_column {config.label_column!r} has empty values; every training row needs a label")
    return names


def check_training_labels(raw_train, names: list, config) -> None:
    """DataError naming the first training row whose label is not among `names` (--label_names): before anything is written."""
    label_to_id = class_labels.label_ids(names)
    for index, label in enumerate(raw_train[config.label_column]):
        if str(label) not in label_to_id:
            where = config.train_file or config.dataset_name or "the training data"
            row = f"row {index + 1}" if not config.validation_split_percentage else "a row"  # a split's rows are not the file's
            raise DataError(f"{where} {row}: label {label!r} is not among the run's labels ({', '.join(map(str, names))}); fix or remove the row, or list the label in --label_names")


def classification_examples(raw, tokenizer, config, accelerator, names: list):
    """input_ids (truncated to --block_size) and integer labels, one example per row."""
    text_column, label_column, block_size = config.text_column, config.label_column, config.block_size
    label_to_id = class_labels.label_ids(names)
    key = fingerprint(raw._fingerprint, tokenizer_identity(tokenizer, config), text_column, label_column, block_size, names)

    def tokenize(batch):
        unknown = {label for label in batch[label_column] if str(label) not in label_to_id}
        if unknown:
            raise DataError(f"labels {sorted(unknown, key=str)} are not in the training data's labels {names}")
        encoded = tokenizer(batch[text_column], truncation=True, max_length=block_size)
        return {"input_ids": encoded["input_ids"], "labels": [label_to_id[str(label)] for label in batch[label_column]]}

    with accelerator.main_process_first():
        return raw.map(tokenize, batched=True, remove_columns=raw.column_names, new_fingerprint=key, desc="Tokenizing")


class Collator:
    """Stacks blocks (causal LM) or pads to the longest example in the batch (classification).

    A class rather than a closure so that data-loading worker processes can pickle it.
    """

    def __init__(self, task: str, pad_token_id: int):
        self.task = task
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        import torch

        if self.task == "causal-lm":
            input_ids = torch.tensor([example["input_ids"] for example in examples], dtype=torch.long)
            return {"input_ids": input_ids, "labels": input_ids}  # the model shifts the labels itself
        longest = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            input_ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
            attention_mask[row, : len(example["input_ids"])] = 1
        labels = torch.tensor([example["labels"] for example in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def prepare_datasets(config, tokenizer, accelerator) -> tuple:
    """(train, validation or None, label names or None), tokenized and ready for a DataLoader."""
    raw_train, raw_validation = load_splits(config)
    names = None
    if config.task == "causal-lm":
        train = causal_lm_blocks(raw_train, tokenizer, config, accelerator)
        validation = causal_lm_blocks(raw_validation, tokenizer, config, accelerator) if raw_validation is not None else None
    else:
        names = class_labels.training_labels(config, scan=lambda: label_names(raw_train, config), say=accelerator.print)
        if config.label_names:  # labels found in the data, or a checkpoint's for the same content, hold every row's
            check_training_labels(raw_train, names, config)
        train = classification_examples(raw_train, tokenizer, config, accelerator, names)
        validation = classification_examples(raw_validation, tokenizer, config, accelerator, names) if raw_validation is not None else None
    if config.max_train_samples is not None:
        train = train.select(range(min(config.max_train_samples, len(train))))
    return train, validation, names


def training_batches(config, train_data, tokenizer, accelerator, plan, label_names=None):
    """The run's optimizer steps over a tokenized Dataset: EpochBatches (training_data.py picks a stream instead with --streaming)."""
    import torch

    steps_per_epoch = len(train_data) // plan.global_batch
    if steps_per_epoch == 0:
        raise DataError(f"the training data has {len(train_data)} blocks, fewer than one global batch of {plan.global_batch}; use more data or a smaller --per_device_train_batch_size")
    dataloader = torch.utils.data.DataLoader(
        train_data, batch_size=plan.per_device, shuffle=True, drop_last=True,
        collate_fn=Collator(config.task, tokenizer.pad_token_id), num_workers=config.dataloader_num_workers,
    )  # fmt: skip
    total_steps = batches.total_steps(config.max_steps if config.max_steps > 0 else None, config.num_train_epochs, steps_per_epoch)  # as resumable.Run counts them
    return EpochBatches(dataloader, steps_per_epoch, total_steps, fingerprint=train_data._fingerprint, samples=len(train_data))


def eval_dataloader(config, eval_data, tokenizer):
    import torch

    if eval_data is None:
        return None
    return torch.utils.data.DataLoader(eval_data, batch_size=config.per_device_eval_batch_size, collate_fn=Collator(config.task, tokenizer.pad_token_id))


class EpochBatches:
    """Map-style training data: the DataLoader resumable.Run's batches() iterates (each epoch's order drawn from
    (seed, epoch)), with the run's length and identity. streaming.TrainingStream has the same fields."""

    epoch = None  # progress derives the epoch from the step (a stream counts its own)

    def __init__(self, dataloader, steps_per_epoch: int, total_steps: int, fingerprint: str, samples: int):
        self.dataloader = dataloader  # replaced by accelerator.prepare's
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.fingerprint, self.samples = fingerprint, samples

    def close(self) -> None:
        pass
