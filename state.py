"""Everything that touches checkpoints on disk.

The training loop calls a handful of functions from here and never builds a
checkpoint path itself:

    newest_valid_checkpoint(output_dir)   which checkpoint to resume from
    save_checkpoint(...)                  atomic, durable, all ranks take part
    load_checkpoint(...)                  model, optimizer, scheduler, RNG, progress
    rotate_checkpoints(...)               keep the newest K, only after a save (deleted on a thread)
    LiveState                             OUTPUT_DIR/trainer_state.json, for people
    OutputDirLock                         one run per output directory

Layout of an output directory:

    OUTPUT_DIR/
      checkpoint-<global_step>/     complete checkpoints (manifest.json present)
        model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl
        trainer_state.json, training_args.json, manifest.json (written last: size + XXH3-128 of each)
      .tmp-checkpoint-<step>/       a save in progress; never resumed from
      .removing-checkpoint-<step>/  a rotated-away checkpoint being deleted in the background
      checkpoint-<step>.corrupt/    a damaged checkpoint moved aside, never deleted
      trainer_state.json            live progress, rewritten at logging steps (rate-limited) and saves
      .resumable.lock               held by the running process
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
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
REMOVING_PREFIX = ".removing-"
CORRUPT_SUFFIX = ".corrupt"
MANIFEST_NAME = "manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
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
    # The best evaluation so far (--metric_for_best_model) and the checkpoint that holds it.
    best_metric: float | None = None
    best_model_checkpoint: str | None = None

    @property
    def epoch(self) -> float:
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


def write_json_atomic(path: Path, record: dict, durable: bool = True) -> None:
    """Replace `path` with `record` as JSON. Readers see the old file or the new one, never half.

    With durable=True the bytes and the rename are also fsynced, so they survive a power cut.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
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
    """OUTPUT_DIR/trainer_state.json during a run; routine rewrites cost at most ~2 % of its time.

    The file holds the whole log_history, so a rewrite grows with the run: about 1 ms at 100
    entries, 50 ms at 10,000 (a long run logging every 10 steps). A routine write is skipped
    until 50 times the last write's duration has passed since it; every other write (at a
    save, a stop, the end) happens at once.
    """

    MAX_SHARE = 0.02

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.last_written_at = float("-inf")
        self.last_duration = 0.0

    def write(self, state: TrainingState, log_history: list, run_history: list, **extra) -> None:
        began = time.monotonic()
        write_live_state(self.output_dir, state, log_history, run_history, **extra)
        self.last_written_at = time.monotonic()
        self.last_duration = self.last_written_at - began

    def write_if_due(self, state: TrainingState, log_history: list, run_history: list, **extra) -> None:
        if time.monotonic() - self.last_written_at >= self.last_duration / self.MAX_SHARE:
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
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
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


