"""Everything that touches checkpoints on disk.

The training loop calls a handful of functions from here and never builds a
checkpoint path itself:

    newest_valid_checkpoint(output_dir)   which checkpoint to resume from
    save_checkpoint(...)                  atomic, durable, all ranks take part
    begin_checkpoint(...)                 its first step (free space, temporary directory), also for resumable/background_save.py
    load_checkpoint(...)                  model, optimizer, scheduler, RNG, progress
    rotate_checkpoints(...)               keep the newest K, only after a save; crash-safe deletion
    software_changes(...)                 which versions differ from the checkpoint's (one line each)
    LiveState                             OUTPUT_DIR/trainer_state.json, for people
    OutputDirLock                         one run per output directory

Layout of an output directory:

    OUTPUT_DIR/
      checkpoint-<global_step>/     complete checkpoints (manifest.json present)
        model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl
        stream_state_<rank>.pt (resumable.Run with a stream: each rank's position, resumable/streams.py)
        trainer_state.json, training_args.json, software.json (versions and devices that wrote it),
        manifest.json (written last: size + XXH3-128 of each)
      .tmp-checkpoint-<step>/       a save in progress; never resumed from
      .deleting-checkpoint-<step>/  a rotated-away checkpoint being deleted; never resumed from
      checkpoint-<step>.corrupt/    a damaged checkpoint moved aside, never deleted
      trainer_state.json            live progress, rewritten at logging steps (rate-limited) and saves
      .resumable.lock               held by the running process
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import xxhash

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-checkpoint-"
DELETING_PREFIX = ".deleting-"
CORRUPT_SUFFIX = ".corrupt"
MANIFEST_NAME = "manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
SOFTWARE_NAME = "software.json"
LOCK_NAME = ".resumable.lock"
RNG_FILE_PATTERN = "random_states_{rank}.pkl"  # the name accelerate's save_state uses

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(Exception):
    """A checkpoint that cannot be trusted; the message names the file and the problem."""


class NoValidCheckpoint(Exception):
    """Checkpoints exist but every one of them is damaged."""


class OutputDirBusy(Exception):
    """Another live process holds the output directory's lock."""


class NotEnoughDiskSpace(Exception):
    """The next checkpoint would not fit on the output filesystem."""


class SaveFailed(Exception):
    """A save failed part-way; its temporary directory is gone, earlier checkpoints are untouched."""


# --------------------------------------------------------------------------- training state


@dataclasses.dataclass
class TrainingState:
    """Where training stands. `global_step` is the number of optimizer steps completed.

    Everything else about progress (epoch, samples seen) is derived from it, because the
    global batch size is fixed for the whole run (elastic resumes keep it constant).
    """

    global_step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    global_batch_size: int = 0
    world_size: int = 1
    per_device_train_batch_size: int = 0
    gradient_accumulation_steps: int = 1
    # Training losses summed since the last log line, one entry per rank, so that the
    # first log line after a resume averages exactly the steps it would have averaged.
    unlogged_loss_sums: list = dataclasses.field(default_factory=list)
    unlogged_steps: int = 0
    # The library's Run: the values passed to run.step() since the last log line, summed (main process).
    unlogged_values: dict = dataclasses.field(default_factory=dict)
    # The best evaluation so far (--metric_for_best_model) and the checkpoint that holds it.
    best_metric: float | None = None
    best_model_checkpoint: str | None = None
    # The W&B / MLflow run ids (--report_to), so that every resume re-attaches to the same run.
    tracker_runs: dict = dataclasses.field(default_factory=dict)
    # --streaming: epochs read by the main process's stream (a stream has no steps_per_epoch).
    stream_epoch: float | None = None

    @property
    def epoch(self) -> float:
        if self.stream_epoch is not None:
            return self.stream_epoch
        return self.global_step / self.steps_per_epoch if self.steps_per_epoch else 0.0

    @property
    def samples_seen(self) -> int:
        return self.global_step * self.global_batch_size

    def to_json(self) -> dict:
        record = dataclasses.asdict(self)
        record["epoch"] = round(self.epoch, 4)
        record["samples_seen"] = self.samples_seen
        return record

    @classmethod
    def from_json(cls, record: dict) -> "TrainingState":
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in names})


def read_trainer_state(path: Path) -> tuple[TrainingState, list, list]:
    """Read a trainer_state.json: (state, log_history, run_history)."""
    record = json.loads(Path(path).read_text())
    return (
        TrainingState.from_json(record),
        record.get("log_history", []),
        record.get("run_history", []),
    )


