"""The streaming reader in-process: every format, disjoint ranks, and a snapshot that resumes exactly."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from cli import streaming  # noqa: E402
from cli.config import TrainingConfig  # noqa: E402
from conftest import tiny_flags, train  # noqa: E402

ROWS = [f"row {i} " + "word " * (i % 7) for i in range(500)]
LABELS = ["neg" if i % 3 else "pos" for i in range(500)]


def write(folder: Path, kind: str) -> Path:
    path = folder / f"data.{kind}"
    if kind == "txt":
        path.write_text("\n".join(ROWS) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(ROWS, LABELS)))
    elif kind == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["label", "text"])
            writer.writerows(zip(LABELS, ROWS))
    else:
        pq.write_table(pa.table({"text": ROWS, "label": LABELS}), path, row_group_size=64)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_disjoint_parts_that_cover_every_row(tmp_path, kind, world_size):
    path = write(tmp_path, kind)
    spec = {"kind": streaming.data_builder_for(str(path)), "task": "sequence-classification", "text_column": "text",
            "label_column": "label", "csv_header": ["label", "text"]}  # fmt: skip
    header_end = len(path.open("rb").readline()) if kind == "csv" else 0
    read = []
    for rank in range(world_size):
        part = streaming.FilePart(str(path), spec["kind"], rank, world_size, ("text", "label" if kind != "txt" else None), header_end)
        for _, payload in part.chunks(None):
            read += streaming.rows_of({**spec, "task": "causal-lm" if kind == "txt" else spec["task"]}, payload)[0]
    assert read == ROWS  # each row once, in file order rank after rank


class ByteTokenizer:
    pad_token_id = 0

    def __call__(self, texts, truncation=False, max_length=None):
        ids = [[b + 3 for b in text.encode()][: max_length if truncation else None] for text in texts]
        return {"input_ids": ids}


def stream_of(path, task="causal-lm", workers=0, rank=0, world_size=1):
    config = TrainingConfig(train_file=str(path), streaming=True, max_steps=10, block_size=16, task=task,
                            shuffle_buffer_size=50, dataloader_num_workers=workers, seed=3)  # fmt: skip
    names = streaming.stream_label_names([str(path)], config) if task != "causal-lm" else None
    return streaming.TrainingStream(config, ByteTokenizer(), [str(path)], rank, world_size, 4, "cpu", names)


@pytest.mark.parametrize("kind, task", [("txt", "causal-lm"), ("parquet", "causal-lm"), ("csv", "sequence-classification"), ("jsonl", "sequence-classification")])
def test_a_snapshot_on_disk_resumes_at_the_exact_batch(tmp_path, kind, task):
    path = write(tmp_path, kind)
    uninterrupted = stream_of(path, task)
    expected = [uninterrupted.next_batch() for _ in range(300)]  # crosses epochs: 500 short rows
    assert uninterrupted.epoch > 1

    first = stream_of(path, task)
    for _ in range(137):
        first.next_batch()
    torch.save(first.state_dict(), tmp_path / "position.pt")  # as resumable.Run keeps it (stream_state_<rank>.pt)
    resumed = stream_of(path, task, workers=2)  # another number of workers: the same stream
    resumed.load_state_dict(torch.load(tmp_path / "position.pt", weights_only=False))
    try:
        for want in expected[137:]:
            got = resumed.next_batch()
            assert all(np.array_equal(got[name].numpy(), want[name].numpy()) for name in want)
    finally:
        resumed.close()


def test_a_missing_snapshot_is_an_error_naming_the_file(tmp_path):
    from resumable import streams
    from resumable.errors import UsageError

    with pytest.raises(UsageError, match="it holds no stream_state_1.pt"):
        streams.RankStream(iter([]), None, rank=1, world_size=2).load(tmp_path)


def test_streaming_without_max_steps_is_refused_in_one_line(tmp_path, session_env):
    path = write(tmp_path, "txt")
    result = train(session_env, tmp_path / "run", tiny_flags(path, streaming=True, max_steps=None))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --streaming needs --max_steps: a stream has no known length"


def test_a_missing_column_is_named(tmp_path):
    path = write(tmp_path, "parquet")
    config = TrainingConfig(train_file=str(path), streaming=True, max_steps=10, text_column="body")
    with pytest.raises(streaming.DataError, match="no column 'body' \\(columns: text, label\\)"):
        streaming.TrainingStream(config, ByteTokenizer(), [str(path)], 0, 1, 4, "cpu")


def test_a_missing_label_column_is_named_before_the_labels_are_read(tmp_path):
    path = write(tmp_path, "parquet")
    config = TrainingConfig(train_file=str(path), streaming=True, max_steps=10, task="sequence-classification", label_column="stars")
    with pytest.raises(streaming.DataError, match="no column 'stars' \\(columns: text, label\\)"):
        streaming.stream_label_names([str(path)], config)
