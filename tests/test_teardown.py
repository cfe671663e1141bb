"""launch.sh's backstop: a training stuck in its teardown after recording its exit code is ended.

A multi-node job whose rank never exits after its checkpoint runs to its time limit and is not
requeued (issue 26). Whatever the cause below us, launch.sh exits with the training's code
TEARDOWN_GRACE_SECONDS after the code was recorded, and ends only processes of its own run."""

import shutil
import subprocess
import sys
import time

from conftest import REPO
from resumable.launch import TEARDOWN_GRACE_SECONDS

STUCK_TRAINING = r'''
import os, signal, subprocess, sys, time
from pathlib import Path
exit_code_file = Path(os.environ["RESUMABLE_EXIT_CODE_FILE"])  # named by the supervisor
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])  # e.g. a data loader worker
Path(sys.argv[-1]).write_text(f"{child.pid}\n")
signal.signal(signal.SIGTERM, signal.SIG_IGN)
exit_code_file.write_text("75\n")  # stopped early with a checkpoint, as train_loop.py records it
print("recorded 75, now stuck in teardown", flush=True)
time.sleep(3600)  # as a rank deadlocked in a destructor
'''


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_launch_sh_ends_a_training_stuck_after_recording_its_code_and_exits_with_that_code(tmp_path, session_env):
    # The real supervisor and accelerate launch, with a stand-in training beside them.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("supervisor.py", "accelerate_config.yaml"):
        shutil.copy(REPO / name, project / name)
    (project / "resumable").symlink_to(REPO / "resumable")
    (project / "train_loop.py").write_text(STUCK_TRAINING)
    child_pid_file = tmp_path / "child.pid"

    started = time.monotonic()
    result = subprocess.run([sys.executable, str(project / "supervisor.py"), str(child_pid_file)], env=session_env,
                            capture_output=True, text=True, timeout=TEARDOWN_GRACE_SECONDS + 120)  # fmt: skip
    took = time.monotonic() - started

    assert result.returncode == 75, result.stdout + result.stderr
    assert f"still running {TEARDOWN_GRACE_SECONDS} s after the training recorded its exit code; ending them" in result.stderr, result.stderr
    assert took >= TEARDOWN_GRACE_SECONDS, took  # not before the grace
    assert took < TEARDOWN_GRACE_SECONDS + 60, took  # start-up of accelerate launch, then the grace
    assert not alive(int(child_pid_file.read_text())), "the training's own child was left running"
