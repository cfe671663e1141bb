"""The data a run trains on, chosen once: tokenized in memory (data.py) or read lazily from files (streaming.py).

The choice sits here, above both, so that streaming.py builds on data.py's pieces (Collator, the
validation loaders) and data.py never imports streaming.py back.
"""

from __future__ import annotations

from cli import class_labels
from cli import data
from cli import streaming


def load_training_data(config, tokenizer, accelerator) -> tuple:
    """(training data, evaluation data or None, label names or None), before anything is written.

    The training data is a tokenized `datasets.Dataset`, or with --streaming the list of files
    that streaming.TrainingStream reads while training (only the evaluation data is loaded here).
    """
    if not config.streaming:
        return data.prepare_datasets(config, tokenizer, accelerator)
    files = streaming.expand_train_files(config.train_file)
    names = None
    if config.task == "sequence-classification":
        names = class_labels.training_labels(config, scan=lambda: streaming.stream_label_names(files, config, accelerator.print), say=accelerator.print)
    return files, streaming.validation_data(config, tokenizer, accelerator, names), names


def training_batches(config, train_data, tokenizer, accelerator, plan, label_names=None):
    """The run's optimizer steps: EpochBatches over a Dataset, or a TrainingStream over files (--streaming).

    Either has steps_per_epoch (0 for a stream), total_steps, fingerprint, samples and a
    `dataloader` for accelerator.prepare (None for a stream, which shards itself).
    """
    if config.streaming:
        return streaming.training_stream(config, tokenizer, train_data, accelerator, plan, label_names)
    return data.training_batches(config, train_data, tokenizer, accelerator, plan, label_names)
