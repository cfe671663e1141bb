"""--streaming classification: a resume takes its labels from the checkpoint, a first start from
--label_names or one scan; a row with another label is one line and exit 2."""

import json
import random
import shutil
from pathlib import Path

import pytest

from conftest import file_digest, kill_when, tiny_flags, train
from test_streaming import STEPS, kill_resume_and_compare

from resumable import state, streams

LABELS = ["neg", "neu", "pos"]


def write_labelled_shards(folder: Path, files: int = 3, rows: int = 40, odd_label_at: int | None = None, repeat: int = 1) -> Path:
    """JSON Lines shards of short texts (each `repeat` times over) with string labels; `odd_label_at`
    (a 1-based line) gets the label 'other' in every shard."""
    folder.mkdir(parents=True, exist_ok=True)
    words = "the quick brown fox jumps over a lazy dog while training resumes at the exact sample".split()
    for index in range(files):
        rng = random.Random(index)
        lines = []
        for line in range(1, rows + 1):
            label = "other" if line == odd_label_at else rng.choice(LABELS)
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
            lines.append(json.dumps({"text": " ".join([text] * repeat), "label": label}))
        (folder / f"part-{index}.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "part-*.jsonl"


def classifier_flags(train_file, **overrides):
    # 120 rows, steps of 2 micro-batches of 4: 60 steps cross four epochs, whose file orders differ.
    flags = dict(
        streaming=True, task="sequence-classification", shuffle_buffer_size=16, max_steps=STEPS, save_steps=7,
        gradient_accumulation_steps=2,
    )  # fmt: skip
    return tiny_flags(train_file, **{**flags, **overrides})


def id2label(output_dir: Path) -> list[str]:
    mapping = json.loads((output_dir / "config.json").read_text())["id2label"]
    return [mapping[str(index)] for index in range(len(mapping))]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_labelled_shards(tmp_path_factory.mktemp("labelled"))


@pytest.mark.slow
@pytest.mark.parametrize("label_names", [None, "pos,neg,neu"], ids=["scanned", "given"])
def test_killed_and_resumed_classifier_ends_byte_identical(tmp_path, session_env, labelled, label_names):
    reference, run = kill_resume_and_compare(tmp_path, session_env, classifier_flags(labelled, label_names=label_names))
    expected = label_names.split(",") if label_names else LABELS  # the user's order, else sorted
    assert id2label(run) == id2label(reference) == expected
    assert state.recorded_settings(state.read_training_args(run / "checkpoint-60"))["labels"] == expected


@pytest.mark.quick
def test_resume_after_the_files_moved_reads_no_label_column(tmp_path, session_env):
    flags = lambda files: classifier_flags(files, max_steps=14)  # noqa: E731
    before = write_labelled_shards(tmp_path / "before")
    reference = train(session_env, tmp_path / "reference", flags(before))
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]

    reads = tmp_path / "reads"
    first = kill_when(session_env, tmp_path / "run", flags(before), r"Saved checkpoint-7", harness_env={"HARNESS_RECORD_READS": str(reads)})
    assert "🏷️  Finding the labels: one pass over 3 file(s)" in first and "🏷️  Found 3 labels" in first
    assert reads.read_text().startswith("scan\n")

    shutil.move(tmp_path / "before", tmp_path / "after")  # the same bytes at another path
    reads.unlink()
    resumed = train(session_env, tmp_path / "run", flags(tmp_path / "after" / "part-*.jsonl"), harness_env={"HARNESS_RECORD_READS": str(reads)})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Finding the labels" not in resumed.stdout
    assert "🏷️  3 labels from checkpoint-7: neg, neu, pos" in resumed.stdout
    assert "✅ Resumed from checkpoint (step 7" in resumed.stdout

    # The first file read is the checkpoint's stream position, at its saved offset: no row before it, no scan.
    position = streams.saved_stream_state(tmp_path / "run" / "checkpoint-7", 0)["position"]["metadata"]
    kind, path, offset = reads.read_text().splitlines()[0].split("\t")
    assert (kind, offset) == ("read", str(position["offset"])) and position["offset"] is not None
    assert Path(path).parent == tmp_path / "after"
    assert "scan" not in reads.read_text().splitlines()

    assert file_digest(tmp_path / "run" / "model.safetensors") == file_digest(tmp_path / "reference" / "model.safetensors")
    assert id2label(tmp_path / "run") == LABELS