def _trainer_state_record(state: TrainingState, log_history: list, run_history: list, **extra) -> dict:
    return {**state.to_json(), **extra, "log_history": log_history, "run_history": run_history}


# --------------------------------------------------------------------------- small durable writes


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_ENCODE = json.JSONEncoder().encode  # without indent=, json runs its C encoder


def json_text(record: dict) -> str:
    """`record` as JSON, one line per top-level key and per element of a top-level list or dict (each log_history entry).

    Why not json.dump(indent=2): with indent= json encodes in pure Python, 2.5x slower (67 ms against 27 ms for a
    10,000-entry log_history), and trainer_state.json is rewritten throughout a run.
    """
    lines = []
    for key, value in record.items():
        if isinstance(value, list) and value:
            elements = ",\n".join(f"    {_ENCODE(element)}" for element in value)
            lines.append(f"  {_ENCODE(key)}: [\n{elements}\n  ]")
        elif isinstance(value, dict) and value:
            elements = ",\n".join(f"    {_ENCODE(name)}: {_ENCODE(element)}" for name, element in value.items())
            lines.append(f"  {_ENCODE(key)}: {{\n{elements}\n  }}")
        else:
            lines.append(f"  {_ENCODE(key)}: {_ENCODE(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_json_atomic(path: Path, record: dict, durable: bool = True) -> None:
    """Replace `path` with `record` as JSON. Readers see the old file or the new one, never half.

    With durable=True the bytes and the rename are also fsynced, so they survive a power cut.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        handle.write(json_text(record))
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
    if durable:
        _fsync_path(path.parent)


def write_live_state(output_dir: Path, state: TrainingState, log_history: list, run_history: list, **extra) -> None:
    """Rewrite OUTPUT_DIR/trainer_state.json atomically (main process only).

    Not fsynced: it is a window for people and tools, rewritten often; the copy inside
    each checkpoint is the one resumes trust.
    """
    record = _trainer_state_record(state, log_history, run_history, updated_at=round(time.time(), 1), **extra)
    write_json_atomic(Path(output_dir) / TRAINER_STATE_NAME, record, durable=False)


class LiveState:
    """OUTPUT_DIR/trainer_state.json during a run; routine rewrites cost at most ~0.5 % of its time.

    The file holds the whole log_history, so a rewrite grows with the run: about 0.3 ms at 100
    entries, 27 ms at 10,000 (a long run logging every 10 steps). A routine write is skipped
    until 200 times the last write's duration has passed since it (every 5 s at 10,000 entries);
    every other write (at a save, a stop, the end) happens at once.
    """

    MAX_SHARE = 0.005

    def __init__(self, output_dir: Path, min_interval: float = 0.0):
        self.output_dir = Path(output_dir)
        self.min_interval = min_interval  # and never more often than this (seconds) for routine writes
        self.last_written_at = float("-inf")
        self.last_duration = 0.0

    def write(self, state: TrainingState, log_history: list, run_history: list, **extra) -> None:
        began = time.monotonic()
        write_live_state(self.output_dir, state, log_history, run_history, **extra)
        self.last_written_at = time.monotonic()
        self.last_duration = self.last_written_at - began

    def write_if_due(self, state: TrainingState, log_history: list, run_history: list, **extra) -> None:
        if time.monotonic() - self.last_written_at >= max(self.min_interval, self.last_duration / self.MAX_SHARE):
            self.write(state, log_history, run_history, **extra)


def read_live_state(output_dir: Path) -> dict | None:
    path = Path(output_dir) / TRAINER_STATE_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- discovery and validation


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory's name claims, or None if it is not one."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Every `checkpoint-<N>` directory, oldest first by N (numeric, never by time or name)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step)


# The manifest's checksum. XXH3-128 (the `xxhash` package, which `datasets` already needs) reads
# at ~14-25 GB/s on one core here, SHA-256 at ~1.7 GB/s: SHA-256 was 40 % of a 1.2 GB save
# (BENCHMARKS.md). The checksum guards against accidental damage (truncation, bit rot, a
# half-copied file), for which 128 bits of a well-mixed hash are plenty; it is no defence
# against someone rewriting the files, since the manifest lies beside them either way.
CHECKSUM_ALGORITHM = "xxh3_128"
_CHECKSUM_CONSTRUCTORS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}  # sha256: manifests written before
_READ_CHUNK = 8 << 20


def _file_checksum(path: Path, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    digest = _CHECKSUM_CONSTRUCTORS[algorithm]()
    with open(path, "rb", buffering=0) as handle:
        # No larger than the file: zero-filling 8 MiB for each of a small checkpoint's files took 9 ms of its save.
        buffer = bytearray(min(_READ_CHUNK, max(os.fstat(handle.fileno()).st_size, 1)))
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            digest.update(view[:count])  # both hashes release the GIL on large chunks
    return digest.hexdigest()


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is present and intact."""
    try:
        _verify_files(Path(path))
    except OSError as error:  # unreadable, or removed while we read it
        raise CheckpointError(f"{Path(error.filename or path).name}: {error.strerror}") from None


def _verify_files(path: Path) -> None:
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"{MANIFEST_NAME} is missing (the save never completed)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{MANIFEST_NAME} is unreadable ({error})") from None
    if manifest.get("global_step") != checkpoint_step(path):
        raise CheckpointError(f"{MANIFEST_NAME} is for step {manifest.get('global_step')}, not {checkpoint_step(path)}")
    to_hash = []  # (name, algorithm, expected digest)
    for name, expected in files.items():
        file_path = path / name
        if not file_path.is_file():
            raise CheckpointError(f"{name}: missing")
        size = file_path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{name}: {size} bytes, expected {expected['size']}")
        algorithm = next((known for known in _CHECKSUM_CONSTRUCTORS if known in expected), None)
        if algorithm is None:
            raise CheckpointError(f"{MANIFEST_NAME} is unreadable (no known checksum for {name})")
        to_hash.append((name, algorithm, expected[algorithm]))
    # Cheap checks first (above); then all files hashed at once (reads and hashing release the GIL).
    with ThreadPoolExecutor() as pool:
        digests = list(pool.map(lambda entry: _file_checksum(path / entry[0], entry[1]), to_hash))
    for (name, _, wanted), digest in zip(to_hash, digests):
        if digest != wanted:
            raise CheckpointError(f"{name}: checksum mismatch")
    try:
        read_trainer_state(path / TRAINER_STATE_NAME)
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise CheckpointError(f"{TRAINER_STATE_NAME}: unreadable ({error})") from None


