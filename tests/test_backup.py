"""--backup_to: a real S3-compatible server (rclone serve s3 on 127.0.0.1) and a directory, the real program in a subprocess."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import Training, file_digest, tiny_flags, train

RCLONE = str(Path(sys.executable).parent / "rclone")
BUCKET = "bucket"
FLAGS = dict(max_steps=40, save_steps=10, logging_steps=5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """`rclone serve s3` over a directory: the bucket is a folder, each object a file we can look at."""

    def __init__(self, root: Path):
        self.root = root
        (root / BUCKET).mkdir(parents=True)
        self.port = free_port()
        self.key, self.secret = "test-key", "s3cr3t-" + uuid.uuid4().hex
        self.process = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [RCLONE, "serve", "s3", "--auth-key", f"{self.key},{self.secret}", "--addr", f"127.0.0.1:{self.port}", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("rclone serve s3 did not start")

    def stop(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
            self.process = None

    def env(self, secret=None) -> dict:
        return {
            "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": secret or self.secret,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_REGION": "us-east-1",
        }  # fmt: skip

    def folder(self, prefix: str) -> Path:
        return self.root / BUCKET / prefix


@pytest.fixture
def s3(tmp_path):
    server = S3Server(tmp_path / "s3")
    yield server
    server.stop()


def committed(dest: Path) -> list[str]:
    """Checkpoint names whose manifest is in DEST, oldest first."""
    return sorted((p.parent.name for p in dest.glob("checkpoint-*/manifest.json")), key=lambda n: int(n.split("-")[1]))


def wait_until(condition, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill_once_dest_holds(env, output_dir, flags, dest: Path, name: str) -> None:
    """Train, and SIGKILL the run (every process of it) once DEST holds `name` committed (it waits there)."""
    run = Training(env, output_dir, flags, harness_env={"HARNESS_PAUSE_AFTER": name.split("-")[1]})
    run.wait_for(rf"Saved {name}\b")
    wait_until(lambda: name in committed(dest), what=f"{name} in DEST")
    run.signal_group(signal.SIGKILL)
    run.finish()


def assert_no_secret(secret: str, *places) -> None:
    """The secret key appears in no file under these directories and in no captured output."""
    for place in places:
        if isinstance(place, str):
            assert secret not in place
            continue
        for path in Path(place).rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"the secret key is in {path}"


def s3_run(s3, session_env, corpus, prefix="run"):
    """(flags, environment, DEST's folder on the server's disk) of a run backed up to s3://bucket/PREFIX."""
    return tiny_flags(corpus, **FLAGS) + ["--backup_to", f"s3://{BUCKET}/{prefix}"], {**session_env, **s3.env()}, s3.folder(prefix)


