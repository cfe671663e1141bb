"""--streaming: training data read lazily from local files, tokenized on the fly, resumed exactly.

    expand_train_files(pattern)   the files of --train_file (one file or a glob), sorted
    TrainingStream                one rank's reader: batches, state_dict / load_state_dict
    check_world_size(...)         a resume on another number of processes: refused or, if allowed, what happens

Contract of one rank's reader (`TrainingStream`):

  What it reads.  Rank r of W reads, in every epoch, the r-th of W equal parts of each file:
    text formats (.txt, .jsonl/.json as JSON Lines, .csv) by byte range, a line belonging to the
    range its first byte is in; .parquet by row range. The files come in an order drawn from
    (--seed, epoch). Epochs follow each other without end; the loop stops at --max_steps. Every
    rank's part is disjoint from every other's.
  What it yields.  Batches of --per_device_train_batch_size examples. causal-lm: blocks of exactly
    --block_size tokens cut from the concatenated token ids of consecutive rows (as the pre-tokenized
    path does, but without dropping anything at epoch ends: the remainder carries over).
    sequence-classification: one example per row, truncated to --block_size.
    Shuffle buffer of B > 1 examples: the first B examples fill it; then each example handed out is a
    slot drawn uniformly by a PCG64 generator seeded from (--seed, rank), and the next example read
    takes its place.
  What it snapshots.  `state_dict()`, taken between two batches, holds everything that determines the
    next batch: the epoch, the file (its slot in the epoch's order), the byte offset (parquet: row)
    of the first row not yet packed, the packing remainder, the examples cut but not yet in the
    buffer, the buffer itself and the generator's state. It does not depend on
    --dataloader_num_workers, which only sets how many processes tokenize: a run may resume with
    another number of workers and stay exact.
  Workers.  With N > 0 workers, N forked processes parse and tokenize chunks of rows (stateless: bytes
    in, token ids out), at most 2N chunks ahead of the packer; their results are used in order. An
    error in a worker is raised in the training process at the batch that needed it. Workers die
    with the training process (PR_SET_PDEATHSIG) and ignore Ctrl+C (the training process handles it).
  Labels.  Classification takes the run's labels (class_labels.py: the checkpoint's, --label_names,
    or stream_label_names' one pass at a first start). A row with another label is a DataError naming
    its file and line (parquet: row), raised at the batch that reads it.
  Cost of a resume.  A seek to the byte offset (parquet: one row group read); nothing before it is
    read again, and the labels come from the checkpoint.
  Memory.  The buffer, the chunks in flight and one batch: it does not grow with the corpus.

On disk. The stream is a resumable.Run stream (iterated by run.batches, state_dict/load_state_dict):
the snapshot is OUTPUT_DIR/checkpoint-N/stream_state_<rank>.pt (resumable/streams.py), taken on every
rank at the step being saved and covered by the checkpoint's manifest.
"""

from __future__ import annotations

import collections
import csv
import glob
import io
import json
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cli.class_labels import UnknownLabel, label_ids, unknown_label_line
from cli.data import data_builder_for
from resumable.errors import DataError, UsageError

CHUNK_BYTES = 128 << 10  # rows handed to a tokenizing worker at a time: ~128 KiB of text
CHUNK_ROWS = 4096  # parquet rows per chunk


def expand_train_files(pattern: str) -> list[str]:
    """The files --train_file names: the file itself, or the sorted matches of a glob."""
    if Path(pattern).is_file():
        return [pattern]
    return sorted(path for path in glob.glob(pattern, recursive=True) if Path(path).is_file())


def stream_identity(files: list[str]) -> str:
    """What a resume compares: each file's name and size, and a hash of its first and last 64 KiB.

    Cheap at every start whatever the corpus size (a full content hash would read it all).
    """
    import xxhash

    digest = xxhash.xxh3_128()
    for path in files:
        size = os.path.getsize(path)
        digest.update(f"{Path(path).name}:{size}".encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(1 << 16))
            handle.seek(max(0, size - (1 << 16)))
            digest.update(handle.read(1 << 16))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- parsing and tokenizing (in workers)

