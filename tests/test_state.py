"""state.py on directories built by hand: discovery, validation, rotation, crash leftovers."""

import json
import os

import pytest

from resumable import state


def make_checkpoint(output_dir, step, complete=True, payload=b"weights"):
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(payload * 100)
    (path / "optimizer.bin").write_bytes(b"optimizer" * 50)
    progress = state.TrainingState(global_step=step, total_steps=100000, steps_per_epoch=1000, global_batch_size=8)
    (path / "trainer_state.json").write_text(json.dumps({**progress.to_json(), "log_history": []}))
    if complete:
        state.write_manifest(path, step)
    return path


def test_newest_is_chosen_by_step_number_not_name_or_time(tmp_path):
    make_checkpoint(tmp_path, 10000)
    older = make_checkpoint(tmp_path, 9000)
    os.utime(older, (2e9, 2e9))  # the older step has the newer time stamp
    assert [state.checkpoint_step(p) for p in state.list_checkpoints(tmp_path)] == [9000, 10000]
    assert state.newest_valid_checkpoint(tmp_path).name == "checkpoint-10000"


def test_temporary_and_unrelated_directories_are_never_resumed_from(tmp_path):
    make_checkpoint(tmp_path, 100)
    temporary = tmp_path / ".tmp-checkpoint-200"
    temporary.mkdir()
    (temporary / "model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoint-300.corrupt").mkdir()
    (tmp_path / "checkpoint-final").mkdir()
    assert state.newest_valid_checkpoint(tmp_path).name == "checkpoint-100"
    assert state.clean_leftovers(tmp_path) == [temporary]
    assert not temporary.exists() and (tmp_path / "checkpoint-100").exists()


def test_incomplete_newest_checkpoint_is_moved_aside_and_previous_one_used(tmp_path):
    make_checkpoint(tmp_path, 100)
    make_checkpoint(tmp_path, 200, complete=False)
    warnings = []
    assert state.newest_valid_checkpoint(tmp_path, warn=warnings.append).name == "checkpoint-100"
    assert (tmp_path / "checkpoint-200.corrupt" / "model.safetensors").exists()  # moved, never deleted
    assert "checkpoint-200 is damaged (manifest.json is missing" in warnings[0]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "optimizer.bin").unlink(), "optimizer.bin: missing"),
        (lambda p: (p / "optimizer.bin").write_bytes(b""), "optimizer.bin: 0 bytes"),
        (lambda p: os.truncate(p / "model.safetensors", 10), "model.safetensors: 10 bytes"),
        (lambda p: (p / "model.safetensors").write_bytes(b"X" * 700), "model.safetensors: checksum mismatch"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is unreadable"),
    ],
)
def test_each_kind_of_damage_is_named(tmp_path, damage, reason):
    path = make_checkpoint(tmp_path, 100)
    damage(path)
    with pytest.raises(state.CheckpointError, match=reason.replace("(", r"\(")):
        state.verify_checkpoint(path)


def test_manifest_checksums_are_xxh3_of_the_bytes_and_sha256_manifests_still_verify(tmp_path):
    import hashlib

    import xxhash

    path = make_checkpoint(tmp_path, 100)
    entry = json.loads((path / "manifest.json").read_text())["files"]["optimizer.bin"]
    assert entry == {"size": 450, "xxh3_128": xxhash.xxh3_128(b"optimizer" * 50).hexdigest()}

    # A checkpoint saved before the switch (its manifest lists SHA-256) is verified with SHA-256.
    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        manifest["files"][name] = {"size": entry["size"], "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    state.verify_checkpoint(path)
    (path / "optimizer.bin").write_bytes(b"Optimizer" * 50)  # same size, other bytes
    with pytest.raises(state.CheckpointError, match="optimizer.bin: checksum mismatch"):
        state.verify_checkpoint(path)


def test_no_valid_checkpoint_is_an_error_and_nothing_is_moved(tmp_path):
    make_checkpoint(tmp_path, 100, complete=False)
    make_checkpoint(tmp_path, 200, complete=False)
    with pytest.raises(state.NoValidCheckpoint, match="checkpoint-200.*checkpoint-100"):
        state.newest_valid_checkpoint(tmp_path)
    assert (tmp_path / "checkpoint-100").exists() and (tmp_path / "checkpoint-200").exists()


def test_rotation_keeps_the_newest_k_and_protected_ones(tmp_path):
    for step in (1000, 2000, 3000, 10000, 20000):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 30000, complete=False)  # incomplete: neither counted nor deleted
    deleted = state.rotate_checkpoints(tmp_path, keep=2, protect=(tmp_path / "checkpoint-2000",))
    assert sorted(p.name for p in deleted) == ["checkpoint-1000", "checkpoint-3000"]
    left = sorted(state.checkpoint_step(p) for p in state.list_checkpoints(tmp_path))
    assert left == [2000, 10000, 20000, 30000]