@pytest.mark.quick
def test_killed_then_fresh_machine_restores_from_s3_byte_identical(tmp_path, session_env, corpus, reference_runs, s3):
    reference = reference_runs(tiny_flags(corpus, **FLAGS))
    flags, env, dest = s3_run(s3, session_env, corpus, "runs/one")
    output_dir = tmp_path / "run"

    run = Training(env, output_dir, flags)  # kill -9 during training, once DEST holds a checkpoint
    run.wait_for(r"Saved checkpoint-20")
    wait_until(lambda: committed(dest), what="a committed checkpoint in DEST")
    run.signal_group(signal.SIGKILL)
    run.finish()
    in_dest = committed(dest)[-1]
    shutil.rmtree(output_dir)  # the machine is gone

    final = train(env, output_dir, flags)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"☁️  restored {in_dest} from s3://{BUCKET}/runs/one (" in final.stdout
    assert f"✅ Resumed from checkpoint (step {in_dest.split('-')[1]}," in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert file_digest(dest / "final-model" / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert (dest / "final-model" / "manifest.json").is_file() and (dest / "final-model" / "trainer_state.json").is_file()
    assert committed(dest) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]  # --save_total_limit 3
    assert_no_secret(s3.secret, output_dir, s3.root, run.text, final.stdout, final.stderr)

    again = train(env, tmp_path / "another-machine", flags)  # DEST holds a completed run
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Training is already complete" in again.stdout and "restored the final model" in again.stdout
    assert file_digest(tmp_path / "another-machine" / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_killed_during_an_upload_then_fresh_machine(tmp_path, session_env, corpus, reference_runs, s3):
    reference = reference_runs(tiny_flags(corpus, **FLAGS))
    flags, env, dest = s3_run(s3, session_env, corpus)
    output_dir = tmp_path / "run"

    killed = train(env, output_dir, flags, harness_env={"HARNESS_KILL_IN_UPLOAD": "20"})
    assert killed.returncode == -signal.SIGKILL
    assert (dest / "checkpoint-20" / "model.safetensors").is_file() and not (dest / "checkpoint-20" / "manifest.json").exists()
    shutil.rmtree(output_dir)

    final = train(env, output_dir, flags)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "☁️  restored checkpoint-10 from" in final.stdout  # the half-uploaded checkpoint-20 never counted
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert committed(dest) == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-20", "checkpoint-30", "checkpoint-40", "final-model"]


def test_killed_during_an_upload_the_same_output_dir_finishes_it(tmp_path, session_env, corpus, reference_runs):
    reference = reference_runs(tiny_flags(corpus, **FLAGS))
    dest = tmp_path / "backups" / "run"
    flags = tiny_flags(corpus, **FLAGS) + ["--backup_to", str(dest)]
    output_dir = tmp_path / "run"
    killed = train(session_env, output_dir, flags, harness_env={"HARNESS_KILL_IN_UPLOAD": "20"})
    assert killed.returncode == -signal.SIGKILL
    assert (dest / "checkpoint-20" / "model.safetensors").is_file() and not (dest / "checkpoint-20" / "manifest.json").exists()

    final = train(session_env, output_dir, flags)  # the same machine, the same OUTPUT_DIR
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "Resumed from checkpoint (step 20," in final.stdout and "restored" not in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-20", "checkpoint-30", "checkpoint-40", "final-model"]
    for name in ("checkpoint-20", "checkpoint-30", "checkpoint-40"):  # the half-uploaded one was finished, byte for byte
        for file in json.loads((dest / name / "manifest.json").read_text())["files"]:
            assert file_digest(dest / name / file) == file_digest(output_dir / name / file), f"{name}/{file}"


def test_dest_newer_than_a_non_empty_output_dir_is_restored(tmp_path, session_env, corpus, reference_runs):
    reference = reference_runs(tiny_flags(corpus, **FLAGS))
    dest = tmp_path / "backups" / "run"
    flags = tiny_flags(corpus, **FLAGS) + ["--backup_to", str(dest)]
    output_dir = tmp_path / "run"
    kill_once_dest_holds(session_env, output_dir, flags, dest, "checkpoint-30")
    # This OUTPUT_DIR is behind DEST (e.g. another machine's older copy): it holds only checkpoint-10.
    for name in ("checkpoint-20", "checkpoint-30"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-10"]

    final = train(session_env, output_dir, flags)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"☁️  restored checkpoint-30 from {dest} (" in final.stdout
    assert "✅ Resumed from checkpoint (step 30," in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_the_best_checkpoint_is_kept_in_dest_and_restored_with_the_newest(tmp_path, session_env, corpus, reference_runs):
    # --greater_is_better with eval_loss makes the best checkpoint the earliest one (the loss falls), so
    # keeping it beside the newest is visible with --backup_total_limit 1.
    flags = tiny_flags(corpus, **FLAGS, eval_steps=10, validation_split_percentage=10, load_best_model_at_end=True, greater_is_better="true")
    reference = reference_runs(flags)
    assert json.loads((reference / "trainer_state.json").read_text())["best_model_checkpoint"] == "checkpoint-10"
    dest = tmp_path / "backups" / "run"
    flags += ["--backup_to", str(dest), "--backup_total_limit", "1"]
    output_dir = tmp_path / "run"
    kill_once_dest_holds(session_env, output_dir, flags, dest, "checkpoint-30")
    assert "checkpoint-10" in committed(dest)  # with a limit of 1 it would be gone by now, were it not the best
    shutil.rmtree(output_dir)  # the machine is gone

    final = train(session_env, output_dir, flags)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"☁️  restored checkpoint-30 from {dest} (" in final.stdout
    assert f"☁️  restored checkpoint-10 (the best model) from {dest} (" in final.stdout
    assert "🏆 The final model is the best one: checkpoint-10" in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert committed(dest) == ["checkpoint-10", "checkpoint-40"]
    assert file_digest(dest / "final-model" / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_refused_at_start_in_one_line_nothing_written(tmp_path, session_env, corpus, s3):
    flags = tiny_flags(corpus, **FLAGS)
    cases = [
        (s3.env(secret="wrong-secret"), f"s3://{BUCKET}/run", "SignatureDoesNotMatch"),
        (s3.env(), "s3://no-such-bucket/run", "NoSuchBucket"),
        ({**s3.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, f"s3://{BUCKET}/run", "cannot reach http://127.0.0.1:"),
        (s3.env(), f"s3://{s3.key}:{s3.secret}@{BUCKET}/run", "must not hold credentials"),
    ]
    for extra, url, reason in cases:
        output_dir = tmp_path / "never"
        result = train({**session_env, **extra}, output_dir, flags + ["--backup_to", url])
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and reason in errors[0], result.stderr[-2000:]
        assert s3.secret not in result.stdout + result.stderr
        assert not output_dir.exists()
    assert list((s3.root / BUCKET).iterdir()) == []


def test_damaged_newest_checkpoint_in_dest_is_named_and_passed_over(tmp_path, session_env, corpus, reference_runs, s3):
    reference = reference_runs(tiny_flags(corpus, **FLAGS))
    flags, env, dest = s3_run(s3, session_env, corpus)
    first = train(env, tmp_path / "first", flags)
    assert first.returncode == 0, first.stderr[-2000:]
    weights = dest / "checkpoint-40" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size: only the checksum can tell
    weights.write_bytes(bytes(data))

    output_dir = tmp_path / "fresh"
    result = train(env, output_dir, flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"⚠️  checkpoint-40 in s3://{BUCKET}/run is damaged (model.safetensors: checksum mismatch); passed over" in result.stdout
    assert "☁️  restored checkpoint-30 from" in result.stdout  # the next older one; the final model (step 40) is not taken
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_directory_dest_retention_nothing_outside_the_prefix_and_clean(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **FLAGS)
    parent = tmp_path / "backups"
    neighbour = parent / "other-run" / "checkpoint-5"
    neighbour.mkdir(parents=True)
    (neighbour / "model.safetensors").write_bytes(b"not ours")
    dest = parent / "run"
    leftover = dest / "checkpoint-5"  # an interrupted deletion: files without their manifest
    leftover.mkdir(parents=True)
    (leftover / "optimizer.bin").write_bytes(b"half deleted")

    result = train(session_env, tmp_path / "run", flags + ["--backup_to", str(dest), "--backup_total_limit", "2"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint-30", "checkpoint-40", "final-model"]
    assert (neighbour / "model.safetensors").read_bytes() == b"not ours"
    for name in ("checkpoint-30", "checkpoint-40"):
        manifest = json.loads((dest / name / "manifest.json").read_text())
        for file, entry in manifest["files"].items():
            assert file_digest(dest / name / file) == file_digest(tmp_path / "run" / name / file)
            assert (dest / name / file).stat().st_size == entry["size"]
    status = subprocess.run([sys.executable, "status.py", "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert f"backup {dest}: newest checkpoint-40, up to date, final model ✅" in status.stdout, status.stdout

    fresh = train(session_env, tmp_path / "run", flags + ["--backup_to", str(dest), "--resume_from_checkpoint", "none"])
    assert fresh.returncode == 2 and f"error: --backup_to {dest} holds checkpoint-30, checkpoint-40 of an earlier run" in fresh.stderr, fresh.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoint-40").is_dir()  # refused before anything moved

    # The guide's last step: clean says which of the checkpoints it deletes DEST holds (it keeps 2, OUTPUT_DIR 3); the same command then neither trains nor restores.
    final = file_digest(tmp_path / "run" / "model.safetensors")
    cleaned = subprocess.run([sys.executable, "cleaning.py", "--output_dir", str(tmp_path / "run"), "--backup_to", str(dest)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert cleaned.returncode == 0 and f"⚠️  {dest} holds checkpoint-30, checkpoint-40, not checkpoint-20: those exist only here" in cleaned.stdout, cleaned.stdout + cleaned.stderr
    again = train(session_env, tmp_path / "run", flags + ["--backup_to", str(dest)])
    assert again.returncode == 0 and "already complete" in again.stdout and "restored" not in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert not list((tmp_path / "run").glob("checkpoint-*")) and file_digest(tmp_path / "run" / "model.safetensors") == final


def test_server_away_mid_run_warns_retries_and_catches_up(tmp_path, session_env, corpus, reference_runs, s3):
    reference = reference_runs(tiny_flags(corpus, **FLAGS))
    flags, env, dest = s3_run(s3, session_env, corpus)
    run = Training(env, tmp_path / "run", flags)
    run.wait_for(r"Saved checkpoint-10")
    s3.stop()
    run.wait_for(r"⚠️  backup to s3://bucket/run failed \(")
    status = json.loads((tmp_path / "run" / "backup_status.json").read_text())
    assert status["last_error"]
    s3.start()
    code = run.finish()
    assert code == 0, run.text[-3000:]
    assert run.text.count("⚠️  backup to") == 1  # one line for the outage, not one per retry
    assert "works again" in run.text
    assert file_digest(dest / "final-model" / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert committed(dest)[-1] == "checkpoint-40"


def test_end_waits_for_the_backup_then_the_same_command_finishes_the_upload(tmp_path, session_env, corpus, s3):
    flags = tiny_flags(corpus, **FLAGS) + ["--backup_to", f"s3://{BUCKET}/run", "--backup_timeout", "3"]
    env = {**session_env, **s3.env()}
    run = Training(env, tmp_path / "run", flags)
    run.wait_for(r"Saved checkpoint-30")
    s3.stop()
    assert run.finish() == 1, run.text[-3000:]
    assert "error: training is complete locally, but the backup to s3://bucket/run is not" in run.text
    assert "run the same command again to finish the upload" in run.text
    s3.start()
    again = train(env, tmp_path / "run", flags)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "Training is already complete" in again.stdout and "step 35/40" not in again.stdout
    assert (s3.folder("run") / "final-model" / "manifest.json").is_file()
    assert committed(s3.folder("run"))[-1] == "checkpoint-40"


def test_a_stop_waits_for_its_checkpoint_to_reach_dest(tmp_path, session_env, corpus):
    dest = tmp_path / "backups" / "run"
    run = Training(session_env, tmp_path / "run", tiny_flags(corpus, **FLAGS) + ["--backup_to", str(dest)])
    run.wait_for(r"Saved checkpoint-10")
    os.kill(run.process.pid, signal.SIGUSR1)
    assert run.finish() == 75, run.text[-3000:]
    stopped_at = int(re.search(r"Stopping at step (\d+)", run.text).group(1))
    assert f"☁️  checkpoint-{stopped_at} is in {dest}" in run.text
    assert committed(dest)[-1] == f"checkpoint-{stopped_at}"


@pytest.mark.slow
def test_two_processes_the_main_one_uploads(tmp_path, session_env, corpus, s3):
    from test_multiprocess import TWO_RANKS

    flags = tiny_flags(corpus, max_train_samples=200, max_steps=14, save_steps=7) + ["--backup_to", f"s3://{BUCKET}/run"]
    env = {**session_env, **s3.env()}
    result = train(env, tmp_path / "run", flags, launcher=TWO_RANKS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "multi_cpu: 2 process(es)" in result.stdout
    dest = s3.folder("run")
    assert committed(dest) == ["checkpoint-7", "checkpoint-14"]
    assert (dest / "checkpoint-14" / "random_states_1.pkl").is_file() and (dest / "final-model" / "manifest.json").is_file()
    assert result.stdout.count("☁️  final model") == 1  # one uploader
    shutil.rmtree(tmp_path / "run")
    again = train(env, tmp_path / "run", flags, launcher=TWO_RANKS)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "☁️  restored checkpoint-14" in again.stdout and "Training is already complete" in again.stdout
    assert file_digest(tmp_path / "run" / "model.safetensors") == file_digest(dest / "final-model" / "model.safetensors")
    assert_no_secret(s3.secret, tmp_path / "run", result.stdout, result.stderr, again.stdout, again.stderr)


@pytest.mark.slow
def test_slurm_job_on_scratch_requeued_with_an_empty_output_dir_continues_from_backup(tmp_path, session_env, corpus, reference_runs):
    from test_slurm import MINUTES, REPO, cluster_is_up, paced_job

    if not cluster_is_up():
        pytest.skip("no SLURM cluster here: run tests/slurm/start_cluster.sh (as root) first")
    flags, job_env = paced_job(tmp_path, session_env, corpus)
    reference = reference_runs(flags)
    dest, scratch, log = tmp_path / "shared" / "run1", tmp_path / "scratch", tmp_path / "job.log"
    subprocess.run([str(REPO / "launch.sh"), "setup"], env=session_env, check=True)  # the job must not spend its minute installing
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--time={MINUTES}", f"--output={log}", f"--chdir={REPO}", "--signal=B:USR1@30",
         str(REPO / "slurm" / "train.sbatch"), *flags, "--backup_to", str(dest)],
        env={**job_env, "SCRATCH_OUTPUT_DIR": f"{scratch}/resumable-%j-%r"}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not (dest / "final-model" / "manifest.json").exists():
            if not subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
                break
            time.sleep(5)
    finally:
        subprocess.run(["scancel", job_id])
    text = log.read_text()
    assert "requeueing job" in text and "☁️  restored checkpoint-" in text, text[-3000:]
    attempts = sorted(p.name for p in scratch.iterdir())
    assert len(attempts) >= 2 and all(name.startswith(f"resumable-{job_id}-") for name in attempts), attempts
    assert file_digest(dest / "final-model" / "model.safetensors") == file_digest(reference / "model.safetensors")
