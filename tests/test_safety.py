"""Bad checkpoints, bad input, a full disk, two runs at once, a malicious pickle: each on the real program."""

import os
import pickle
import resource
import shutil
import subprocess

import pytest

from resumable import state
from conftest import HARNESS, PYTHON, SAVE_MODES, Training, file_digest, tiny_flags, train

FLAGS = dict(max_train_samples=200, max_steps=40, save_steps=10)


def corrupt_truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def corrupt_flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, damage, reason, save_mode",
    [
        ("model.safetensors", corrupt_flip_byte, "model.safetensors: checksum mismatch", ["--async_save", "true"]),
        ("model.safetensors", corrupt_flip_byte, "model.safetensors: checksum mismatch", ["--async_save", "false"]),
        ("optimizer.bin", corrupt_truncate, "optimizer.bin: ", ["--async_save", "false"]),
        ("scheduler.bin", lambda p: p.write_bytes(b""), "scheduler.bin: 0 bytes", ["--async_save", "false"]),
        ("random_states_0.pkl", os.remove, "random_states_0.pkl: missing", ["--async_save", "false"]),
        ("trainer_state.json", lambda p: p.write_text("{"), "trainer_state.json: ", ["--async_save", "false"]),
        ("manifest.json", os.remove, "manifest.json is missing", ["--async_save", "false"]),
    ],
)
def test_damaged_newest_checkpoint_falls_back_and_ends_byte_identical(tmp_path, session_env, corpus, interrupted_runs, reference_runs, name, damage, reason, save_mode):
    flags = tiny_flags(corpus, **FLAGS)
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    interrupted_runs(flags + save_mode, "Saved checkpoint-30", output_dir)
    newest = max(state.list_checkpoints(output_dir), key=state.checkpoint_step)
    damage(newest / name)

    result = train(session_env, output_dir, flags + save_mode)
    assert result.returncode == 0, result.stderr[-2000:]
    warning = next(line for line in result.stdout.splitlines() if "is damaged" in line)
    assert warning.startswith(f"⚠️  {newest.name} is damaged ({reason}") and "resuming from checkpoint-" in warning
    assert (output_dir / f"{newest.name}.corrupt" / "manifest.json").exists() or name == "manifest.json"
    assert (output_dir / f"{newest.name}.corrupt").is_dir()  # moved aside, never deleted
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_no_valid_checkpoint_exits_2_and_lists_them(tmp_path, session_env, corpus, interrupted_runs):
    flags = tiny_flags(corpus, **FLAGS)
    output_dir = tmp_path / "run"
    interrupted_runs(flags, "Saved checkpoint-20", output_dir)
    for checkpoint in state.list_checkpoints(output_dir):
        corrupt_flip_byte(checkpoint / "optimizer.bin")
    result = train(session_env, output_dir, flags)
    assert result.returncode == 2
    assert "checkpoint-20: optimizer.bin: checksum mismatch; checkpoint-10: optimizer.bin: checksum mismatch" in result.stderr
    assert "--resume_from_checkpoint none to start fresh" in result.stderr
    assert [p.name for p in state.list_checkpoints(output_dir)] == ["checkpoint-10", "checkpoint-20"]  # untouched

    fresh = train(session_env, output_dir, flags + ["--resume_from_checkpoint", "none"])
    assert fresh.returncode == 0 and "moved 2 earlier checkpoint(s) to previous-run-" in fresh.stdout
    assert len(list(output_dir.glob("previous-run-*/checkpoint-*"))) == 2