def test_rotation_removes_old_incomplete_checkpoints_but_not_newer_or_corrupt_ones(tmp_path):
    half_deleted = make_checkpoint(tmp_path, 1000, complete=False)  # a deletion interrupted in place
    for step in (2000, 3000, 4000):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 5000, complete=False)  # newer than the kept ones: damage, left for discovery
    (tmp_path / "checkpoint-500.corrupt").mkdir()
    deleted = state.rotate_checkpoints(tmp_path, keep=2)
    assert deleted == [half_deleted, tmp_path / "checkpoint-2000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3000", "checkpoint-4000", "checkpoint-500.corrupt", "checkpoint-5000"]
    # Fewer complete checkpoints than `keep`: nothing counts as old, nothing goes.
    assert state.rotate_checkpoints(tmp_path, keep=3) == []


def test_deletion_moves_the_checkpoint_out_of_discovery_first_and_leftovers_are_cleaned(tmp_path, monkeypatch):
    make_checkpoint(tmp_path, 100)
    path = make_checkpoint(tmp_path, 200)
    seen = []

    def interrupted_rmtree(doomed, *args, **kwargs):  # what a kill during the deletion leaves
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        (doomed / "manifest.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(state.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        state.delete_checkpoint(path)
    monkeypatch.undo()
    assert seen == [[".deleting-checkpoint-200", "checkpoint-100"]]  # renamed before any file went
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["checkpoint-100"]
    assert state.clean_leftovers(tmp_path) == [tmp_path / ".deleting-checkpoint-200"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100"]


def test_rotation_in_the_background_hides_at_once_and_deletes_before_the_next_save(tmp_path):
    for step in (100, 200, 300):
        make_checkpoint(tmp_path, step)
    deleted = state.rotate_checkpoints(tmp_path, keep=2, in_background=True)
    assert [p.name for p in deleted] == ["checkpoint-100"]
    # Gone for every reader the moment rotation returns, whether or not the thread has run yet.
    assert [state.checkpoint_step(p) for p in state.list_checkpoints(tmp_path)] == [200, 300]
    assert state.newest_valid_checkpoint(tmp_path).name == "checkpoint-300"
    state.check_free_space(tmp_path, model=None)  # what every save does first: waits for the deletion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-200", "checkpoint-300"]


def test_rotation_never_deletes_the_newest(tmp_path):
    make_checkpoint(tmp_path, 5)
    assert state.rotate_checkpoints(tmp_path, keep=1) == []
    assert (tmp_path / "checkpoint-5").exists()


def test_crash_between_write_and_rename_leaves_previous_checkpoint_loadable(tmp_path):
    make_checkpoint(tmp_path, 100)
    # Everything of checkpoint-200 was written, manifest included, but the rename never happened.
    written = make_checkpoint(tmp_path, 200)
    os.rename(written, tmp_path / ".tmp-checkpoint-200")
    chosen = state.newest_valid_checkpoint(tmp_path)
    assert chosen.name == "checkpoint-100"
    state.verify_checkpoint(chosen)


def test_lock_is_exclusive_and_released_with_its_holder(tmp_path):
    first = state.OutputDirLock(tmp_path)
    first.acquire()
    with pytest.raises(state.OutputDirBusy, match=f"pid {os.getpid()}"):
        state.OutputDirLock(tmp_path).acquire()
    assert state.OutputDirLock.holder(tmp_path).startswith(f"pid {os.getpid()}")
    first.release()
    assert state.OutputDirLock.holder(tmp_path) is None
    state.OutputDirLock(tmp_path).acquire()


def test_routine_live_state_rewrites_are_skipped_until_200_times_their_duration_has_passed(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(state.time, "monotonic", lambda: clock[0])
    written = []

    def slow_write(output_dir, progress, log_history, run_history, **extra):
        written.append(progress.global_step)
        clock[0] += 0.010  # each rewrite takes 10 ms

    monkeypatch.setattr(state, "write_live_state", slow_write)
    live = state.LiveState(tmp_path)
    progress = state.TrainingState(global_step=0, total_steps=100, steps_per_epoch=10, global_batch_size=8)
    for step in range(1, 41):  # a logging step every 100 ms: a routine rewrite is due every 2 s (0.5 % of the time)
        progress.global_step = step
        clock[0] += 0.100
        live.write_if_due(progress, [], [])
    assert written == [1, 21]
    live.write(progress, [], [])  # a save, a stop or the end: at once
    assert written == [1, 21, 40]
