"""The class labels of a sequence-classification run: where they come from, and a row that has another.

    training_labels(config, scan)   the run's labels, in class-id order, from the first source that has them:
                                      1. a resume: the labels recorded in the checkpoint it resumes from
                                         (the training data is not read for them)
                                      2. --label_names a,b,c: those, in that order
                                      3. `scan()`: one pass over the training data's label column
    UnknownLabel                    raised while tokenizing a row whose label is not among them
    unknown_label_line(...)         what the user reads then: the file, its line (parquet: row), the label

Every checkpoint records the labels in training_args.json under "labels" (train_loop.py's run
arguments), as the values the data holds (an integer label stays an integer, so a resume builds
the same cache keys). A row is matched to them by its text, str(label), as the model's
label2id is: `--label_names 0,1` names the integer labels 0 and 1 of a JSON Lines file.
"""

from __future__ import annotations

from pathlib import Path

from resumable.errors import UsageError

RECORD_KEY = "labels"  # in training_args.json


class UnknownLabel(Exception):
    """A row's label is not among the run's labels; `index` is the row's place in its chunk (0-based)."""

    def __init__(self, label, index: int):
        super().__init__(label, index)  # both in args: the exception is pickled back from a tokenizing worker
        self.label, self.index = label, index


def label_ids(names: list) -> dict:
    """str(label) -> class id."""
    return {str(name): index for index, name in enumerate(names)}


def parse_label_names(text: str) -> list[str]:

    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise UsageError(f"--label_names {text!r}: give the labels separated by commas, none empty (e.g. --label_names negative,neutral,positive)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--label_names {text!r}: {', '.join(repeated)} given more than once; each label once, in class-id order")
    if len(names) < 2:
        raise UsageError(f"--label_names {text!r}: a classifier needs at least two labels")
    return names


def resumed_checkpoint_labels(config) -> tuple[str, list] | None:
    """(checkpoint name, its labels) for the checkpoint this start will resume from; None for a new
    run or a checkpoint written before labels were recorded.

    Read before resume.decide_start and without its side effects (no lock, nothing moved or
    hashed but training_args.json): --resume_from_checkpoint none is no checkpoint, a path is that
    one, auto the newest whose manifest vouches for its training_args.json. If decide_start's
    full check then falls back to an older checkpoint, that one holds the same labels: a resume
    with other labels is refused, and a checkpoint's model has one output per label.
    """
    from resumable import state

    if config.resume_from_checkpoint == "none":
        return None
    if config.resume_from_checkpoint == "auto":
        output_dir = Path(config.output_dir)
        candidates = list(reversed(state.list_checkpoints(output_dir))) if output_dir.is_dir() else []
    else:
        candidates = [Path(config.resume_from_checkpoint)]
    for checkpoint in candidates:
        recorded = state.read_committed_training_args(checkpoint)
        if recorded is not None:
            recorded = state.recorded_settings(recorded)
            return (checkpoint.name, recorded[RECORD_KEY]) if recorded.get(RECORD_KEY) else None
    return None


def training_labels(config, scan, say=print) -> list:
    """The run's labels in class-id order (see the module docstring for the order of sources)."""

    given = parse_label_names(config.label_names) if config.label_names else None
    recorded = resumed_checkpoint_labels(config)
    if recorded is not None:
        checkpoint, names = recorded
        if given is not None and given != [str(name) for name in names]:
            raise UsageError(
                f"--label_names {config.label_names}: {checkpoint} was trained with the labels {','.join(map(str, names))} (class ids in "
                "that order); resume with those or without --label_names, or start over with --resume_from_checkpoint none"
            )
        say(f"🏷️  {len(names)} labels from {checkpoint}: {', '.join(map(str, names))}")
        return names
    if given is not None:
        return given
    return scan()


def unknown_label_line(path: str, kind: str, chunk_end: int, payload, error: UnknownLabel, names: list) -> str:
    """One line for a row of `payload` (a chunk of `path` that ends at byte / row `chunk_end`) whose label is unknown."""
    if kind == "parquet":
        where = f"row {chunk_end - len(payload[0]) + error.index + 1}"
    else:
        offset = chunk_end - sum(len(line) for line in payload)
        records = 0
        for line in payload:  # the rows that rows_of parsed: JSON Lines skips blank lines, csv empty ones
            is_row = line.strip() if kind == "json" else line.strip(b"\r\n") or kind == "text"
            if is_row and records == error.index:
                break
            records += bool(is_row)
            offset += len(line)
        where = f"line {line_number(path, offset)}"
    shown = ", ".join(map(str, names))
    return (
        f"{path} {where}: label {error.label!r} is not among the run's labels ({shown}); "
        "fix or remove the row, or list the label in --label_names (a run with checkpoints starts over for that: --resume_from_checkpoint none)"
    )


def line_number(path: str, offset: int) -> int:
    """The 1-based line of the byte at `offset` (reads the file up to it: only on this error's path)."""
    newlines, left = 0, offset
    with open(path, "rb") as handle:
        while left > 0:
            block = handle.read(min(left, 8 << 20))
            if not block:
                break
            newlines += block.count(b"\n")
            left -= len(block)
    return newlines + 1