def quarantine_checkpoint(path: Path) -> Path:
    """Move a damaged checkpoint aside as `<name>.corrupt` (never delete: it may hold a user's only copy)."""
    path = Path(path)
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    suffix = 1
    while target.exists():
        suffix += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}{suffix}")
    os.replace(path, target)
    _fsync_path(path.parent)
    return target


def newest_valid_checkpoint(output_dir: Path, warn=print, unfinished_first_save: bool = False) -> Path | None:
    """The newest checkpoint that passes its manifest check, or None if there is none at all.

    Damaged checkpoints newer than it are moved aside (`.corrupt`) with a warning each.
    Raises NoValidCheckpoint if checkpoints exist but none is valid (nothing is moved
    then, so a user can inspect every one of them). With unfinished_first_save=True (a
    writer that saves in place, as transformers.Trainer does, so that a kill inside its first
    save leaves a `checkpoint-N` without a manifest), one lone checkpoint whose manifest is
    missing is moved aside with a warning and None is returned.
    """
    candidates = list_checkpoints(output_dir)
    if not candidates:
        return None
    problems = []
    for path in reversed(candidates):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            problems.append((path, str(error)))
            continue
        for damaged, reason in problems:
            moved = quarantine_checkpoint(damaged)
            warn(f"⚠️  {damaged.name} is damaged ({reason}); moved aside to {moved.name}; resuming from {path.name}")
        return path
    if unfinished_first_save and len(problems) == 1 and not (problems[0][0] / MANIFEST_NAME).exists():
        unfinished, reason = problems[0]
        moved = quarantine_checkpoint(unfinished)
        warn(f"⚠️  {unfinished.name} is damaged ({reason}); moved aside to {moved.name}; no earlier checkpoint, starting at step 0")
        return None
    listing = "; ".join(f"{path.name}: {reason}" for path, reason in problems)
    raise NoValidCheckpoint(listing)