@pytest.mark.parametrize("workers", [0, 2])
def test_a_row_with_an_unknown_label_is_one_line_and_the_last_checkpoint_stays(tmp_path, session_env, workers):
    # Line 60 of each shard is labelled 'other'. Rows of ~5 KB: the reader takes ~26 rows per 128 KiB
    # chunk, so with a buffer of 4 and batches of 4 it meets line 60 after ~12 steps, past checkpoint-3.
    files = write_labelled_shards(tmp_path / "data", rows=80, odd_label_at=60, repeat=100)
    code_file = tmp_path / "exit_code"
    flags = classifier_flags(
        files, label_names="neg,neu,pos", shuffle_buffer_size=4, gradient_accumulation_steps=1, save_steps=3, logging_steps=1,
        dataloader_num_workers=workers, exit_code_file=code_file,
    )  # fmt: skip
    refused = train(session_env, tmp_path / "run", flags)
    assert refused.returncode == 2 and code_file.read_text().strip() == "2", refused.stdout[-2000:] + refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in refused.stdout + refused.stderr, refused.stderr[-3000:]
    assert errors[0].startswith(f"error: {tmp_path / 'data'}/part-") and errors[0].endswith("(a run with checkpoints starts over for that: --resume_from_checkpoint none)")
    assert ".jsonl line 60: label 'other' is not among the run's labels (neg, neu, pos)" in errors[0]
    saved = state.list_checkpoints(tmp_path / "run")
    assert saved, refused.stdout[-2000:]  # met mid-run: the checkpoints saved before are there and whole
    for checkpoint in saved:
        state.verify_checkpoint(checkpoint)


def test_label_names_that_differ_from_the_checkpoint_are_refused_in_one_line(tmp_path, session_env, labelled):
    flags = classifier_flags(labelled, max_steps=7)
    done = train(session_env, tmp_path / "run", flags)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    refused = train(session_env, tmp_path / "run", classifier_flags(labelled, max_steps=9, label_names="pos,neg,neu"))
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "error: --label_names pos,neg,neu: checkpoint-7 was trained with the labels neg,neu,pos (class ids in that order); "
        "resume with those or without --label_names, or start over with --resume_from_checkpoint none"
    )
    assert [p.name for p in state.list_checkpoints(tmp_path / "run")] == ["checkpoint-7"]


def test_label_names_on_the_map_style_path_set_the_ids_and_refuse_another_label_before_writing(tmp_path, session_env):
    write_labelled_shards(tmp_path / "data", files=1, rows=60)
    flags = tiny_flags(tmp_path / "data" / "part-0.jsonl", task="sequence-classification", max_steps=4, save_steps=2, label_names="pos,neu,neg")
    done = train(session_env, tmp_path / "run", flags)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert id2label(tmp_path / "run") == ["pos", "neu", "neg"]

    write_labelled_shards(tmp_path / "odd", files=1, rows=60, odd_label_at=17)
    refused = train(session_env, tmp_path / "refused", tiny_flags(tmp_path / "odd" / "part-0.jsonl", task="sequence-classification", max_steps=4, label_names="pos,neu,neg"))
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]  # datasets' progress bars aside
    assert errors == [
        f"error: {tmp_path / 'odd' / 'part-0.jsonl'} row 17: label 'other' is not among the run's labels (pos, neu, neg); "
        "fix or remove the row, or list the label in --label_names"
    ], refused.stderr[-2000:]
    assert not (tmp_path / "refused").exists()  # found at start: nothing written
