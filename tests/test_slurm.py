"""slurm/train.sbatch on a real single-node SLURM cluster (tests/slurm/start_cluster.sh, run by .ci/run)."""

import json
import shutil
import subprocess
import time

import pytest

from conftest import PYTHON, REPO, file_digest, project_training_the_harness, tiny_flags

pytestmark = pytest.mark.slow


def cluster_is_up() -> bool:
    """Whether a cluster answers with a usable node; a node still completing the previous test's job is waited for."""
    if not shutil.which("sbatch"):
        return False
    deadline = time.monotonic() + 120
    while True:
        answer = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        if answer.returncode == 0 and any(s in answer.stdout for s in ("idle", "mixed", "allocated")):
            return True
        if answer.returncode != 0 or not answer.stdout.strip() or time.monotonic() > deadline:
            return False
        time.sleep(2)  # e.g. "completing": the job a test cancelled is still ending


# A job's training lasts by the clock, not by the CPU: each step takes STEP_SECONDS (tests/harness.py's
# HARNESS_STEP_SECONDS), so the job leaves the cores to the parallel lane beside it, and no machine, however
# fast or busy, changes how many allocations it needs. A MINUTES limit with USR1 30 s before it leaves each
# allocation 90 s less its start-up; RUN_SECONDS of steps are more than one such window, and less than two
# as long as two start-ups take under 80 s: the job is requeued once and finishes in its second allocation.
STEP_SECONDS, MINUTES, RUN_SECONDS = 0.1, 2, 100


def paced_job(tmp_path, env, corpus) -> tuple[list[str], dict]:
    """(flags, environment) for a job whose launch.sh trains tests/harness.py at STEP_SECONDS a step (RESUMABLE_HOME)."""
    steps = round(RUN_SECONDS / STEP_SECONDS)
    flags = tiny_flags(corpus, max_train_samples=200, max_steps=steps, save_steps=steps // 5, logging_steps=steps // 5)
    paced = {**project_training_the_harness(tmp_path / "project"), "HARNESS_STEP_SECONDS": str(STEP_SECONDS)}
    return flags, {**env, **paced}


def run_job(sbatch_arguments: list[str], output_dir, flags, env, log, seconds: float = 900) -> tuple[dict, str]:
    """Submit the job (a MINUTES limit, USR1 30 s before it), wait until the training is complete; (live state, job log)."""
    *options, script = sbatch_arguments
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--time={MINUTES}", f"--output={log}", f"--chdir={REPO}", "--signal=B:USR1@30", *options,
         str(REPO / script), "--output_dir", str(output_dir), *flags],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        live = wait_for_the_end(job_id, output_dir, seconds)
        text = log.read_text()
        assert live.get("training_complete"), text[-3000:]
    finally:
        subprocess.run(["scancel", job_id])
    return live, text


def wait_for_the_end(job_id: str, output_dir, seconds: float = 900) -> dict:
    """The live trainer_state.json once training is complete, or once the job is gone from the queue."""
    live = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        live = json.loads((output_dir / "trainer_state.json").read_text()) if (output_dir / "trainer_state.json").exists() else {}
        if live.get("training_complete"):
            break
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
        if not queued:
            break  # the job ended without finishing the training: the asserts say why
        time.sleep(5)
    return live