def clean_leftovers(output_dir: Path) -> list[Path]:
    """Remove what interrupted saves and deletions left behind. Main process, under the lock."""
    removed = []
    for pattern in (TEMPORARY_PREFIX + "*", DELETING_PREFIX + CHECKPOINT_PREFIX + "*"):
        for path in Path(output_dir).glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    shutil.rmtree(Path(output_dir) / ".tmp-final-model", ignore_errors=True)
    shutil.rmtree(Path(output_dir) / "merged" / ".tmp-final-model", ignore_errors=True)  # --merge_lora's
    for path in Path(output_dir).glob(f".{TRAINER_STATE_NAME}.*.tmp"):
        path.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- save


def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


ARCHIVE_PREFIXES = ("previous-run-", "superseded-")  # archive_checkpoints' folders
BACKUP_STATUS_NAME = "backup_status.json"  # --backup_to's progress (backup.py): about the run, not part of its result


def set_aside(output_dir: Path) -> list[Path]:
    """Damaged (`checkpoint-N.corrupt*`) and archived (`previous-run-*`, `superseded-*`) checkpoints."""
    return sorted(
        path for path in Path(output_dir).iterdir()
        if path.is_dir() and (CORRUPT_SUFFIX in path.name or path.name.startswith(ARCHIVE_PREFIXES))
    )  # fmt: skip


def final_model_paths(output_dir: Path) -> list[Path]:
    """What the end of training leaves in OUTPUT_DIR beside the checkpoints, as top-level entries: the
    weights, config, tokenizer files, trainer_state.json, merged/ (--merge_lora), runs/ (TensorBoard).
    Not hidden files (the lock, temporary and staging directories), checkpoints, damaged or archived
    ones, nor backup_status.json. `./launch.sh clean` keeps exactly these; --backup_to uploads them."""
    aside = set(set_aside(output_dir))
    return sorted(
        path for path in Path(output_dir).iterdir()
        if not path.name.startswith(".") and checkpoint_step(path) is None and path not in aside and path.name != BACKUP_STATUS_NAME
    )  # fmt: skip


def _expected_checkpoint_bytes(output_dir: Path, model) -> int:
    """The size of the previous checkpoint, or the trained parameters + two Adam moments if there is none."""
    previous = list_checkpoints(output_dir)
    if previous:
        return directory_size(previous[-1])
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # a frozen base (LoRA) is not saved
    return 3 * parameter_bytes


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def human_duration(seconds: float | None) -> str:
    """01:02:03, or 2d 01:02:03 past a day; ? when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    days, rest = divmod(int(seconds), 86400)
    text = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {text}" if days else text


def check_free_space(output_dir: Path, model) -> None:
    """Raise NotEnoughDiskSpace if the next checkpoint (plus 10 %) will not fit."""
    wait_for_deletions()  # the space freed by the last rotation counts (its deletion is long done by now)
    needed = int(_expected_checkpoint_bytes(output_dir, model) * 1.1)
    free = shutil.disk_usage(output_dir).free
    if needed > free:
        raise NotEnoughDiskSpace(
            f"the next checkpoint needs ~{human_bytes(needed)}, {human_bytes(free)} free in {Path(output_dir).resolve()}"
        )


def _all_ranks_succeeded(accelerator, succeeded: bool) -> bool:
    """A collective: True only if every rank succeeded. Every rank must call it."""
    if accelerator.num_processes == 1:
        return succeeded
    flag = torch.tensor([1 if succeeded else 0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def save_checkpoint(
    accelerator,
    model,
    output_dir: Path,
    state: TrainingState,
    log_history: list,
    run_history: list,
    training_args: dict,
    rank_files: dict | None = None,
) -> Path:
    """Save everything needed to resume at `state.global_step`. Every rank must call this.

    `rank_files` ({name: bytes}) are this rank's own files (resumable.Run's stream position), written beside save_state's.

    Guarantee: when this returns, OUTPUT_DIR/checkpoint-<step> is complete and durable
    (every file fsynced, the manifest written last, the rename fsynced). If it raises,
    or the process dies at any moment inside it, that directory does not exist and every
    earlier checkpoint is untouched; only a `.tmp-checkpoint-<step>` may be left, which
    `clean_leftovers` removes on the next start.
    """
    temporary, final = begin_checkpoint(accelerator, model, output_dir, state.global_step)
    error = None
    try:
        accelerator.save_state(str(temporary))
        rng_file = temporary / RNG_FILE_PATTERN.format(rank=accelerator.process_index)
        _fsync_path(rng_file)  # each rank makes its own file durable
        for name, data in (rank_files or {}).items():
            write_rank_file(temporary / name, data)
    except (OSError, RuntimeError) as caught:  # torch.save reports a full disk as RuntimeError
        error = caught
    if not _all_ranks_succeeded(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        reason = error or "another rank failed to write its files"
        raise SaveFailed(f"saving {final.name} failed ({reason}); earlier checkpoints are untouched")

    if accelerator.is_main_process:
        try:
            _finish_checkpoint(temporary, final, state, log_history, run_history, training_args, software_record(accelerator.device.type))
        except (OSError, RuntimeError) as caught:
            error = caught
            shutil.rmtree(temporary, ignore_errors=True)
    # Nobody returns before the checkpoint is in place, so no rank can act on a save that failed.
    if not _all_ranks_succeeded(accelerator, error is None):
        raise SaveFailed(f"saving {final.name} failed ({error or 'on the main process'}); earlier checkpoints are untouched")
    return final


def write_rank_file(path: Path, data: bytes) -> None:
    """One of a rank's own files in a checkpoint being written, fsynced (the manifest lists it once every rank is done)."""
    with open(path, "wb") as handle:
        handle.write(data)
    _fsync_path(path)


