"""Where training stands, without touching the run: ./launch.sh status [--output_dir DIR] [--json] [--plot]

The library's status (resumable/status.py: trainer_state.json, the lock, every checkpoint verified,
backup_to's progress), plus what only the CLI knows: it hashes the data files the newest checkpoint
names, to say whether they are still there and unchanged. Never writes anything, except
OUTPUT_DIR/loss.png with --plot.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cli import data
from cli import identity
from resumable import state, status


def describe_data(checkpoint: Path) -> list[dict]:
    """Where the checkpoint's data files were read from, and whether they are there now with the same content."""
    try:
        recorded = state.recorded_settings(state.read_training_args(checkpoint))
    except (OSError, ValueError):  # removed by a running training's rotation while we looked
        return []
    cache = identity.HashCache(writable=False)
    found = []
    for flag, content in (("train_file", "data_content"), ("validation_file", "validation_content")):
        if flag == "train_file" and recorded.get("dataset_name"):
            found.append({"flag": "dataset_name", "where": recorded["dataset_name"], "checkpoint": checkpoint.name, "state": "hub"})
            continue
        if recorded.get(content) is None:  # no such file, or a checkpoint from before content identities
            continue
        path = recorded.get(flag)
        files = [path] if path else data.builtin_corpus_files()
        try:
            matches = identity.content_hash(files, cache) == recorded[content]
            situation = "matches" if matches else "changed"
        except FileNotFoundError:
            situation = "missing"
        except OSError:  # there, but not readable as the file it was (permissions, a directory now)
            situation = "unreadable"
        found.append({"flag": flag, "where": path or "the built-in corpus", "checkpoint": checkpoint.name, "state": situation})
    return found


def main(argv=None) -> int:
    return status.main(argv, prog="./launch.sh status", describe_data=describe_data, start_command="./launch.sh")


if __name__ == "__main__":
    sys.exit(main())
