"""A transformers.Trainer script with the two lines of resumable.trainer (examples/hf_trainer.py), and the same script without them."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import textwrap
import time

import pytest
from conftest import PYTHON, REPO, Training, descendants, file_digest, kill_a_moment_after, signal_all_at_once, train
from test_library import EXAMPLE_HARNESS, example_launcher

HF_TRAINER = str(REPO / "examples" / "hf_trainer.py")
ONE_PROCESS = [PYTHON, EXAMPLE_HARNESS, HF_TRAINER]
# os.py in blocks of 32 bytes, 90 % for training, 8 a batch, 2 micro-batches a step: ~70 steps an epoch on 1 process, ~35 on 2
# (140 steps: two epoch boundaries on 1 process, three on 2; the kill sequence below crosses one after a resume either way).
# save_total_limit 1: the Trainer's own rotation would delete the only verified checkpoint before the next one is committed.
FLAGS = ["--max_steps", "140", "--save_steps", "10", "--save_total_limit", "1"]
PLAIN = ["--plain"]


def launcher(processes: int) -> list[str]:
    return ONE_PROCESS if processes == 1 else example_launcher("hf_trainer", processes)


def verified(output_dir, step: int) -> bool:
    return (output_dir / f"checkpoint-{step}" / "manifest.json").is_file()


@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
def test_trainer_killed_inside_and_between_saves_and_stopped_ends_byte_identical(tmp_path, session_env, reference_runs, processes):
    runner = launcher(processes)
    reference = reference_runs(FLAGS, launcher=runner)
    output_dir = tmp_path / "run"

    # kill -9 a moment after a save, wherever the Trainer then is (40 steps before the next stage's kill, as many as ever)
    assert kill_a_moment_after(Training(session_env, output_dir, FLAGS, launcher=runner), r"💾 Saved checkpoint-10 ") == -9

    # kill -9 inside the Trainer's own save (weights and optimizer written, its RNG state and trainer_state.json not)
    killed = train(session_env, output_dir, FLAGS, launcher=runner, harness_env={"EXAMPLE_KILL_IN_TRAINER_SAVE": "50"})
    assert killed.returncode != 0 and (output_dir / "checkpoint-50").is_dir() and not verified(output_dir, 50), killed.stdout + killed.stderr
    assert verified(output_dir, 40)

    # kill -9 after every file of checkpoint-70 is written, before its manifest: the Trainer alone would have
    # rotated checkpoint-60 away by then (save_total_limit 1), leaving no verified checkpoint at all
    killed = train(session_env, output_dir, FLAGS, launcher=runner, harness_env={"EXAMPLE_KILL_IN_SAVE": "70"})
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert "⚠️  checkpoint-50 is damaged (manifest.json is missing (the save never completed)); moved aside to checkpoint-50.corrupt; resuming from checkpoint-40" in killed.stdout
    assert (output_dir / "checkpoint-70" / "trainer_state.json").is_file() and not verified(output_dir, 70)
    assert verified(output_dir, 60)

    # a stop signal: SIGTERM to the process we started (one process); SIGUSR1 to both ranks at once (two), as SLURM's
    # --signal=USR1 does (accelerate launch's agent itself does not handle USR1: signalled too, it dies of it)
    run = Training(session_env, output_dir, FLAGS, launcher=runner)
    run.wait_for(r"🔄 Found checkpoint: checkpoint-60")
    run.wait_for(r"💾 Saved checkpoint-80 ")  # 60 steps before the end, as many as ever: room for a late reader
    if processes == 1:
        run.process.send_signal(signal.SIGTERM)
    else:
        signal_all_at_once(descendants(run.process.pid), signal.SIGUSR1)
    code = run.finish()
    assert code == 75 if processes == 1 else code in (75, 1), f"exit {code}\n" + run.text  # accelerate launch's agent exits 1 (see test_library)
    assert "checkpoint-70 is damaged (manifest.json is missing (the save never completed))" in run.text
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert f"🛑 Stopping at step {stopped_at}: {'SIGTERM' if processes == 1 else 'SIGUSR1'}" in run.text
    assert verified(output_dir, stopped_at) and "▶️  To continue, run the same command again." in run.text

    final = train(session_env, output_dir, FLAGS, launcher=runner)
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"✅ Resumed from checkpoint (step {stopped_at})" in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    kept = sorted(path.name for path in output_dir.glob("checkpoint-*") if (path / "manifest.json").is_file())
    assert kept == ["checkpoint-140"], kept  # save_total_limit 1, applied after each commit


SHORT = ["--max_steps", "100", "--save_steps", "20"]


def test_kill_inside_a_trainer_save_crashes_every_rerun_of_the_plain_script_and_the_two_lines_pass_over_it(tmp_path, session_env, reference_runs):
    kill_inside = {"EXAMPLE_KILL_IN_TRAINER_SAVE": "40"}
    plain_dir, resumable_dir = tmp_path / "plain", tmp_path / "resumable"

    # the guide's script: trainer.train(resume_from_checkpoint=get_last_checkpoint(output_dir))
    assert train(session_env, plain_dir, SHORT + PLAIN, launcher=ONE_PROCESS, harness_env=kill_inside).returncode == -9
    for _ in range(2):  # picked by its name every time: the run cannot continue until someone deletes it
        rerun = train(session_env, plain_dir, SHORT + PLAIN, launcher=ONE_PROCESS)
        assert rerun.returncode == 1 and "checkpoint-40/trainer_state.json" in rerun.stderr, rerun.stdout + rerun.stderr

    # the same script with the two lines
    assert train(session_env, resumable_dir, SHORT, launcher=ONE_PROCESS, harness_env=kill_inside).returncode == -9
    rerun = train(session_env, resumable_dir, SHORT, launcher=ONE_PROCESS)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    warnings = [line for line in rerun.stdout.splitlines() if "damaged" in line]
    assert warnings == ["⚠️  checkpoint-40 is damaged (manifest.json is missing (the save never completed)); moved aside to checkpoint-40.corrupt; resuming from checkpoint-20"]
    assert file_digest(resumable_dir / "model.safetensors") == file_digest(reference_runs(SHORT, launcher=ONE_PROCESS) / "model.safetensors")


def test_the_trainers_own_resume_is_byte_identical_and_the_two_lines_change_no_weight(tmp_path, session_env, reference_runs):
    """Measured, not assumed: the plain Trainer killed between saves and resumed, against its uninterrupted run,
    and the run with the two lines against the run without them. On 2 processes, the harder case (one process
    was measured too, by hand and in an earlier version of this test: byte-identical)."""
    runner = launcher(2)
    plain_reference = reference_runs(FLAGS + PLAIN, launcher=runner)
    with_the_lines = reference_runs(FLAGS, launcher=runner)
    assert file_digest(with_the_lines / "model.safetensors") == file_digest(plain_reference / "model.safetensors")

    output_dir = tmp_path / "plain"
    run = Training(session_env, output_dir, FLAGS + PLAIN, launcher=runner)
    while not (output_dir / "checkpoint-60" / "trainer_state.json").is_file():  # the plain script prints no save line
        time.sleep(0.05)
    time.sleep(random.uniform(0.1, 0.4))
    run.signal_group()
    run.finish()
    assert not (output_dir / "model.safetensors").exists(), "the kill came after the end: nothing was resumed"
    resumed = train(session_env, output_dir, FLAGS + PLAIN, launcher=runner)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert file_digest(output_dir / "model.safetensors") == file_digest(plain_reference / "model.safetensors")


def test_backup_to_restores_an_empty_output_dir_and_the_run_ends_byte_identical(tmp_path, session_env, reference_runs):
    reference = reference_runs(FLAGS, launcher=ONE_PROCESS)
    output_dir, destination = tmp_path / "run", tmp_path / "backup"
    with_backup = FLAGS + ["--backup_to", str(destination)]
    run = Training(session_env, output_dir, with_backup, launcher=ONE_PROCESS)
    run.wait_for(r"💾 Saved checkpoint-50 ")
    run.process.send_signal(signal.SIGTERM)  # a stop waits for the newest checkpoint to reach the backup
    assert run.finish() == 75, run.text
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert f"☁️  checkpoint-{stopped_at} is in {destination}" in run.text
    shutil.rmtree(output_dir)  # a lost machine: only the backup is left
    final = train(session_env, output_dir, with_backup, launcher=ONE_PROCESS)
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"✅ Resumed from checkpoint (step {stopped_at})" in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


MISUSED = """
import sys
sys.path.insert(0, {repo!r})
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from resumable.trainer import ResumableCallback, checkpoint_to_resume