def begin_checkpoint(accelerator, model, output_dir: Path, global_step: int) -> tuple[Path, Path]:
    """Check the free space and create an empty `.tmp-checkpoint-<step>`; (temporary, final). Every rank.

    Raises NotEnoughDiskSpace or SaveFailed on every rank if the main process could not.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    temporary = output_dir / f"{TEMPORARY_PREFIX}{global_step}"
    error = None
    if accelerator.is_main_process:
        try:
            check_free_space(output_dir, model)
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
        except (OSError, NotEnoughDiskSpace) as caught:
            error = caught
    # Every rank waits here so no rank writes its RNG file before the directory exists.
    if not _all_ranks_succeeded(accelerator, error is None):
        if isinstance(error, NotEnoughDiskSpace):
            raise error
        raise SaveFailed(f"could not start saving {final.name} ({error or 'on the main process'}); earlier checkpoints are untouched")
    return temporary, final


def _finish_checkpoint(temporary: Path, final: Path, state, log_history, run_history, training_args, software: dict) -> None:
    """Main process, once every rank's files are durable: the JSON records, the manifest, the rename (both save paths)."""
    write_json_atomic(temporary / SOFTWARE_NAME, software)
    write_json_atomic(temporary / TRAINER_STATE_NAME, _trainer_state_record(state, log_history, run_history))
    write_json_atomic(temporary / TRAINING_ARGS_NAME, training_args)
    write_manifest(temporary, state.global_step)
    if final.exists():
        raise FileExistsError(errno.EEXIST, f"{final.name} exists already; a step is saved once")
    os.replace(temporary, final)
    _fsync_path(final.parent)


_THREADS_FROM_BYTES = 64 << 20


def write_manifest(directory: Path, global_step: int) -> None:
    """Fsync every file in `directory`, then write manifest.json listing each with size and checksum.

    The manifest is the completion marker: written last, after every file it lists is durable.
    From 64 MiB on, the fsyncs (the disk's work) and the hashing (the CPU's, from the page cache)
    run at the same time on threads, so the hashing costs little beyond the wait for the disk.
    """
    paths = [path for path in sorted(Path(directory).rglob("*")) if path.is_file() and path.name != MANIFEST_NAME]
    if sum(path.stat().st_size for path in paths) < _THREADS_FROM_BYTES:
        # A small checkpoint: starting the threads costs more than they save (a first save of 0.5 MB
        # took 50 ms with them, 17 ms without; the next ones ~6 ms either way).
        for path in paths:
            _fsync_path(path)
        digests = [_file_checksum(path) for path in paths]
    else:
        with ThreadPoolExecutor() as pool:
            fsyncs = pool.map(_fsync_path, paths)  # all submitted now; run beside the hashing
            digests = list(pool.map(_file_checksum, paths))
            list(fsyncs)  # re-raises a failed fsync
    files = {
        str(path.relative_to(directory)): {"size": path.stat().st_size, CHECKSUM_ALGORITHM: digest}
        for path, digest in zip(paths, digests)
    }  # fmt: skip
    write_json_atomic(Path(directory) / MANIFEST_NAME, {"global_step": global_step, "files": files})


