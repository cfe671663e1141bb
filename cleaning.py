"""The last step of a run: ./launch.sh clean [--output_dir DIR] [--force] [--backup_to DEST]

Keeps the final model (everything in OUTPUT_DIR that is not a checkpoint: the weights, config
and tokenizer files, trainer_state.json, runs/, merged/) and deletes the checkpoints, each one
crash-safely through state.delete_checkpoint (renamed to `.deleting-checkpoint-N` first, so a
kill part-way leaves no half checkpoint; the next start or clean finishes the deletion).

Guarantees:
  - a directory that holds no run (no trainer_state.json, no checkpoint) or is itself a checkpoint
    is refused (exit 2) before anything is written in it, the lock file included;
  - it holds the run's lock while it deletes: it refuses (exit 2) while a run holds it, and no
    run can start in the directory until it is done;
  - before training is complete (OUTPUT_DIR/trainer_state.json says so only after the final
    model is written) it deletes nothing (exit 2) unless --force;
  - damaged checkpoints moved aside (`checkpoint-N.corrupt`) and the folders a fresh start or an
    older resume archived (`previous-run-*`, `superseded-*`) are listed and kept: they were kept
    on purpose, and only the user knows whether they matter.
A later run of the training command in a cleaned directory says the run is complete and trains
nothing (resume.py), since there is no checkpoint left to continue from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resumable import backup
from resumable import state
from resumable.errors import EXIT_DONE, EXIT_FAILED, EXIT_USAGE

def checkpoints_to_delete(output_dir: Path) -> list[Path]:
    """Every `checkpoint-N` directory, oldest first (a kill part-way leaves the newest ones)."""
    return state.list_checkpoints(output_dir)


def has_final_model(output_dir: Path) -> bool:
    """Weights at the top of OUTPUT_DIR: model.safetensors, its shards, or a LoRA adapter_model.safetensors."""
    return any(output_dir.glob("*.safetensors"))


def backup_line(destination: str, deleting: list[str], committed: set[str]) -> str:
    """One line: which of the checkpoints about to be deleted here DEST holds, committed."""
    held = [name for name in deleting if name in committed]
    missing = [name for name in deleting if name not in committed]
    if not missing:
        return f"☁️  {destination} holds every checkpoint deleted here ({', '.join(held)})"
    if not held:
        return f"⚠️  {destination} holds none of the checkpoints deleted here: after this, the final model is the only copy of this run"
    return f"⚠️  {destination} holds {', '.join(held)}, not {', '.join(missing)}: those exist only here and are gone after this"


def size_of(paths: list[Path]) -> int:
    return sum(state.directory_size(path) if path.is_dir() else path.stat().st_size for path in paths)


def clean(output_dir: Path, force: bool, backup_to: str | None) -> int:
    """Under the lock: check, say what goes and what stays, delete. The exit code."""
    live = state.read_live_state(output_dir) or {}
    complete = bool(live.get("training_complete")) and has_final_model(output_dir)
    if not complete and not force:
        where = f"step {live['global_step']} of {live['total_steps']}" if live.get("total_steps") else "no trainer_state.json says it finished"
        if live.get("training_complete"):
            where = "trainer_state.json says complete, but no *.safetensors final model is there"
        print(
            f"error: training in {output_dir} is not complete ({where}); cleaning now would delete the checkpoints it resumes "
            "from. Finish it (run the same training command), or pass --force to delete them anyway",
            file=sys.stderr,
        )
        return EXIT_USAGE

    doomed = checkpoints_to_delete(output_dir)
    leftovers = [path for path in output_dir.iterdir() if path.name.startswith((state.TEMPORARY_PREFIX, state.DELETING_PREFIX))]
    freed = size_of(doomed) + size_of(leftovers)
    names = [path.name for path in doomed]
    print(f"🧹 {output_dir}: " + (f"deleting {len(doomed)} checkpoint(s): {', '.join(names)}" if doomed else "no checkpoints to delete"))
    if backup_to and doomed:
        try:
            print(backup_line(backup_to, names, backup.committed_checkpoints(backup_to)))
        except backup.BackupUnavailable as away:
            print(f"⚠️  --backup_to {backup_to} could not be read ({away}): whether it holds the checkpoints deleted here is unknown")
    if not complete:
        print("⚠️  --force: training was not complete; without a checkpoint, the training command will start again from step 0")

    for path in doomed:  # oldest first: a kill part-way leaves the newest checkpoints
        state.delete_checkpoint(path)
    state.clean_leftovers(output_dir)  # what interrupted saves and deletions left (.tmp-*, .deleting-*)

    if doomed or leftovers:
        print(f"✅ Freed {state.human_bytes(freed)}")
    kept = state.final_model_paths(output_dir)
    if complete:
        print(f"📦 Kept the final model in {output_dir} ({state.human_bytes(size_of(kept))}): {', '.join(path.name for path in kept)}")
    aside = state.set_aside(output_dir)
    if aside:
        listing = ", ".join(f"{path.name} ({state.human_bytes(state.directory_size(path))})" for path in aside)
        print(f"ℹ️  Also kept, set aside by earlier runs (damaged or archived checkpoints): {listing}; delete them by hand if you do not need them")
    return EXIT_DONE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="./launch.sh clean", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="./results")
    parser.add_argument("--force", action="store_true", help="delete the checkpoints even though training is not complete")
    parser.add_argument("--backup_to", default=None, help="the run's backup destination: say whether it holds the checkpoints deleted here")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        print(f"error: --output_dir {output_dir} is not a directory; give the training's --output_dir", file=sys.stderr)
        return EXIT_USAGE
    if state.checkpoint_step(output_dir) is not None:
        print(f"error: {output_dir} is a checkpoint; give the training's --output_dir ({output_dir.parent})", file=sys.stderr)
        return EXIT_USAGE
    if not (output_dir / state.TRAINER_STATE_NAME).is_file() and not state.list_checkpoints(output_dir):
        print(f"error: {output_dir} holds no training run (no {state.TRAINER_STATE_NAME}, no checkpoint); give the training's --output_dir", file=sys.stderr)
        return EXIT_USAGE  # and no lock file is left in a directory that is not a run's

    lock = state.OutputDirLock(output_dir)
    try:
        lock.acquire()  # held while deleting: no run can start here meanwhile
    except state.OutputDirBusy as busy:
        print(f"error: {output_dir} is in use by a run ({busy}); clean it once that run has ended", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"error: --output_dir {output_dir}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return clean(output_dir, args.force, args.backup_to)
    except OSError as error:  # a checkpoint not ours to delete (permissions), a disk gone: the rest is intact
        print(f"error: cleaning {output_dir} stopped at {error.filename}: {error.strerror}; fix that and run clean again", file=sys.stderr)
        return EXIT_FAILED
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