class Tokens(torch.utils.data.Dataset):
    def __len__(self): return 64
    def __getitem__(self, i): return {{"input_ids": torch.arange(8) + i % 8, "labels": torch.arange(8) + i % 8}}

args = TrainingArguments(output_dir={output_dir!r}, max_steps=4, save_steps=2, use_cpu=True, report_to="none", disable_tqdm=True, {arguments})
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
{calls}
"""
MISUSES = {
    "callback without checkpoint_to_resume": ("", "trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[ResumableCallback()])\ntrainer.train()",
                                               "error: ResumableCallback: pass resume_from_checkpoint=checkpoint_to_resume(trainer) to trainer.train(...)"),
    "checkpoint_to_resume without the callback": ("", "trainer = Trainer(model=model, args=args, train_dataset=Tokens())\ntrainer.train(resume_from_checkpoint=checkpoint_to_resume(trainer))",
                                                  "error: checkpoint_to_resume(trainer): give the Trainer one ResumableCallback"),
    "save_only_model": ("save_only_model=True", "trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[ResumableCallback()])\ntrainer.train(resume_from_checkpoint=checkpoint_to_resume(trainer))",
                        "error: TrainingArguments(save_only_model=True) checkpoints hold no optimizer"),
    "bad max_time": ("", "ResumableCallback(max_time='soon')", "error: ResumableCallback(max_time=...) 'soon': use seconds"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MISUSES))
def test_misuse_gets_one_line_and_exit_2(tmp_path, session_env, case):
    arguments, calls, line = MISUSES[case]
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(MISUSED.format(repo=str(REPO), output_dir=str(tmp_path / "out"), arguments=arguments, calls=calls)))
    result = subprocess.run([PYTHON, str(script)], env=session_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert line in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_a_run_killed_after_its_last_step_before_the_final_save_trains_nothing_more_and_writes_the_same_model(tmp_path, session_env, reference_runs):
    """The Trainer alone, resumed at max_steps in the middle of an epoch, trains a step more (and saves checkpoint-<max_steps + 1>)."""
    reference = reference_runs(SHORT, launcher=ONE_PROCESS)
    output_dir = tmp_path / "run"
    shutil.copytree(reference, output_dir)
    (output_dir / "model.safetensors").unlink()  # killed after train() returned, before trainer.save_model()
    rerun = train(session_env, output_dir, SHORT, launcher=ONE_PROCESS)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "✅ Training is already complete (100 of 100 steps): checkpoint-100's weights are loaded, nothing is trained" in rerun.stdout
    assert not (output_dir / "checkpoint-101").exists() and "Held-out loss" in rerun.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_a_checkpoint_that_will_not_fit_ends_the_trainer_script_in_one_line_and_keeps_every_checkpoint(tmp_path, session_env):
    """Without the check the Trainer's own save fails half-way with a traceback from deep inside torch.save."""
    small_disk = tmp_path / "small_disk"
    small_disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(small_disk)]).returncode:  # two checkpoints of ~1.7 MB
        pytest.skip("needs permission to mount a tmpfs")
    try:
        result = train(session_env, small_disk / "run", SHORT + ["--save_total_limit", "5"], launcher=ONE_PROCESS)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout[-2000:] + result.stderr[-2000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: the next checkpoint needs ~") and line.endswith("the previous checkpoint stands: free some space, then run the same command again")
        assert [path.name for path in sorted(small_disk.glob("run/checkpoint-*"))] == ["checkpoint-20", "checkpoint-40"]
        assert verified(small_disk / "run", 20) and verified(small_disk / "run", 40)
    finally:
        subprocess.run(["umount", str(small_disk)])