def rotate_checkpoints(output_dir: Path, keep: int, protect: tuple = (), in_background: bool = False) -> list[Path]:
    """Delete every checkpoint older than the newest `keep` complete ones; call only after a save returned.

    Complete means it has its manifest. Incomplete ones older than those `keep` go too: they are
    what a deletion interrupted before deletions were crash-safe left behind. An incomplete one
    newer than them is damage for `newest_valid_checkpoint` to report, and is left alone, as are
    `.corrupt` directories. The newest complete checkpoint and any path in `protect` (the best
    model) are never deleted. Each deletion is crash-safe (`delete_checkpoint`); with in_background=True
    the files go on a thread (gone for every reader when this returns). Returns what was deleted.
    """
    checkpoints = list_checkpoints(output_dir)
    complete = [path for path in checkpoints if (path / MANIFEST_NAME).is_file()]
    if keep <= 0 or len(complete) < keep:
        return []
    oldest_kept = checkpoint_step(complete[-keep])  # keep >= 1, so the newest complete one is kept
    protected = {Path(p).resolve() for p in protect}
    deleted = []
    for path in checkpoints:
        if checkpoint_step(path) < oldest_kept and path.resolve() not in protected:
            delete_checkpoint(path, in_background)
            deleted.append(path)
    return deleted


def delete_checkpoint(path: Path, in_background: bool = False) -> None:
    """Delete a checkpoint directory so that a crash at any moment leaves no `checkpoint-N` behind.

    One atomic rename moves it out of the `checkpoint-N` namespace (to `.deleting-checkpoint-N`,
    parent fsynced) before any file goes. Deleting file by file in place, a kill part-way left
    a `checkpoint-N` without its manifest that rotation never counted, so it stayed forever.
    `clean_leftovers` removes what an interrupted deletion leaves. With in_background=True the
    files are deleted on a thread (`BackgroundDeletions`) once the rename is durable.
    """
    path = Path(path)
    doomed = path.with_name(DELETING_PREFIX + path.name)
    if doomed.exists():  # left by an interrupted deletion of the same name; a rename cannot replace it
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    _fsync_path(path.parent)
    if in_background:
        _deletions.submit(doomed)
    else:
        shutil.rmtree(doomed)


class BackgroundDeletions:
    """Deletes renamed-away checkpoints on one worker thread, so training does not wait for the disk.

    Why: deleting is mostly waiting. On this project's machine (ext4 mounted with `discard`, which
    trims freed blocks at once) unlinking a 300 MB checkpoint took 0.10-0.17 s, ~15 ms of it CPU:
    a third of the time it took to write it, paid in the loop at every rotation.
    Contract: `submit(doomed)` takes a directory already renamed out of the checkpoint namespace.
    `wait()` returns when everything submitted so far is deleted and raises the first failure (an
    OSError naming the file) in the caller's thread. Every save waits first (check_free_space), so the
    space is back before it is needed. A deletion cut short by the end of the process leaves its
    `.deleting-*` directory, which clean_leftovers removes on the next start.
    """

    def __init__(self):
        self._pool = None
        self._pending = []

    def submit(self, doomed: Path) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-deletion")
        self._pending.append(self._pool.submit(shutil.rmtree, doomed))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for deletion in pending:
            deletion.result()  # re-raises the worker's OSError here


_deletions = BackgroundDeletions()  # one per process: only the main process rotates


def wait_for_deletions() -> None:
    """Block until every checkpoint deleted in the background is gone; raise its OSError if one failed."""
    _deletions.wait()


# --------------------------------------------------------------------------- which software wrote it

_PACKAGES = ("torch", "transformers", "accelerate", "datasets", "safetensors")


def software_record(device_type: str) -> dict:
    """The versions and devices of this process: what software.json records in each checkpoint."""
    return dict(_software_record(device_type))


@functools.lru_cache(maxsize=None)
def _software_record(device_type: str) -> dict:
    # Once per process: the versions it has imported do not change while it runs, and reading five packages'
    # metadata took 11 ms, a quarter of a small model's save (bench/library_overhead.py, cProfile). An imported
    # package's own __version__ is what runs, and costs nothing to read.
    import importlib.metadata
    import platform
    import sys

    def installed_version(name: str) -> str | None:
        version = getattr(sys.modules.get(name), "__version__", None)
        if isinstance(version, str):
            return str(version)
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # a library user's environment need not have transformers or datasets
            return None

    record = {"python": platform.python_version()}
    record.update({name: installed_version(name) for name in _PACKAGES})
    record["device_type"] = device_type
    record["device_count"] = torch.cuda.device_count() if device_type == "cuda" else os.cpu_count()
    return record