_worker_tokenizer = None


def _start_worker(tokenizer) -> None:
    """Runs once in each forked worker: die with the parent, leave Ctrl+C and SIGTERM to it."""
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a kill -9 of the trainer takes us too
    except (OSError, AttributeError):
        pass  # not Linux: the executor's own shutdown still ends us on a clean exit


def _tokenize_in_worker(spec: dict, payload):
    return tokenize_chunk(_worker_tokenizer, spec, payload)


def rows_of(spec: dict, payload) -> tuple[list, list | None]:
    """(texts, labels or None) from a chunk: raw lines of a text format, or parquet columns."""
    kind, text_column, label_column = spec["kind"], spec["text_column"], spec["label_column"]
    wants_labels = spec["task"] == "sequence-classification"
    if kind == "parquet":
        return payload[0], (payload[1] if wants_labels else None)
    lines = payload
    if kind == "text":
        return [line.decode("utf-8").rstrip("\r\n") for line in lines], None
    if kind == "csv":
        records = list(csv.DictReader(io.StringIO("".join(line.decode("utf-8") for line in lines)), fieldnames=spec["csv_header"]))
    else:  # JSON Lines
        records = [json.loads(line) for line in lines if line.strip()]
    try:
        texts = [record[text_column] for record in records]
        labels = [record[label_column] for record in records] if wants_labels else None
    except KeyError as missing:
        raise DataError(f"a row has no column {missing}; check --text_column / --label_column") from None
    return texts, labels


def tokenize_chunk(tokenizer, spec: dict, payload):
    """causal-lm: one int32 array of the rows' token ids, concatenated. Classification: (arrays, label ids)."""
    texts, labels = rows_of(spec, payload)
    if spec["task"] == "causal-lm":
        ids = tokenizer(texts)["input_ids"] if texts else []
        return np.fromiter((token for row in ids for token in row), dtype=np.int32)
    encoded = tokenizer(texts, truncation=True, max_length=spec["block_size"])["input_ids"] if texts else []
    label_to_id, ids = spec["label_to_id"], []
    for index, label in enumerate(labels):
        if str(label) not in label_to_id:
            raise UnknownLabel(label, index)  # the reader, which knows the file and the offset, says where
        ids.append(label_to_id[str(label)])
    return [np.asarray(row, dtype=np.int32) for row in encoded], ids


# --------------------------------------------------------------------------- reading one rank's part of a file


class FilePart:
    """Rank r's part of one file: [start, end) in bytes (text formats) or rows (parquet).

    `columns` (text, then label or None) are read from parquet files; text formats hand out raw lines.
    """

    def __init__(self, path: str, kind: str, rank: int, world_size: int, columns: tuple, csv_header_end: int = 0):
        self.path, self.kind = path, kind
        self.text_column, self.label_column = columns
        if kind == "parquet":
            import pyarrow.parquet as pq

            total = pq.ParquetFile(path).metadata.num_rows
            first = 0
        else:
            total = os.path.getsize(path)
            first = csv_header_end  # the csv header belongs to no rank's rows
        span = total - first
        self.start = first + span * rank // world_size
        self.end = first + span * (rank + 1) // world_size

    @property
    def size(self) -> int:
        return self.end - self.start

    def chunks(self, position: int):
        """(position after the chunk, payload) from `position` (None: the part's start) to the part's end."""
        if self.kind == "parquet":
            yield from self._parquet_chunks(self.start if position is None else position)
        else:
            yield from self._line_chunks(position)

    def _line_chunks(self, position):
        with open(self.path, "rb") as handle:
            if position is None:
                position = self.start
                if self.start > 0:
                    handle.seek(self.start - 1)
                    handle.readline()  # the line in progress at `start` belongs to the previous part
                    position = handle.tell()
            handle.seek(position)
            while position < self.end:
                lines, size = [], 0
                while position < self.end and size < CHUNK_BYTES:
                    line = handle.readline()
                    if not line:
                        position = self.end  # end of file
                        break
                    lines.append(line)
                    size += len(line)
                    position += len(line)
                yield position, lines

    def _parquet_chunks(self, position):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.path)
        columns = [self.text_column] + ([self.label_column] if self.label_column else [])
        row_group_start = 0
        for group in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            group_end = row_group_start + rows
            if group_end > position and row_group_start < self.end:
                table = parquet.read_row_group(group, columns=columns)
                begin = max(position, row_group_start)
                while begin < min(group_end, self.end):
                    stop = min(begin + CHUNK_ROWS, group_end, self.end)
                    piece = table.slice(begin - row_group_start, stop - begin)
                    texts = piece.column(self.text_column).to_pylist()
                    labels = piece.column(self.label_column).to_pylist() if self.label_column else None
                    yield stop, (texts, labels)
                    begin = stop
            row_group_start = group_end