def test_resume_from_a_named_checkpoint_that_is_damaged_or_missing_exits_2(tmp_path, session_env, corpus, interrupted_runs):
    flags = tiny_flags(corpus, **FLAGS)
    output_dir = tmp_path / "run"
    interrupted_runs(flags, "Saved checkpoint-20", output_dir)
    corrupt_truncate(output_dir / "checkpoint-20" / "model.safetensors")
    damaged = train(session_env, output_dir, flags + ["--resume_from_checkpoint", str(output_dir / "checkpoint-20")])
    assert damaged.returncode == 2 and "checkpoint-20: model.safetensors:" in damaged.stderr
    missing = train(session_env, output_dir, flags + ["--resume_from_checkpoint", str(output_dir / "checkpoint-99")])
    assert missing.returncode == 2 and "checkpoint-99: no such checkpoint directory" in missing.stderr
    named = train(session_env, output_dir, flags + ["--resume_from_checkpoint", str(output_dir / "checkpoint-10")])
    assert named.returncode == 0 and "Resumed from checkpoint (step 10," in named.stdout


class Exploit:
    """Unpickling this runs a shell command: what a poisoned checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_a_checkpoint_is_refused_not_executed(tmp_path, session_env, corpus, interrupted_runs):
    flags = tiny_flags(corpus, **FLAGS)
    output_dir = tmp_path / "run"
    interrupted_runs(flags, "Saved checkpoint-20", output_dir)
    marker = tmp_path / "pwned"
    checkpoint = output_dir / "checkpoint-20"
    with open(checkpoint / "random_states_0.pkl", "wb") as handle:
        pickle.dump({"random_state": Exploit(marker)}, handle)
    state.write_manifest(checkpoint, 20)  # the attacker rewrote the manifest too: checksums pass
    result = train(session_env, output_dir, flags)
    assert result.returncode == 2
    assert "random_states_0.pkl: refused to load" in result.stderr
    assert not marker.exists()


@SAVE_MODES
def test_a_save_that_hits_a_full_disk_keeps_every_earlier_checkpoint(tmp_path, session_env, corpus, interrupted_runs, save_mode):
    flags = tiny_flags(corpus, **FLAGS) + save_mode
    output_dir = tmp_path / "run"
    interrupted_runs(flags, "Saved checkpoint-20", output_dir)
    before = {p.name: file_digest(p / "model.safetensors") for p in state.list_checkpoints(output_dir)}
    largest = max(f.stat().st_size for f in (output_dir / "checkpoint-20").iterdir())

    def small_file_limit():  # any file larger than this fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, largest // 2))

    command = [PYTHON, str(HARNESS), "--output_dir", str(output_dir), *flags]
    result = subprocess.run(command, env=session_env, capture_output=True, text=True, preexec_fn=small_file_limit, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: saving checkpoint-30 failed (" in result.stderr and "earlier checkpoints are untouched" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(output_dir.glob(".tmp-checkpoint-*"))  # it cleaned up after itself
    assert {p.name: file_digest(p / "model.safetensors") for p in state.list_checkpoints(output_dir)} == before
    for checkpoint in state.list_checkpoints(output_dir):
        state.verify_checkpoint(checkpoint)


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    class Model:
        def parameters(self):
            import torch

            return [torch.nn.Parameter(torch.zeros(1000))]  # trained weights: a frozen base (LoRA) is not saved

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(state.NotEnoughDiskSpace, match=r"needs ~13.2 KB, 1.0 KB free in "):
        state.check_free_space(tmp_path, Model())


def test_a_checkpoint_that_will_not_fit_is_not_started_and_the_run_ends_with_the_numbers(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **FLAGS)
    checkpoint_bytes = sum(f.stat().st_size for f in (reference_runs(flags) / "checkpoint-40").iterdir())
    small_disk = tmp_path / "small_disk"
    small_disk.mkdir()
    size = (int(2.6 * checkpoint_bytes) // 4096 + 1) * 4096  # room for two checkpoints and the small files
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small_disk)]).returncode:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        result = train(session_env, small_disk / "run", flags)
        assert result.returncode == 1, result.stderr[-2000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: the next checkpoint needs ~") and f"free in {small_disk / 'run'}" in line
        assert [p.name for p in state.list_checkpoints(small_disk / "run")] == ["checkpoint-10", "checkpoint-20"]
        for checkpoint in state.list_checkpoints(small_disk / "run"):
            state.verify_checkpoint(checkpoint)
    finally:
        subprocess.run(["umount", str(small_disk)])


def test_a_second_run_on_the_same_directory_exits_2_at_once(tmp_path, session_env, corpus):
    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": 100000})
    output_dir = tmp_path / "run"
    # Steps of 0.05 s (tests/harness.py): alive and holding its lock while the second run starts, without taking a core.
    first = Training(session_env, output_dir, flags, harness_env={"HARNESS_STEP_SECONDS": "0.05"})
    first.wait_for(r"step 10/100000")
    second = train(session_env, output_dir, flags, timeout=120)
    assert second.returncode == 2
    assert f"is in use by another run (pid {first.process.pid} on " in second.stderr
    first.signal_group()
    first.finish()
    # The lock of a process killed with SIGKILL does not block a restart.
    third = Training(session_env, output_dir, flags)
    third.wait_for(r"Resumed from checkpoint")
    third.signal_group()
    third.finish()


def test_changed_flags_that_change_the_result_are_refused_with_a_table(tmp_path, session_env, corpus, interrupted_runs):
    flags = tiny_flags(corpus, **FLAGS)
    output_dir = tmp_path / "run"
    interrupted_runs(flags, "Saved checkpoint-20", output_dir)
    changed = train(session_env, output_dir, tiny_flags(corpus, **{**FLAGS, "seed": 7, "learning_rate": 0.01}))
    assert changed.returncode == 2
    assert "| in checkpoint" in changed.stderr and "--seed" in changed.stderr and "| 42" in changed.stderr and "| 7" in changed.stderr
    assert "--allow_config_change" in changed.stderr
    harmless = train(session_env, output_dir, tiny_flags(corpus, **{**FLAGS, "logging_steps": 2, "max_steps": 50}))
    assert harmless.returncode == 0, harmless.stderr[-2000:]
    assert "--logging_steps 5 → 2" in harmless.stdout and "--max_steps 40 → 50" in harmless.stdout
    allowed = train(session_env, output_dir, tiny_flags(corpus, **{**FLAGS, "seed": 7, "max_steps": 60}) + ["--allow_config_change"])
    assert allowed.returncode == 0 and "seed" in allowed.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"train_file": "/nonexistent/data.txt"}, "--train_file /nonexistent/data.txt: no such file"),
        ({"config_name": "/nonexistent/config.json"}, "--config_name /nonexistent/config.json: no such file or directory"),
        ({"model_name_or_path": "/nonexistent/model", "config_name": None}, "--model_name_or_path /nonexistent/model: no such directory"),
        ({"text_column": "body"}, "--text_column 'body' is not in the training data (columns: text)"),
        ({"task": "sequence-classification"}, "--label_column 'label' is not in the training data (columns: text)"),
        ({"metric_for_best_model": "eval_accuracy"}, "--metric_for_best_model 'eval_accuracy': --task causal-lm reports eval_loss, eval_perplexity"),
        ({"save_steps": 0}, "--save_steps must be a positive integer (got 0)"),
        ({"learning_rate": -1}, "--learning_rate must not be negative (got -1.0)"),
        ({"max_time": "ten minutes"}, "--max_time 'ten minutes': use seconds (5400), 90m, 1h30m or 01:30:00"),
        ({"max_steps": "many"}, "argument --max_steps: invalid int value: 'many'"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2_with_nothing_written(tmp_path, session_env, corpus, flags, message):
    output_dir = tmp_path / "out"
    result = train(session_env, output_dir, tiny_flags(corpus, **flags))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in result.stderr
    assert not output_dir.exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path, session_env, corpus):
    output_file = tmp_path / "results"
    output_file.write_text("not a directory")
    result = train(session_env, output_file, tiny_flags(corpus))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --output_dir {output_file} is a file; give a directory"
    assert output_file.read_text() == "not a directory"