def _software_differences(path: Path, device_type: str) -> list[tuple[str, object, object]]:
    """(name, in the checkpoint, now) for each difference; none for a checkpoint without software.json."""
    try:
        recorded = json.loads((Path(path) / SOFTWARE_NAME).read_text())
    except FileNotFoundError:
        return []  # written before checkpoints recorded their software
    now = software_record(device_type)
    differences = [(name, recorded.get(name), now[name]) for name in ("python", *_PACKAGES) if recorded.get(name) != now[name]]
    devices_then = f"{recorded.get('device_type')} × {recorded.get('device_count')}"
    devices_now = f"{now['device_type']} × {now['device_count']}"
    if devices_then != devices_now:
        differences.append(("devices", devices_then, devices_now))
    return differences


def software_changes(path: Path, device_type: str) -> list[str]:
    """One line per version (or device) that differs from the checkpoint's: the run goes on, perhaps not bit for bit."""
    return [f"ℹ️  {name} {then} → {now}: results may differ in the last bits" for name, then, now in _software_differences(path, device_type)]


# --------------------------------------------------------------------------- load


def capture_rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])


def _load_rng_file(path: Path) -> dict:
    """Load a rank's RNG file strictly: weights_only, and any failure is an error.

    accelerate's load_state swallows a failure to read this file ("Could not load random
    states") and trains on with the wrong RNG; an exact resume cannot afford that.
    """
    from accelerate.utils.other import load  # allows the numpy types in RNG states, nothing more

    try:
        states = load(path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: missing (was this checkpoint written with another number of processes?)") from None
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... for a refused pickle
        raise CheckpointError(f"{path.name}: refused to load ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    rng = {
        "python": states["random_state"],
        "numpy": states["numpy_random_seed"],
        "torch": states["torch_manual_seed"],
        "cuda": states.get("torch_cuda_manual_seed"),
    }
    return rng


def load_checkpoint(accelerator, path: Path) -> tuple[TrainingState, list, list]:
    """Restore model, optimizer, scheduler and every RNG from `path` on this rank.

    Returns (state, log_history, run_history) as they were when the checkpoint was saved.
    Raises CheckpointError naming the file if anything cannot be read safely; if anything fails
    to load and the checkpoint was written with other software, the error names both versions.
    """
    path = Path(path)
    state, log_history, run_history = read_trainer_state(path / TRAINER_STATE_NAME)
    same_world = state.world_size == accelerator.num_processes
    rng_rank = accelerator.process_index if same_world else 0
    try:
        # Read our RNG file first and strictly, so a refused file stops us before anything changes.
        rng = _load_rng_file(path / RNG_FILE_PATTERN.format(rank=rng_rank))
        accelerator.load_state(str(path))
    except Exception as error:  # re-raised, never swallowed: only the message gains the versions
        differences = _software_differences(path, accelerator.device.type)
        if not differences:
            raise
        versions = ", ".join(f"{name} {then} (now {now})" for name, then, now in differences)
        reason = str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        raise CheckpointError(f"{path.name} could not be loaded ({reason}); it was written with {versions}") from error
    restore_rng_state(rng)
    return state, log_history, run_history


def trainable_weights(model) -> dict:
    """The weights that train (all of them, unless some are frozen as under LoRA), by name."""
    return {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}


def load_model_weights(model, path: Path) -> None:
    """Load a checkpoint's model.safetensors into `model`, strictly.

    A model with frozen weights (LoRA) is loaded from a file that holds exactly its trainable
    weights; any other model from a file that holds every weight. Anything else raises
    CheckpointError naming the file and the first keys that differ.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    path = Path(path)
    parameters = dict(model.named_parameters())
    trainable = {name for name, parameter in parameters.items() if parameter.requires_grad}
    try:
        if len(trainable) == len(parameters):
            load_model(model, str(path))
            return
        weights = load_file(str(path))
    except (OSError, SafetensorError, RuntimeError) as error:
        raise CheckpointError(f"{path.name}: {str(error).splitlines()[0]}") from None
    if set(weights) != trainable:
        extra, missing = sorted(set(weights) - trainable)[:3], sorted(trainable - set(weights))[:3]
        raise CheckpointError(f"{path.name}: does not hold this model's trainable weights (unexpected {extra}, missing {missing})")
    model.load_state_dict(weights, strict=False)  # strict=False: the frozen base is not in the file, by design


def archive_checkpoints(output_dir: Path, newer_than: int | None = None) -> tuple[Path | None, list[str]]:
    """Move checkpoints out of discovery's way, into a folder beside them (never delete).

    newer_than=None: every checkpoint (damaged ones too) goes to OUTPUT_DIR/previous-run-<time>/,
    for a user who starts fresh in a directory that has checkpoints.
    newer_than=N: the checkpoints after step N go to OUTPUT_DIR/superseded-<time>/, for a user
    who resumes from an older checkpoint on purpose: the run will write those steps again.
    Returns the folder (None if nothing was moved) and the names moved.
    """
    output_dir = Path(output_dir)
    if newer_than is None:
        moving = [path for path in output_dir.iterdir() if path.name.startswith(CHECKPOINT_PREFIX) and path.is_dir()]
        label = "previous-run"
    else:
        moving = [path for path in list_checkpoints(output_dir) if checkpoint_step(path) > newer_than]
        label = "superseded"
    if not moving:
        return None, []
    archive = output_dir / time.strftime(f"{label}-%Y%m%d-%H%M%S")
    archive.mkdir()
    for path in moving:
        os.replace(path, archive / path.name)
    _fsync_path(output_dir)
    return archive, sorted(path.name for path in moving)


def save_final_model(model, tokenizer, output_dir: Path, state_dict, extra_files: dict | None = None) -> None:
    """Write the final model and tokenizer into OUTPUT_DIR (main process).

    A transformers model is written with save_pretrained; any other torch.nn.Module as
    model.safetensors, with `extra_files` (name -> text) beside it so it can be built again.
    Written into a temporary directory first and moved file by file, weights last but one
    and config.json last, so `from_pretrained(OUTPUT_DIR)` never sees new weights with no
    config or a half-written file.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)  # OUTPUT_DIR/merged for --merge_lora
    temporary = output_dir / ".tmp-final-model"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(temporary, state_dict=state_dict, safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(model, str(temporary / "model.safetensors"))
    for name, text in (extra_files or {}).items():
        (temporary / name).write_text(text)
    tokenizer.save_pretrained(temporary)
    files = sorted(temporary.iterdir(), key=lambda path: (path.name == "config.json", path.suffix == ".safetensors"))
    for path in files:
        _fsync_path(path)
    for path in files:
        os.replace(path, output_dir / path.name)
    _fsync_path(output_dir)
    temporary.rmdir()


def read_training_args(path: Path) -> dict:
    return json.loads((Path(path) / TRAINING_ARGS_NAME).read_text())


def recorded_settings(training_args: dict) -> dict:
    """The settings resumable.Run recorded in training_args.json (the CLI's flags and identities are its settings).
    A checkpoint of the CLI from before it ran on Run holds them flat: the whole record."""
    return training_args.get("settings", training_args) if "objects" in training_args else training_args


def read_committed_training_args(path: Path) -> dict | None:
    """training_args.json of a committed checkpoint, checked against its manifest entry; None if the
    checkpoint has no manifest or that one file does not match it. Reads nothing else, changes nothing
    (the full check of every file stays newest_valid_checkpoint's)."""
    try:
        expected = json.loads((Path(path) / MANIFEST_NAME).read_text())["files"][TRAINING_ARGS_NAME]
        algorithm = next(known for known in _CHECKSUM_CONSTRUCTORS if known in expected)
        if _file_checksum(Path(path) / TRAINING_ARGS_NAME, algorithm) != expected[algorithm]:
            return None
        return read_training_args(path)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


# --------------------------------------------------------------------------- one run per directory


class OutputDirLock:
    """An exclusive `flock` on OUTPUT_DIR/.resumable.lock for the life of the run.

    The kernel drops the lock when its process dies, however it dies, so a lock left by a
    dead process never blocks a restart. The file holds the owner's pid and host for the
    message another run prints. (flock is node-local on some network filesystems; there the
    lock protects against a second run on the same node only.)
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> None:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            owner = handle.read().strip() or "an unknown process"
            handle.close()
            raise OutputDirBusy(owner) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    @staticmethod
    def holder(output_dir: Path) -> str | None:
        """Who holds the lock now, or None if nobody does (does not take it)."""
        path = Path(output_dir) / LOCK_NAME
        if not path.exists():
            return None
        with open(path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return handle.read().strip() or "an unknown process"
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None