# --------------------------------------------------------------------------- the stream of one rank


class TrainingStream:
    """One rank's endless stream of training batches; see the module docstring for the contract."""

    def __init__(self, config, tokenizer, files: list[str], rank: int, world_size: int, per_device_batch: int, device, label_names=None):
        from cli.data import Collator

        self.config, self.tokenizer, self.files, self.label_names = config, tokenizer, files, label_names
        self.rank, self.world_size, self.per_device_batch, self.device = rank, world_size, per_device_batch, device
        self.batch_size = per_device_batch  # what resumable.Run reads as the per-device batch (trainer_state.json's samples_seen)
        self.kind = data_builder_for(files[0])
        self.spec = {
            "kind": self.kind, "task": config.task, "text_column": config.text_column, "block_size": config.block_size,
            "label_column": config.label_column, "label_to_id": label_ids(label_names or []),
            "csv_header": None,
        }  # fmt: skip
        self.parts = [self._part(path) for path in files]
        self.part_bytes = sum(part.size for part in self.parts)
        self.buffer_size = config.shuffle_buffer_size
        self.collate = Collator(config.task, tokenizer.pad_token_id)
        self.workers = config.dataloader_num_workers
        self._executor = None
        self._orders = {}  # epoch -> file order, for the current and the next epoch
        self._reset_position(epoch=0)
        self.rng = np.random.Generator(np.random.PCG64([config.seed, rank]))

    def _part(self, path: str) -> FilePart:
        header_end, names = file_columns(path, self.kind)
        if self.kind == "csv":
            if self.spec["csv_header"] not in (None, names):  # rows are parsed with one header for all files
                raise DataError(f"{path}: its csv header differs from {self.files[0]}'s; with --streaming every file needs the same columns in the same order")
            self.spec["csv_header"] = names
        columns = needed_columns(path, names, self.config)
        return FilePart(path, self.kind, self.rank, self.world_size, columns, header_end)

    # ---- position
    def file_order(self, epoch: int) -> list[int]:
        """The files' order in `epoch`: the same on every rank, a function of (--seed, epoch)."""
        if epoch not in self._orders:
            self._orders[epoch] = [int(i) for i in np.random.default_rng([self.config.seed, epoch]).permutation(len(self.files))]
            for old in [e for e in self._orders if e < epoch - 1]:  # the reader may be an epoch ahead of the packer
                del self._orders[old]
        return self._orders[epoch]

    def _reset_position(self, epoch: int) -> None:
        self.epoch_index, self.file_slot, self.offset = epoch, 0, None  # None: the start of the part
        self.remainder = np.zeros(0, dtype=np.int32)
        self.pending = collections.deque()  # (input_ids, label) cut from the last chunk, not yet in the buffer
        self.buffer = []
        self._chunks = None
        self._chunk_size, self._chunk_examples = 0, 0  # for the epoch's fraction only

    @property
    def epoch(self) -> float:
        """Epochs read by this rank, with the fraction of the current one by bytes (parquet: rows)."""
        done = sum(self.parts[i].size for i in self.file_order(self.epoch_index)[: self.file_slot])
        if self.offset is not None and self.file_slot < len(self.parts):
            part = self.parts[self.file_order(self.epoch_index)[self.file_slot]]
            done += min(part.end, max(part.start, self.offset)) - part.start
            done -= self._chunk_size * len(self.pending) / max(1, self._chunk_examples)  # the last chunk, pro rata
        return self.epoch_index + (done / self.part_bytes if self.part_bytes else 0.0)

    # ---- chunks: read here, tokenized here or in the workers, always used in order
    def _raw_chunks(self):
        """(epoch, file slot, position after, payload) from the saved position on, across epochs, without end."""
        epoch, slot, offset = self.epoch_index, self.file_slot, self.offset
        while True:
            order = self.file_order(epoch)
            whole_epoch, rows = slot == 0 and offset is None, False
            while slot < len(order):
                for position, payload in self.parts[order[slot]].chunks(offset):
                    rows = True
                    yield epoch, slot, position, payload
                slot, offset = slot + 1, None
            if whole_epoch and not rows:  # else this rank would read empty epochs forever
                raise DataError(f"rank {self.rank}'s part of --train_file holds no rows; use more data or fewer processes")
            epoch, slot, offset = epoch + 1, 0, None

    def _checked(self, tokenized, epoch: int, slot: int, position: int, payload):
        """The chunk's tokens; a row with an unknown label becomes one line naming its file and line."""
        try:
            return tokenized()
        except UnknownLabel as error:
            part = self.parts[self.file_order(epoch)[slot]]
            line = unknown_label_line(part.path, self.kind, position, payload, error, self.label_names)
            if os.environ.get("LOCAL_RANK", "0") != "0":  # train_loop.report() prints the first process's errors only; this row is ours alone
                print(f"error: {line}", file=sys.stderr, flush=True)
            raise DataError(line) from None

    def _tokenized_chunks(self):
        raw = self._raw_chunks()
        if not self.workers:
            for epoch, slot, position, payload in raw:
                yield epoch, slot, position, self._checked(lambda: tokenize_chunk(self.tokenizer, self.spec, payload), epoch, slot, position, payload)
            return
        if self._executor is None:
            import multiprocessing

            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize one row batch each
            self._executor = ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"), initializer=_start_worker, initargs=(self.tokenizer,))
        in_flight = collections.deque()
        for epoch, slot, position, payload in raw:
            in_flight.append((epoch, slot, position, payload, self._executor.submit(_tokenize_in_worker, self.spec, payload)))
            if len(in_flight) >= 2 * self.workers:
                epoch_, slot_, position_, payload_, future = in_flight.popleft()
                yield epoch_, slot_, position_, self._checked(future.result, epoch_, slot_, position_, payload_)

    def _next_example(self):
        """The next example in stream order (before the shuffle buffer)."""
        while not self.pending:
            if self._chunks is None:
                self._chunks = self._tokenized_chunks()
            epoch, slot, position, tokens = next(self._chunks)
            if self.config.task == "causal-lm":
                tokens = np.concatenate([self.remainder, tokens])
                usable = len(tokens) - len(tokens) % self.config.block_size
                # copies: a view would keep the whole chunk alive for as long as its block sits in the buffer
                self.pending.extend((block.copy(), -1) for block in tokens[:usable].reshape(-1, self.config.block_size))
                self.remainder = tokens[usable:].copy()
            else:
                self.pending.extend(zip(*tokens))
            if (epoch, slot) == (self.epoch_index, self.file_slot) and self.offset is not None:
                self._chunk_size = position - self.offset
            else:
                self._chunk_size = position - self.parts[self.file_order(epoch)[slot]].start
            self._chunk_examples = len(self.pending)
            self.epoch_index, self.file_slot, self.offset = epoch, slot, position  # the first row not yet packed
        return self.pending.popleft()

    def _next_shuffled(self):
        if self.buffer_size <= 1:
            return self._next_example()
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._next_example())
        slot = int(self.rng.integers(self.buffer_size))
        example, self.buffer[slot] = self.buffer[slot], self._next_example()
        return example

    def next_batch(self) -> dict:
        examples = [self._next_shuffled() for _ in range(self.per_device_batch)]
        if self.config.task == "causal-lm":
            import torch

            input_ids = torch.from_numpy(np.stack([ids for ids, _ in examples]).astype(np.int64))
            batch = {"input_ids": input_ids, "labels": input_ids}
        else:
            batch = self.collate([{"input_ids": ids, "labels": label} for ids, label in examples])
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def __iter__(self):
        """This rank's micro-batches, from the restored position on, without end (run.batches stops at --max_steps)."""
        while True:
            yield self.next_batch()

    def close(self) -> None:
        """End the tokenizing workers, and wait for the executor's manager thread. Left to garbage collection
        or shut down without waiting, that thread closes its wake-up pipe while the interpreter's exit writes
        to it (Python 3.11 checks the pipe without a lock): `OSError: [Errno 9] Bad file descriptor` after
        a Ctrl+C, seen once in the suite."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # ---- the snapshot (resumable/streams.py writes and reads it)
    def state_dict(self) -> dict:
        """{"arrays", "metadata"}: the exact position between two batches. See the module docstring."""
        def pack(examples):
            ids = [np.asarray(ids, dtype=np.int32) for ids, _ in examples]
            return {
                "tokens": np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32),
                "lengths": np.asarray([len(x) for x in ids], dtype=np.int64),
                "labels": np.asarray([label for _, label in examples], dtype=np.int64),
            }

        arrays = {"remainder": self.remainder}
        arrays.update({f"buffer.{k}": v for k, v in pack(self.buffer).items()})
        arrays.update({f"pending.{k}": v for k, v in pack(self.pending).items()})
        metadata = {
            "epoch": self.epoch_index, "file_slot": self.file_slot, "offset": self.offset, "epoch_progress": self.epoch,
            "rank": self.rank, "world_size": self.world_size, "files": [Path(p).name for p in self.files],
            "shuffle_buffer_size": self.buffer_size, "rng": self.rng.bit_generator.state,
            "chunk_size": self._chunk_size, "chunk_examples": self._chunk_examples,
        }  # fmt: skip
        return {"arrays": arrays, "metadata": metadata}

    def load_state_dict(self, snapshot: dict) -> None:
        """The position of `snapshot`; one written by another number of processes (--allow_config_change, given rank 0's)
        starts this rank's part of its epoch afresh: the parts, and so the positions, differ."""
        arrays, metadata = snapshot["arrays"], snapshot["metadata"]
        if metadata["world_size"] != self.world_size:
            self.start_epoch_afresh(int(metadata["epoch"]))
            return
        self._load_position(arrays, metadata)

    def _load_position(self, arrays: dict, metadata: dict) -> None:
        def unpack(prefix):
            lengths, labels = arrays[f"{prefix}.lengths"], arrays[f"{prefix}.labels"]
            pieces = np.split(arrays[f"{prefix}.tokens"], np.cumsum(lengths)[:-1]) if len(lengths) else []
            return [(piece.astype(np.int32), int(label)) for piece, label in zip(pieces, labels)]

        self._reset_position(metadata["epoch"])  # chunks read ahead from the old position are dropped
        self.file_slot, self.offset = metadata["file_slot"], metadata["offset"]
        self.remainder = arrays["remainder"].astype(np.int32)
        self.buffer = unpack("buffer")
        self.pending = collections.deque(unpack("pending"))
        self.rng.bit_generator.state = metadata["rng"]
        self._chunk_size, self._chunk_examples = metadata["chunk_size"], metadata["chunk_examples"]

    def start_epoch_afresh(self, epoch: int) -> None:
        """--allow_config_change on another number of processes: this rank's part of `epoch` from its start."""
        self.close()
        self._reset_position(epoch)


def training_stream(config, tokenizer, files: list[str], accelerator, plan, label_names=None) -> "TrainingStream":
    """This rank's stream for the run: given to run.batches, which checkpoints its position."""
    stream = TrainingStream(config, tokenizer, files, accelerator.process_index, accelerator.num_processes, plan.per_device, accelerator.device, label_names)
    stream.steps_per_epoch, stream.total_steps = 0, config.max_steps  # no known length: --max_steps is required
    stream.fingerprint = stream_identity(files) + f":shuffle_buffer_size={config.shuffle_buffer_size}"
    stream.samples, stream.dataloader = None, None
    return stream


def check_world_size(checkpoint_state, world_size: int, allow_change: bool):
    """None if the checkpoint's number of processes is this run's; else refuse (UsageError) or, if allowed, a note."""
    if checkpoint_state is None or checkpoint_state.world_size == world_size:
        return None
    before = checkpoint_state.world_size
    consequence = (
        f"each of the {world_size} processes would start its part of the checkpoint's current epoch from the beginning, "
        "with an empty shuffle buffer (examples already trained on in that epoch are trained on again)"
    )
    if not allow_change:
        raise UsageError(
            f"--streaming: the checkpoint was written by {before} process(es), this run has {world_size}; each process reads "
            f"its own part of the stream, so only {before} resume(s) exactly. With --allow_config_change {consequence}."
        )
    return f"⚠️  --allow_config_change: {before} → {world_size} processes; {consequence}"


# --------------------------------------------------------------------------- setting up (train_loop.py)


def file_columns(path: str, kind: str) -> tuple[int, list | None]:
    """(bytes of the csv header line, the column names) of a csv or parquet file; (0, None) for text and JSON Lines."""
    if kind == "csv":
        with open(path, "rb") as handle:
            header = handle.readline()
        return len(header), next(csv.reader([header.decode("utf-8")]))
    if kind == "parquet":
        import pyarrow.parquet as pq

        return 0, pq.read_schema(path).names
    return 0, None


def needed_columns(path: str, names: list | None, config) -> tuple:
    """(text column, label column or None) that a file must have; DataError naming the flag if it has not."""
    columns = (config.text_column, config.label_column if config.task == "sequence-classification" else None)
    missing = [column for column in columns if column and names is not None and column not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(names)}); check --text_column / --label_column")
    return columns


