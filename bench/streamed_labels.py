"""Benchmark: launch → first trained step of a streamed classifier's resume, 1 GB against 10 MB.

    .venv/bin/python bench/streamed_labels.py [--large_gigabytes 1.0 --small_megabytes 10 --repeats 3 --before /work/main]

Writes two corpora of 20 JSON Lines shards with ~10 KB rows and three string labels into a
temporary directory under /tmp (deleted at the end), then, for each corpus:

  first start  launch → first step without --label_names (one scan of the label column: its own
               duration as the program reports it) and with --label_names (no scan)
  resume       launch → first step after a resume from a real checkpoint (step 2, buffer full), the
               corpora alternating, --repeats times; medians. The resume reads the labels from the
               checkpoint: its time should not grow with the corpus.
  before       (with --before DIR, e.g. an older checkout) the same resume with DIR/train_loop.py,
               which scanned the label column at every start: the cost this removes.

Timings on a shared machine: compare the columns of one run, side by side.
"""

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from timeline import run_until, step_times, until_step

REPO = Path(__file__).resolve().parent.parent
LABELS = ("negative", "neutral", "positive")
SHARDS = 20


def write_corpus(folder: Path, total_bytes: int, seed: int = 0) -> int:
    """20 shards of ~10 KB rows {"text", "label"} adding up to `total_bytes`; returns the row count."""
    rng = random.Random(seed)
    words = "the of and to in is was for on that with as by at from his an were are which this be has or had it not first one".split()
    pool = []
    for _ in range(512):
        text = " ".join(rng.choice(words) for _ in range(3300))[:10_000]
        pool.append(json.dumps({"text": text, "label": rng.choice(LABELS)}) + "\n")
    folder.mkdir(parents=True)
    rows = 0
    for shard in range(SHARDS):
        with open(folder / f"shard-{shard:02d}.jsonl", "w") as handle:
            written = 0
            while written < total_bytes // SHARDS:
                line = pool[rng.randrange(len(pool))]
                handle.write(line)
                written += len(line)
                rows += 1
    return rows


def command(repo: Path, corpus: Path, output_dir: Path, *flags) -> list[str]:
    return [
        sys.executable, str(repo / "train_loop.py"), "--output_dir", str(output_dir), "--train_file", str(corpus / "shard-*.jsonl"),
        "--streaming", "--task", "sequence-classification", "--config_name", str(REPO / "tests" / "tiny-gpt2.json"),
        "--block_size", "64", "--per_device_train_batch_size", "8", "--shuffle_buffer_size", "64", "--logging_steps", "1", *map(str, flags),
    ]  # fmt: skip


def first_step(lines) -> float:
    return min(step_times(lines).values())


def scan_seconds(lines) -> float | None:
    found = next((line for _, line in lines if "Found" in line and "labels in" in line), None)
    return float(re.search(r"\(([\d.]+) s\)", found)[1]) if found else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large_gigabytes", type=float, default=1.0)
    parser.add_argument("--small_megabytes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a checkout whose train_loop.py scans the labels at every start")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="streamed-labels-", dir="/tmp"))
    try:
        small, large = f"{args.small_megabytes:g} MB", f"{args.large_gigabytes:g} GB"
        corpora = {small: scratch / "small", large: scratch / "large"}
        sizes = {small: int(args.small_megabytes * 1e6), large: int(args.large_gigabytes * 1e9)}
        rows = {name: write_corpus(folder, sizes[name]) for name, folder in corpora.items()}
        label_names = ["--label_names", ",".join(sorted(LABELS))]

        first, scans, given = {}, {}, {}
        for name, corpus in corpora.items():
            lines = run_until(command(REPO, corpus, scratch / f"run-{name}", "--max_steps", 2, "--save_steps", 2), None, lambda line: line.startswith("💾 Saved checkpoint-2"), timeout=3600, cwd=REPO)
            first[name], scans[name] = first_step(lines), scan_seconds(lines)
            lines = run_until(command(REPO, corpus, scratch / f"given-{name}", "--max_steps", 1000, *label_names), None, until_step(1), cwd=REPO)
            given[name] = first_step(lines)

        resumed = {name: [] for name in corpora}
        before = {name: [] for name in corpora}
        for repeat in range(args.repeats):
            for name in corpora if repeat % 2 == 0 else reversed(corpora):
                flags = ("--max_steps", 1000, "--save_steps", 10**6)
                lines = run_until(command(REPO, corpora[name], scratch / f"run-{name}", *flags), None, until_step(3), cwd=REPO)
                assert any("labels from checkpoint-2" in line for _, line in lines) and not any("Finding the labels" in line for _, line in lines)
                resumed[name].append(step_times(lines)[3])
                if args.before:
                    lines = run_until(command(args.before, corpora[name], scratch / f"run-{name}", *flags), None, until_step(3), cwd=REPO)
                    before[name].append(step_times(lines)[3])

        print(f"\n20 shards of JSON Lines, ~10 KB rows ({rows[small]:,} and {rows[large]:,} rows), tiny model, seconds from launch to the step line")
        print("\n| corpus | first start: scan (s) | first start → step 1 | with --label_names → step 1 | resume → first step (median) | each resume |" + (" before: resume (median) |" if args.before else ""))
        print("|---|---|---|---|---|---|" + ("---|" if args.before else ""))
        for name in corpora:
            extra = f" {statistics.median(before[name]):.2f} |" if args.before else ""
            print(f"| {name} | {scans[name]:.2f} | {first[name]:.2f} | {given[name]:.2f} | {statistics.median(resumed[name]):.2f} | {', '.join(f'{t:.2f}' for t in resumed[name])} |{extra}")
        ratio = statistics.median(resumed[large]) / statistics.median(resumed[small])
        extra = f" {statistics.median(before[large]) / statistics.median(before[small]):.3f}x |" if args.before else ""
        print(f"| {large} / {small} | | {first[large] / first[small]:.3f}x | {given[large] / given[small]:.3f}x | **{ratio:.3f}x** | |{extra}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
