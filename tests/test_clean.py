"""`./launch.sh clean`: the final model stays byte for byte, the checkpoints go, on real runs."""

import shutil
import signal
import subprocess

import pytest

from resumable import state
from cleaning import backup_line
from conftest import PYTHON, REPO, Training, file_digest, tiny_flags, train

LAUNCH = str(REPO / "launch.sh")
FLAGS = dict(max_steps=30, save_steps=10, save_total_limit=3)


def clean(env, output_dir, *extra, launcher=(PYTHON, str(REPO / "cleaning.py"))):
    """The clean command; by default cleaning.py itself, so that stderr holds only its own lines (launch.sh may set up .venv/ first)."""
    return subprocess.run([*launcher, "--output_dir", str(output_dir), *extra], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def final_model(output_dir):
    """Every file of the final model at the top of OUTPUT_DIR, with its digest."""
    return {path.name: file_digest(path) for path in output_dir.iterdir() if path.is_file() and not path.name.startswith(".")}


@pytest.mark.quick
def test_clean_keeps_the_final_model_deletes_the_checkpoints_and_a_rerun_trains_nothing(tmp_path, session_env, corpus):
    output_dir = tmp_path / "run"
    flags = tiny_flags(corpus, **FLAGS)
    assert train(session_env, output_dir, flags).returncode == 0
    checkpoints = state.list_checkpoints(output_dir)
    assert [path.name for path in checkpoints] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    # What a deletion killed part-way leaves (cleaned and counted), and a damaged checkpoint moved aside (kept).
    shutil.copytree(checkpoints[0], output_dir / ".deleting-checkpoint-5")
    shutil.copytree(checkpoints[0], output_dir / "checkpoint-7.corrupt")
    to_free = sum(state.directory_size(path) for path in [*checkpoints, output_dir / ".deleting-checkpoint-5"])
    before = final_model(output_dir)
    assert {"model.safetensors", "config.json", "trainer_state.json"} <= set(before)

    result = clean(session_env, output_dir, launcher=(LAUNCH, "clean"))  # as users run it
    assert result.returncode == 0, result.stderr
    assert "deleting 3 checkpoint(s): checkpoint-10, checkpoint-20, checkpoint-30" in result.stdout
    assert f"✅ Freed {state.human_bytes(to_free)}" in result.stdout
    assert "checkpoint-7.corrupt" in result.stdout and "delete them by hand" in result.stdout
    assert state.list_checkpoints(output_dir) == [] and not list(output_dir.glob(".deleting-*"))
    assert (output_dir / "checkpoint-7.corrupt").is_dir()
    assert final_model(output_dir) == before

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output_dir)  # still loadable as the run left it
    assert model.config.n_layer >= 1

    # The training command again: it says the run is complete, trains nothing, rewrites nothing.
    mtimes = {path.name: path.stat().st_mtime_ns for path in output_dir.iterdir() if path.is_file() and not path.name.startswith(".")}
    rerun = train(session_env, output_dir, flags)
    assert rerun.returncode == 0, rerun.stderr
    assert "is already complete (30 steps) and its checkpoints are gone" in rerun.stdout
    assert "Starting new training" not in rerun.stdout and "step 5/30" not in rerun.stdout
    assert state.list_checkpoints(output_dir) == [] and final_model(output_dir) == before
    assert {path.name: path.stat().st_mtime_ns for path in output_dir.iterdir() if path.is_file() and not path.name.startswith(".")} == mtimes