def test_job_hits_its_time_limit_saves_requeues_itself_and_finishes_byte_identical(tmp_path, session_env, corpus, reference_runs):
    if not cluster_is_up():
        pytest.skip("no SLURM cluster here: run tests/slurm/start_cluster.sh (as root) first")
    flags, job_env = paced_job(tmp_path, session_env, corpus)
    reference = reference_runs(flags)
    output_dir, log = tmp_path / "run", tmp_path / "job.log"
    live, text = run_job(["slurm/train.sbatch"], output_dir, flags, job_env, log)
    assert "requeueing job" in text and "run 2 on" in text, text[-3000:]
    assert "Saved checkpoint-" in text and ("(SIGUSR1" in text or "(deadline" in text)
    resumes = [entry for entry in live["run_history"] if entry["event"] == "resume"]
    assert resumes and all(entry["previous_stop"] in ("SIGUSR1", "deadline", "SIGTERM") for entry in resumes), live["run_history"]
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_multinode_job_with_two_tasks_as_two_machines_requeues_itself_and_finishes_byte_identical(tmp_path, session_env, corpus, reference_runs):
    """slurm/train-multinode.sbatch with two tasks on this one node standing in for two nodes."""
    if not cluster_is_up():
        pytest.skip("no SLURM cluster here: run tests/slurm/start_cluster.sh (as root) first")
    from test_multiprocess import TWO_RANKS

    flags, job_env = paced_job(tmp_path, session_env, corpus)
    reference = reference_runs(flags, launcher=TWO_RANKS)  # the same two processes on one machine
    output_dir, log = tmp_path / "run", tmp_path / "job.log"
    two_tasks = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "slurm/train-multinode.sbatch"]
    live, text = run_job(two_tasks, output_dir, flags, {**job_env, "MAIN_PROCESS_IP": "127.0.0.1"}, log)
    assert "2 machine(s) x 1 process(es)" in text and "on 2 machines" in text, text[-3000:]
    assert "requeueing job" in text and "run 2:" in text, text[-3000:]
    assert "Saved checkpoint-" in text and ("(SIGUSR1" in text or "(deadline" in text)
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


@pytest.mark.parametrize("example", ["digits_classifier", "hf_trainer"])
def test_own_script_job_hits_its_time_limit_requeues_itself_and_finishes_byte_identical(tmp_path, session_env, reference_runs, example):
    """slurm/script.sbatch running a user's own script: a resumable.Run loop on one process (`python script.py`), or a
    Trainer script with resumable.trainer's two lines on two (`NUM_PROCESSES=2 python -m resumable.launch script.py`,
    whose 75 survives the launcher).

    Paced as the CLI's jobs are (tests/example_harness.py EXAMPLE_STEP_SECONDS): 1000 steps of 0.1 s (the Trainer: 500 of
    0.2 s) outlast one allocation's 90 s, and fit in two."""
    if not cluster_is_up():
        pytest.skip("no SLURM cluster here: run tests/slurm/start_cluster.sh (as root) first")
    from test_library import EXAMPLE_HARNESS, example_launcher

    # The Trainer's steps are paced slower and fewer: the same RUN_SECONDS by the clock, half the CPU for its 2-process reference run.
    step_seconds = 2 * STEP_SECONDS if example == "hf_trainer" else STEP_SECONDS
    flags = ["--max_steps", str(round(RUN_SECONDS / step_seconds)), "--save_steps", "100"]
    if example == "hf_trainer":
        command, processes = [PYTHON, "-m", "resumable.launch", EXAMPLE_HARNESS, str(REPO / "examples" / "hf_trainer.py")], {"NUM_PROCESSES": "2"}
        reference = reference_runs(flags, launcher=example_launcher(example, 2))  # the same two processes, uninterrupted
    else:
        command, processes = example_launcher(example, 1), {}  # python tests/example_harness.py examples/NAME.py
        reference = reference_runs(flags, launcher=command)
    output_dir, log = tmp_path / "run", tmp_path / "job.log"
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--time={MINUTES}", f"--output={log}", f"--chdir={REPO}", "--signal=B:USR1@30",
         str(REPO / "slurm" / "script.sbatch"), *command, "--output_dir", str(output_dir), *flags],
        env={**session_env, **processes, "EXAMPLE_STEP_SECONDS": str(step_seconds)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 900
        while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip() and time.monotonic() < deadline:
            time.sleep(5)  # the job's end, not training_complete: a Trainer script saves its final model after train() returns
    finally:
        subprocess.run(["scancel", job_id])
    text = log.read_text()
    assert "🔁 requeueing job" in text and "run 2 on" in text and "exited with 0" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "🛑 Stopping at step " in text and ("SIGUSR1" in text or ": deadline" in text), text[-3000:]
    live = json.loads((output_dir / "trainer_state.json").read_text())
    resumes = [entry for entry in live["run_history"] if entry["event"] == "resume"]
    assert resumes and all(entry["previous_stop"] in ("SIGUSR1", "deadline", "SIGTERM") for entry in resumes), live["run_history"]
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
