"""python -m resumable.launch: a user's own script on several processes keeps its exit codes (75 stopped, 2 refused, 1 crashed).

`accelerate launch` alone turns every code of several processes into 1 and prints a ChildFailedError
traceback for a normal stop, so a SLURM job could not tell a stop from a crash (the multi-process gap
of the Trainer integration). The SLURM job itself: tests/test_slurm.py (hf_trainer on 2 processes)."""

from __future__ import annotations

import signal
import subprocess

from conftest import PYTHON, REPO, Training, file_digest, train
from test_library import EXAMPLE_HARNESS
from test_trainer import FLAGS, HF_TRAINER, launcher

# As a user runs it: NUM_PROCESSES=2 python -m resumable.launch train.py [flags] (here through the test switches' harness)
LAUNCH = [PYTHON, "-m", "resumable.launch", EXAMPLE_HARNESS, HF_TRAINER]
TWO = {"NUM_PROCESSES": "2"}


def test_trainer_script_on_two_processes_stops_with_75_and_resumes_byte_identical(tmp_path, session_env, reference_runs):
    env = {**session_env, **TWO}
    reference = reference_runs(FLAGS, launcher=launcher(2))  # the same two processes through plain accelerate launch (test_trainer's)
    output_dir = tmp_path / "run"

    # SIGUSR1 to the supervisor only, as SLURM's --signal=B: gives it to the batch script, which passes it on
    run = Training(env, output_dir, FLAGS, launcher=LAUNCH)
    run.wait_for(r"💾 Saved checkpoint-40 ")
    run.process.send_signal(signal.SIGUSR1)
    assert run.finish() == 75, run.text
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert (output_dir / f"checkpoint-{stopped_at}" / "manifest.json").is_file()
    assert "resumable.launch: stopped by SIGUSR1 (exit 75); run the same command again to continue." in run.text
    assert "Traceback" not in run.text and "ChildFailedError" not in run.text, run.text  # a stop is not reported as a failure

    final = train(env, output_dir, FLAGS, launcher=LAUNCH)
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"✅ Resumed from checkpoint (step {stopped_at})" in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_a_script_that_crashes_gives_1_and_its_traceback_and_one_that_exits_gives_its_code(tmp_path, session_env):
    script = tmp_path / "own.py"
    script.write_text("import sys\nif sys.argv[1:] == ['crash']:\n    raise ValueError('broken on purpose')\nsys.exit(int(sys.argv[1]))\n")
    crashed = subprocess.run([PYTHON, "-m", "resumable.launch", str(script), "crash"], env=session_env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert crashed.returncode == 1 and "ValueError: broken on purpose" in crashed.stderr, crashed.stderr
    # 2, as a refusal ends: the rank leaves with 0 (a planned end, no launcher failure) and the supervisor returns the recorded 2
    exited = subprocess.run([PYTHON, "-m", "resumable.launch", str(script), "2"], env=session_env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert exited.returncode == 2, exited.stderr
    missing = subprocess.run([PYTHON, "-m", "resumable.launch", str(tmp_path / "nowhere.py")], env=session_env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1, missing.stderr