def stream_label_names(files: list[str], config, say=print) -> list:
    """Classification: the sorted distinct labels, from one pass over every row (a first start without
    --label_names; a resume takes them from its checkpoint). Says how far it is, about every 5 s."""
    import time

    from resumable.state import human_bytes

    spec = {"kind": data_builder_for(files[0]), "task": config.task, "text_column": config.text_column, "label_column": config.label_column, "csv_header": None}
    total, done, labels = sum(os.path.getsize(path) for path in files), 0, set()
    began = shown = time.monotonic()
    say(f"🏷️  Finding the labels: one pass over {len(files)} file(s), {human_bytes(total)} (--label_names a,b,c skips it)")
    for path in files:
        header_end, columns = file_columns(path, spec["kind"])
        spec["csv_header"] = columns if spec["kind"] == "csv" else None
        part = FilePart(path, spec["kind"], 0, 1, needed_columns(path, columns, config), header_end)  # checked before any row is read
        for position, payload in part.chunks(None):
            labels.update(rows_of(spec, payload)[1])
            if time.monotonic() - shown > 5:
                shown = time.monotonic()
                read = done + (position / max(1, part.end) * os.path.getsize(path) if spec["kind"] == "parquet" else position)
                say(f"🏷️  Finding the labels: {human_bytes(read)} / {human_bytes(total)} read ({100 * read / max(1, total):.0f} %)")
        done += os.path.getsize(path)
    if None in labels:
        raise DataError(f"--label_column {config.label_column!r} has empty values; every training row needs a label")
    names = sorted(labels)
    say(f"🏷️  Found {len(names)} labels in {human_bytes(total)} ({time.monotonic() - began:.1f} s): {', '.join(map(str, names))}")
    return names


def validation_data(config, tokenizer, accelerator, names):
    """--validation_file, loaded and tokenized the usual (cached, in-memory) way: evaluation data is small."""
    from cli.data import causal_lm_blocks, classification_examples, load_validation_file

    if not config.validation_file:
        return None
    raw = load_validation_file(config)
    if config.task == "causal-lm":
        return causal_lm_blocks(raw, tokenizer, config, accelerator)
    return classification_examples(raw, tokenizer, config, accelerator, names)