def test_clean_refuses_during_a_run_and_before_completion_and_force_deletes_anyway(tmp_path, session_env, corpus):
    output_dir = tmp_path / "run"
    flags = tiny_flags(corpus, max_steps=20000, save_steps=10, save_total_limit=2)
    # Steps of 0.05 s (tests/harness.py): alive and holding its lock while clean starts, without taking a core.
    run = Training(session_env, output_dir, flags, harness_env={"HARNESS_STEP_SECONDS": "0.05"})
    run.wait_for(r"Saved checkpoint-20 ")
    try:
        during = clean(session_env, output_dir)
        assert run.process.poll() is None  # the run was alive all along: clean met its lock, not a finished directory
    finally:
        run.signal_group()
        run.finish()
    assert during.returncode == 2 and during.stdout == ""
    assert during.stderr.count("\n") == 1 and f"is in use by a run (pid {run.process.pid} on " in during.stderr
    checkpoints = state.list_checkpoints(output_dir)
    assert checkpoints and checkpoints[-1].name != "checkpoint-0"
    manifests = {path.name: file_digest(path / state.MANIFEST_NAME) for path in checkpoints}

    # Killed mid-run: not complete, so nothing is deleted without --force.
    early = clean(session_env, output_dir)
    assert early.returncode == 2 and early.stderr.count("\n") == 1
    assert "is not complete (step " in early.stderr and "--force" in early.stderr
    assert {path.name: file_digest(path / state.MANIFEST_NAME) for path in state.list_checkpoints(output_dir)} == manifests

    forced = clean(session_env, output_dir, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "start again from step 0" in forced.stdout and "✅ Freed " in forced.stdout
    assert state.list_checkpoints(output_dir) == [] and not list(output_dir.glob(".deleting-*"))


def test_a_clean_killed_mid_deletion_leaves_no_half_checkpoint_and_the_next_clean_finishes(tmp_path, session_env, corpus):
    output_dir = tmp_path / "run"
    assert train(session_env, output_dir, tiny_flags(corpus, **FLAGS)).returncode == 0
    before = final_model(output_dir)
    # Dies inside the deletion of checkpoint-20, after two of its files are gone.
    dying_clean = (
        "import os, shutil, signal, sys; from pathlib import Path\n"
        "import cleaning\n"
        "original = shutil.rmtree\n"
        "def rmtree_then_die(path, *args, **kwargs):\n"
        "    if Path(path).name == '.deleting-checkpoint-20':\n"
        "        (Path(path) / 'manifest.json').unlink(); (Path(path) / 'model.safetensors').unlink()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(path, *args, **kwargs)\n"
        "shutil.rmtree = rmtree_then_die\n"
        "sys.exit(cleaning.main(sys.argv[1:]))\n"
    )
    killed = subprocess.run([PYTHON, "-c", dying_clean, "--output_dir", str(output_dir)], env=session_env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    assert [path.name for path in state.list_checkpoints(output_dir)] == ["checkpoint-30"]  # no checkpoint-20 without its manifest
    state.verify_checkpoint(output_dir / "checkpoint-30")
    assert (output_dir / ".deleting-checkpoint-20").is_dir()

    again = clean(session_env, output_dir)
    assert again.returncode == 0, again.stderr
    assert state.list_checkpoints(output_dir) == [] and not list(output_dir.glob(".deleting-*"))
    assert final_model(output_dir) == before


def test_backup_line_names_the_checkpoints_only_here():
    deleting = ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert backup_line("s3://b/run", deleting, set(deleting)).startswith("☁️  s3://b/run holds every checkpoint deleted here")
    partly = backup_line("s3://b/run", deleting, {"checkpoint-30", "checkpoint-40"})
    assert "holds checkpoint-30, not checkpoint-10, checkpoint-20" in partly and partly.startswith("⚠️")
    assert "holds none of the checkpoints" in backup_line("/mnt/backup", deleting, set())


def test_clean_refuses_a_directory_that_is_not_a_run_and_a_checkpoint_given_as_the_output_dir(tmp_path, session_env, corpus):
    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    result = clean(session_env, stranger, "--force")
    assert result.returncode == 2 and "holds no training run" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(path.name for path in stranger.iterdir()) == ["notes.txt"]  # not even a lock file

    output_dir = tmp_path / "run"
    assert train(session_env, output_dir, tiny_flags(corpus, max_steps=10, save_steps=10)).returncode == 0
    inside = clean(session_env, output_dir / "checkpoint-10", "--force")
    assert inside.returncode == 2 and f"is a checkpoint; give the training's --output_dir ({output_dir})" in inside.stderr
    state.verify_checkpoint(output_dir / "checkpoint-10")
