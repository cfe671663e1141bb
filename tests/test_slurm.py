"""slurm/train.sbatch on a real single-node SLURM cluster (tests/slurm/start_cluster.sh, run by .ci/run)."""

import json
import math
import shutil
import subprocess
import time

import pytest

from conftest import REPO, file_digest, measure_speed, tiny_flags

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


def sized_to_need_allocations(tmp_path, env, corpus, launcher=None, allocations: float = 2.5) -> tuple[list[str], int]:
    """(flags, minutes): a time limit, and a run that needs about `allocations` of them at this machine's speed now.

    Measured just before (conftest.measure_speed; the slurm lane runs beside the parallel one). Each
    allocation leaves at least 20 s of training before its USR1 (30 s before the end), so the job is
    requeued at least once unless the machine gets `allocations` times faster."""
    start_up, steps_per_second = measure_speed(env, tmp_path, corpus, {"max_train_samples": 200}, launcher=launcher)
    minutes = max(1, math.ceil((start_up + 30 + 20) / 60))  # start-up, training, then USR1 30 s before the end
    window = minutes * 60 - 30 - start_up
    steps = max(600, round(allocations * window * steps_per_second / 100) * 100)
    return tiny_flags(corpus, max_train_samples=200, max_steps=steps, save_steps=steps // 6, logging_steps=steps // 6), minutes


def run_job(sbatch_arguments: list[str], output_dir, flags, env, log, seconds: float = 900) -> tuple[dict, str]:
    """Submit the job (a 1-minute limit unless the arguments say, USR1 30 s before it), wait until the training is complete; (live state, job log)."""
    *options, script = sbatch_arguments
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--time=1", f"--output={log}", f"--chdir={REPO}", "--signal=B:USR1@30", *options,
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
    flags, minutes = sized_to_need_allocations(tmp_path, session_env, corpus)
    reference = reference_runs(flags)
    output_dir, log = tmp_path / "run", tmp_path / "job.log"
    live, text = run_job([f"--time={minutes}", "slurm/train.sbatch"], output_dir, flags, session_env, log)
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

    flags, minutes = sized_to_need_allocations(tmp_path, session_env, corpus, launcher=TWO_RANKS)
    reference = reference_runs(flags, launcher=TWO_RANKS)  # the same two processes on one machine
    output_dir, log = tmp_path / "run", tmp_path / "job.log"
    two_tasks = [f"--time={minutes}", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "slurm/train-multinode.sbatch"]
    live, text = run_job(two_tasks, output_dir, flags, {**session_env, "MAIN_PROCESS_IP": "127.0.0.1"}, log, seconds=900 + 6 * minutes * 60)
    assert "2 machine(s) x 1 process(es)" in text and "on 2 machines" in text, text[-3000:]
    assert "requeueing job" in text and "run 2:" in text, (text[-3000:], flags, minutes)
    assert "Saved checkpoint-" in text and ("(SIGUSR1" in text or "(deadline" in text)
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