def newest_valid_checkpoint(output_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that passes its manifest check, or None if there is none at all.

    Damaged checkpoints newer than it are moved aside (`.corrupt`) with a warning each.
    Raises NoValidCheckpoint if checkpoints exist but none is valid (nothing is moved
    then, so a user can inspect every one of them).
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
    listing = "; ".join(f"{path.name}: {reason}" for path, reason in problems)
    raise NoValidCheckpoint(listing)


def clean_leftovers(output_dir: Path) -> list[Path]:
    """Remove temporary directories of saves that were interrupted. Main process, under the lock."""
    removed = []
    for path in Path(output_dir).glob(TEMPORARY_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    shutil.rmtree(Path(output_dir) / ".tmp-final-model", ignore_errors=True)
    for path in Path(output_dir).glob(REMOVING_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)  # rotated away already; the deletion was cut short
    for path in Path(output_dir).glob(f".{TRAINER_STATE_NAME}.*.tmp"):
        path.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- save


def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def _expected_checkpoint_bytes(output_dir: Path, model) -> int:
    """The size of the previous checkpoint, or parameters + two Adam moments if there is none."""
    previous = list_checkpoints(output_dir)
    if previous:
        return directory_size(previous[-1])
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return 3 * parameter_bytes


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def check_free_space(output_dir: Path, model) -> None:
    """Raise NotEnoughDiskSpace if the next checkpoint (plus 10 %) will not fit."""
    wait_for_removals()  # space freed by the last rotation counts (its deletion is long done by now)
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
) -> Path:
    """Save everything needed to resume at `state.global_step`. Every rank must call this.

    Guarantee: when this returns, OUTPUT_DIR/checkpoint-<step> is complete and durable
    (every file fsynced, the manifest written last, the rename fsynced). If it raises,
    or the process dies at any moment inside it, that directory does not exist and every
    earlier checkpoint is untouched; only a `.tmp-checkpoint-<step>` may be left, which
    `clean_leftovers` removes on the next start.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    temporary = output_dir / f"{TEMPORARY_PREFIX}{state.global_step}"

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

    try:
        accelerator.save_state(str(temporary))
        rng_file = temporary / RNG_FILE_PATTERN.format(rank=accelerator.process_index)
        _fsync_path(rng_file)  # each rank makes its own file durable
    except (OSError, RuntimeError) as caught:  # torch.save reports a full disk as RuntimeError
        error = caught
    if not _all_ranks_succeeded(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        reason = error or "another rank failed to write its files"
        raise SaveFailed(f"saving {final.name} failed ({reason}); earlier checkpoints are untouched")

    if accelerator.is_main_process:
        try:
            _finish_checkpoint(temporary, final, state, log_history, run_history, training_args)
        except (OSError, RuntimeError) as caught:
            error = caught
            shutil.rmtree(temporary, ignore_errors=True)
    # Nobody returns before the checkpoint is in place, so no rank can act on a save that failed.
    if not _all_ranks_succeeded(accelerator, error is None):
        raise SaveFailed(f"saving {final.name} failed ({error or 'on the main process'}); earlier checkpoints are untouched")
    return final


def _finish_checkpoint(temporary: Path, final: Path, state, log_history, run_history, training_args) -> None:
    write_json_atomic(temporary / TRAINER_STATE_NAME, _trainer_state_record(state, log_history, run_history))
    write_json_atomic(temporary / TRAINING_ARGS_NAME, training_args)
    write_manifest(temporary, state.global_step)
    if final.exists():
        raise FileExistsError(errno.EEXIST, f"{final.name} exists already; a step is saved once")
    os.replace(temporary, final)
    _fsync_path(final.parent)


def write_manifest(directory: Path, global_step: int) -> None:
    """Fsync every file in `directory`, then write manifest.json listing each with size and checksum.

    The manifest is the completion marker: written last, after every file it lists is durable.
    The fsyncs (the disk's work) and the hashing (the CPU's, from the page cache) run at the
    same time on threads, so the hashing costs little beyond the wait for the disk.
    """
    paths = [path for path in sorted(Path(directory).rglob("*")) if path.is_file() and path.name != MANIFEST_NAME]
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
    """Delete all but the newest `keep` complete checkpoints; call only after a save returned.

    The newest checkpoint and any path in `protect` (the best model) are never deleted.
    Returns what was deleted. With in_background=True each one is renamed to
    `.removing-<name>` before this returns (no discovery sees it from then on) and deleted
    on a thread (see BackgroundRemovals).
    """
    complete = [path for path in list_checkpoints(output_dir) if (path / MANIFEST_NAME).is_file()]
    if keep <= 0 or len(complete) <= keep:
        return []
    protected = {Path(p).resolve() for p in protect} | {complete[-1].resolve()}
    deleted = []
    for path in complete[:-keep]:
        if path.resolve() not in protected:
            if in_background:
                _removals.remove(path)
            else:
                shutil.rmtree(path)
            deleted.append(path)
    return deleted


class BackgroundRemovals:
    """Deletes rotated-away checkpoints on one worker thread, so training does not wait for the disk.

    Why: deleting is mostly waiting. On this project's machine (ext4 mounted with `discard`, which
    trims freed blocks at once) unlinking a 300 MB checkpoint takes 0.10-0.17 s, of which ~15 ms is
    CPU: a third of the time it took to write it, paid in the loop at every rotation.
    Contract: `remove(path)` renames the directory to `.removing-<name>` before it returns and queues
    its deletion. `wait()` returns when everything queued so far is deleted, and raises the first
    failure (an OSError naming the file). Every save waits first (check_free_space), so the space
    is back before it is needed, as with a deletion in the loop. A deletion cut short by the end of
    the process leaves `.removing-*`, which clean_leftovers deletes on the next start; the thread is
    joined at interpreter exit, so a normal exit finishes the deletions first.
    """

    def __init__(self):
        self._pool = None
        self._pending = []

    def remove(self, path: Path) -> None:
        path = Path(path)
        doomed = path.with_name(REMOVING_PREFIX + path.name)
        os.replace(path, doomed)  # atomic: from here on the checkpoint is gone for every reader
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-removal")
        self._pending.append(self._pool.submit(shutil.rmtree, doomed))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for removal in pending:
            removal.result()  # re-raises the worker's OSError here, in the loop


_removals = BackgroundRemovals()  # one per process: the main process is the only one that rotates


def wait_for_removals() -> None:
    """Block until every checkpoint rotated away in the background is deleted; raise its OSError if one failed."""
    _removals.wait()


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
    Raises CheckpointError naming the file if anything cannot be read safely.
    """
    path = Path(path)
    state, log_history, run_history = read_trainer_state(path / TRAINER_STATE_NAME)
    same_world = state.world_size == accelerator.num_processes
    rng_rank = accelerator.process_index if same_world else 0
    # Read our RNG file first and strictly, so a refused file stops us before anything changes.
    rng = _load_rng_file(path / RNG_FILE_PATTERN.format(rank=rng_rank))
    accelerator.load_state(str(path))
    restore_rng_state(rng)
    return state, log_history, run_history


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


def save_final_model(model, tokenizer, output_dir: Path, state_dict) -> None:
    """Write the final model and tokenizer into OUTPUT_DIR with save_pretrained (main process).

    Written into a temporary directory first and moved file by file, weights last but one
    and config.json last, so `from_pretrained(OUTPUT_DIR)` never sees new weights with no
    config or a half-written file.
    """
    output_dir = Path(output_dir)
    temporary = output_dir / ".tmp-final-model"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, state_dict=state_dict, safe_serialization=True)
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
