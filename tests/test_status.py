"""`./launch.sh status`, the loss picture and TensorBoard logs, on real runs."""

import json
import signal
import subprocess

from PIL import Image

from conftest import PYTHON, REPO, Training, tiny_flags, train

FLAGS = dict(max_train_samples=200, save_steps=50, logging_steps=10)


def status(output_dir, *extra):
    result = subprocess.run([PYTHON, str(REPO / "status.py"), "--output_dir", str(output_dir), *extra],
                            capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--json" in extra else result.stdout


def test_status_of_an_empty_a_running_an_interrupted_a_damaged_and_a_finished_run(tmp_path, session_env, corpus):
    output_dir = tmp_path / "run"
    assert status(output_dir, "--json")["situation"] == "empty"
    assert "nothing trained here yet" in status(output_dir)

    flags = tiny_flags(corpus, **FLAGS, max_steps=400)
    run = Training(session_env, output_dir, flags)
    run.wait_for(r"step 120/400")
    run.signal_group(signal.SIGSTOP)  # frozen, it still holds the lock, and cannot finish while status runs
    report = status(output_dir, "--json")
    assert report["situation"] == "running" and report["active_run"].startswith(f"pid {run.process.pid} on ")
    # The live state is at least as new as the newest save (routine rewrites may be skipped to save time).
    assert report["total_steps"] == 400 and 100 <= report["global_step"] < 400 and report["steps_per_second"] > 0
    assert report["checkpoints"] and all(c["step"] % 50 == 0 and c["valid"] for c in report["checkpoints"])
    run.signal_group()
    run.finish()

    report = status(output_dir, "--json")
    assert report["situation"] == "interrupted" and report["active_run"] is None
    newest = report["checkpoints"][-1]["name"]
    optimizer = output_dir / newest / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-1] + b"!")
    report = status(output_dir, "--json")
    assert report["checkpoints"][-1] == {**report["checkpoints"][-1], "valid": False, "problem": "optimizer.bin: checksum mismatch"}
    text = status(output_dir)
    assert "(last stop: killed or crashed)" in text and "❌ optimizer.bin: checksum mismatch" in text

    assert train(session_env, output_dir, flags).returncode == 0
    report = status(output_dir, "--json")
    assert report["situation"] == "complete" and report["percent"] == 100.0
    assert [entry["event"] for entry in report["run_history"]] == ["start", "resume"]
    assert report["corrupt"] == [f"{newest}.corrupt"]
    assert all(c["valid"] for c in report["checkpoints"]) and report["disk_free_bytes"] > 0

    # The picture: a PNG with one resume mark per recorded resume.
    picture = status(output_dir, "--plot", "--json")["plot"]
    image = Image.open(picture)
    assert image.format == "PNG" and image.size[0] > 400
    marks = json.loads(image.info["Description"])["resume_steps"]
    assert marks == [entry["step"] for entry in report["run_history"] if entry["event"] == "resume"] and marks[0] > 0


def test_tensorboard_curve_continues_after_a_resume_without_repeated_steps(tmp_path, session_env, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "run"
    flags = tiny_flags(corpus, **FLAGS, max_steps=200, report_to="tensorboard")
    run = Training(session_env, output_dir, flags)
    run.wait_for(r"step 80/200")  # logged 60, 70, 80 after checkpoint-50: the resume redoes them
    run.signal_group()
    run.finish()
    resumed = train(session_env, output_dir, flags)
    assert resumed.returncode == 0 and "Resumed from checkpoint (step 50," in resumed.stdout
    assert len(list((output_dir / "runs").glob("events.out.tfevents.*"))) == 2

    events = EventAccumulator(str(output_dir / "runs"))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(10, 201, 10))  # strictly increasing: the orphaned points were purged
    losses = {entry["step"]: entry["loss"] for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]}
    assert [round(event.value, 4) for event in events.Scalars("train/loss")] == [round(losses[s], 4) for s in steps]
