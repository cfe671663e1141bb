"""slurm/train.sbatch on a real single-node SLURM cluster (tests/slurm/start_cluster.sh, run by .ci/run)."""

import json
import math
import shutil
import subprocess
import time

import pytest

from conftest import REPO, file_digest, tiny_flags

pytestmark = pytest.mark.slow


def cluster_is_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    answer = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return answer.returncode == 0 and any(s in answer.stdout for s in ("idle", "mixed", "allocated"))


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
    # About 100 s of training on 2 cores: more than one 1-minute allocation.
    flags = tiny_flags(corpus, max_train_samples=200, max_steps=6000, save_steps=1000, logging_steps=500)
    reference = reference_runs(flags)
    output_dir, log = tmp_path / "run", tmp_path / "job.log"
    live, text = run_job(["slurm/train.sbatch"], output_dir, flags, session_env, log)
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

    # Sized from what this machine does now (its load changes start-up from ~10 s to ~60 s): the
    # allocation leaves at least 20 s of training before its USR1, and the run needs ~2.5 of them.
    timed = {}
    for name, steps in (("warm-up", 2), (2, 2), (302, 302)):  # the first run fills the tokenization cache the others read
        started = time.monotonic()
        probe = subprocess.run([*TWO_RANKS, "--output_dir", str(tmp_path / f"probe-{name}"), *tiny_flags(corpus, max_train_samples=200, max_steps=steps, save_steps=10_000)],
                               env=session_env, capture_output=True, text=True, timeout=1800)  # fmt: skip
        assert probe.returncode == 0, probe.stderr[-2000:]
        timed[name] = time.monotonic() - started
    start_up, steps_per_second = timed[2], 300 / max(timed[302] - timed[2], 1)
    minutes = max(1, math.ceil((start_up + 30 + 20) / 60))  # start-up, training, then USR1 30 s before the end
    window = minutes * 60 - 30 - start_up
    steps = max(600, round(2.5 * window * steps_per_second / 100) * 100)
    flags = tiny_flags(corpus, max_train_samples=200, max_steps=steps, save_steps=steps // 6, logging_steps=steps // 6)
    reference = reference_runs(flags, launcher=TWO_RANKS)  # the same two processes on one machine
    output_dir, log = tmp_path / "run", tmp_path / "job.log"
    two_tasks = [f"--time={minutes}", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "slurm/train-multinode.sbatch"]
    live, text = run_job(two_tasks, output_dir, flags, {**session_env, "MAIN_PROCESS_IP": "127.0.0.1"}, log, seconds=900 + 6 * minutes * 60)
    assert "2 machine(s) x 1 process(es)" in text and "on 2 machines" in text, text[-3000:]
    assert "requeueing job" in text and "run 2:" in text, (text[-3000:], start_up, steps_per_second, minutes, steps)
    assert "Saved checkpoint-" in text and ("(SIGUSR1" in text or "(deadline" in text)
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
