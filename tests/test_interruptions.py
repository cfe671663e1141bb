"""Signals, deadlines and launch.sh's retry loop, on the real program."""

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from resumable import state
from conftest import REPO, SAVE_MODES, Training, descendants, file_digest, kill_when, measure_start_up, project_training_the_harness, signal_all_at_once, tiny_flags, train
from test_multiprocess import TWO_RANKS

FLAGS = dict(max_train_samples=200, gradient_accumulation_steps=2, max_steps=120, save_steps=50)


def checkpoint_steps(output_dir):
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit())


SYNC, ASYNC = ["--async_save", "false"], ["--async_save", "true"]


@pytest.mark.parametrize(
    "number, save_mode",
    [(signal.SIGINT, SYNC), (signal.SIGTERM, SYNC), (signal.SIGUSR1, SYNC), (signal.SIGTERM, ASYNC)],
    ids=["SIGINT", "SIGTERM", "SIGUSR1", "SIGTERM-async"],
)
def test_signal_saves_at_the_next_step_exits_75_and_resume_is_exact(tmp_path, session_env, corpus, reference_runs, number, save_mode):
    flags = tiny_flags(corpus, **FLAGS)
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, flags + save_mode)
    run.wait_for(r"step 20/120")
    run.process.send_signal(number)
    assert run.finish() == 75, run.text[-2000:]
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert f"Saved checkpoint-{stopped_at} ({signal.Signals(number).name}" in run.text
    assert "run the same command again" in run.text
    assert checkpoint_steps(output_dir) == [stopped_at]  # saved whatever --save_steps says
    live = json.loads((output_dir / "trainer_state.json").read_text())
    assert live["stop_reason"] == signal.Signals(number).name and live["global_step"] == stopped_at

    final = train(session_env, output_dir, flags + save_mode)
    assert final.returncode == 0
    assert f"Resumed from checkpoint (step {stopped_at}," in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    history = json.loads((output_dir / "trainer_state.json").read_text())["run_history"]
    assert [entry["event"] for entry in history] == ["start", "resume"]
    assert history[1]["previous_stop"] == signal.Signals(number).name and history[1]["step"] == stopped_at


@SAVE_MODES
def test_second_ctrl_c_during_the_save_aborts_with_130_and_keeps_the_previous_checkpoint(tmp_path, session_env, corpus, reference_runs, save_mode):
    flags = tiny_flags(corpus, **FLAGS)
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, flags + save_mode, harness_env={"HARNESS_SLOW_SAVE": "6"})  # every save: room for a reader slowed by a busy machine
    run.wait_for(r"Saved checkpoint-50")
    run.process.send_signal(signal.SIGINT)
    run.wait_for(r"harness: inside the save of step")
    time.sleep(1.2)  # a person pressing Ctrl+C again, not the same key press delivered twice; the save sleeps 6 s
    run.process.send_signal(signal.SIGINT)
    assert run.finish() == 130
    assert checkpoint_steps(output_dir) == [50]
    final = train(session_env, output_dir, flags)
    assert final.returncode == 0 and "Resumed from checkpoint (step 50," in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


@pytest.mark.slow
def test_sigterm_to_the_two_rank_launcher_stops_every_rank_at_one_step(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **{**FLAGS, "gradient_accumulation_steps": 1})
    reference = reference_runs(flags, launcher=TWO_RANKS)
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, flags, launcher=TWO_RANKS)
    run.wait_for(r"step 30/120")
    run.process.send_signal(signal.SIGTERM)  # to the launcher, as `kill` or a scheduler does
    run.finish()
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert checkpoint_steps(output_dir)[-1] == stopped_at
    checkpoint = output_dir / f"checkpoint-{stopped_at}"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    final = train(session_env, output_dir, flags, launcher=TWO_RANKS)
    assert final.returncode == 0, final.stderr[-2000:]
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


@SAVE_MODES
def test_max_time_stops_in_time_with_a_checkpoint(tmp_path, session_env, corpus, save_mode):
    # Start-up on this machine now (seconds when it is quiet, tens of seconds when its cores are
    # busy): a 2-step run, timed. The limit leaves about 10 s of training after it.
    started = time.monotonic()
    short = train(session_env, tmp_path / "short", tiny_flags(corpus, **{**FLAGS, "max_steps": 2, "save_steps": 2}) + save_mode)
    start_up = time.monotonic() - started
    assert short.returncode == 0, short.stderr[-2000:]
    max_time = math.ceil(start_up) + 10

    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": 100000, "save_steps": 100000, "max_time": f"{max_time}s"}) + save_mode
    started_at, started = time.time(), time.monotonic()
    # Steps of 0.05 s (tests/harness.py): the ~10 s before the deadline cost a core only for the steps' own work;
    # the deadline's margin counts the measured step time, whatever it is.
    result = train(session_env, tmp_path / "run", flags, harness_env={"HARNESS_STEP_SECONDS": "0.05"})
    elapsed = time.monotonic() - started
    assert result.returncode == 75, result.stderr[-2000:]
    assert "Stopping at step" in result.stdout and ": deadline" in result.stdout
    [step] = checkpoint_steps(tmp_path / "run")
    assert step > 0, result.stdout[-2000:]
    committed_at = (tmp_path / "run" / f"checkpoint-{step}" / state.MANIFEST_NAME).stat().st_mtime
    assert committed_at < started_at + max_time, (committed_at - started_at, max_time)  # the limit counts from the start of the process
    assert elapsed < max_time + max(5, start_up), (elapsed, max_time, start_up)  # and the exit after it costs less than a start-up


def launch(env, *arguments, timeout=600, launch_sh=REPO / "launch.sh"):
    return subprocess.run([str(launch_sh), *arguments], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_launch_sh_retries_after_75_until_done_and_result_is_exact(tmp_path, session_env, corpus, reference_runs):
    # Each attempt gets --max_time = twice the start-up + 8 s, the start-up measured now (a load changes
    # it several-fold), and trains at most 1 / step_seconds steps a second (tests/harness.py), so that the
    # attempts take little CPU and no machine, however fast, trains the run in one: its steps last longer
    # than a whole --max_time, and less than two attempts' training. Two attempts; more, within the
    # retries, if the machine gets slower. The steps are fixed and their pace is sized from the measurement,
    # so that the reference run comes first and fills the tokenization cache the measurement needs warm.
    max_steps = 300
    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": max_steps, "save_steps": max_steps // 4})
    reference = reference_runs(flags)  # this test's own flags: computed here, in this worker's datasets cache
    max_time = 2 * math.ceil(measure_start_up(session_env, tmp_path, corpus, FLAGS, cache_filled=True)) + 8
    step_seconds = (max_time + 2) / max_steps  # the training takes max_time + 2 s, as ever
    env = {**session_env, **project_training_the_harness(tmp_path / "project"), "HARNESS_STEP_SECONDS": str(step_seconds), "RESUMABLE_RETRY_PAUSE": "0"}
    result = launch(env, "--retries", "40", "--output_dir", str(tmp_path / "run"), *flags, "--max_time", str(max_time), timeout=3600,
                    launch_sh=tmp_path / "project" / "launch.sh")  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    retries = result.stderr.count("training exited with 75")
    assert retries >= 1, (result.stderr[-2000:], max_time, max_steps)
    assert file_digest(tmp_path / "run" / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_launch_sh_does_not_retry_bad_input(tmp_path, session_env, corpus):
    result = launch(session_env, "--retries", "3", "--output_dir", str(tmp_path / "run"), *tiny_flags(corpus, save_steps=0))
    assert result.returncode == 2
    assert result.stderr.count("--save_steps must be a positive integer (got 0)") == 1
    assert "retry" not in result.stderr


def test_launch_sh_passes_ctrl_c_to_the_training_and_reports_75(tmp_path, session_env, corpus):
    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": 100000})
    process = subprocess.Popen([str(REPO / "launch.sh"), "--retries", "3", "--output_dir", str(tmp_path / "run"), *flags],
                               env=session_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for line in process.stdout:
        if "step 20/100000" in line:
            break
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-2000:]
    assert "Saved checkpoint-" in output and "retry" not in output  # a person's Ctrl+C is not retried
    assert checkpoint_steps(tmp_path / "run")


# --------------------------------------------------------------------------- launch.sh as schedulers and scripts run it

LAUNCH = [str(REPO / "launch.sh")]


def process_tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def training_processes(pids) -> list[int]:
    """The train_loop.py processes among `pids` (not the launcher, whose arguments name it too)."""
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if any(argument.endswith(b"train_loop.py") for argument in argv[1:3]):  # python [-u] train_loop.py
            found.append(pid)
    return found


def blocked_signals(pid: int) -> set:
    mask = int(Path(f"/proc/{pid}/status").read_text().split("SigBlk:")[1].split()[0], 16)
    return {number for number in signal.Signals if mask & (1 << (number - 1))}


def alive(pids) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_to_every_process_at_once_launch_sh_waits_for_the_training_and_exits_75(tmp_path, session_env, corpus, reference_runs, processes):
    # systemd's stop, SLURM's scancel, time limit or preemption: SIGTERM to launch.sh, the launcher and every rank.
    flags = tiny_flags(corpus, **{**FLAGS, "gradient_accumulation_steps": 3 - processes})
    reference = reference_runs(flags, launcher=TWO_RANKS if processes == 2 else None)
    env = {**session_env, "NUM_PROCESSES": str(processes)}
    output_dir = tmp_path / "run"
    run = Training(env, output_dir, flags, launcher=LAUNCH)
    run.wait_for(r"step 30/120")
    tree = process_tree(run.process.pid)
    training = training_processes(tree)
    assert len(training) == processes
    # The launcher between (accelerate; torchrun's agent for 2) keeps them blocked: it cannot kill a saving rank.
    forwarded = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
    assert [blocked_signals(pid) >= forwarded for pid in tree[:2]] == [False, True]  # launch.sh, the launcher
    assert all(not blocked_signals(pid) & forwarded for pid in training)
    try:
        signal_all_at_once(tree, signal.SIGTERM)
        assert run.process.wait(timeout=120) == 75
        assert alive(tree[1:]) == []  # launch.sh returned only after every process it started had ended
    finally:
        signal_all_at_once(alive(tree), signal.SIGKILL)
    run.finish()
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert f"💾 Saved checkpoint-{stopped_at} (SIGTERM" in run.text
    assert "launch.sh: stopped by SIGTERM (exit 75)" in run.text
    state.verify_checkpoint(output_dir / f"checkpoint-{stopped_at}")

    final = train(env, output_dir, flags, launcher=LAUNCH)
    assert final.returncode == 0, final.stderr[-2000:]
    assert f"Resumed from checkpoint (step {stopped_at}," in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_sigterm_while_the_training_is_still_starting_is_not_fatal(tmp_path, session_env, corpus):
    flags = tiny_flags(corpus, **FLAGS)
    output_dir = tmp_path / "run"
    kill_when(session_env, output_dir, flags, r"Saved checkpoint-50")  # only a checkpoint to resume from: no launch.sh needed

    run = Training(session_env, output_dir, flags, launcher=LAUNCH)
    deadline = time.monotonic() + 60
    while not training_processes(process_tree(run.process.pid)):  # started, still importing torch
        assert time.monotonic() < deadline
        time.sleep(0.02)
    tree = process_tree(run.process.pid)
    try:
        signal_all_at_once(tree, signal.SIGTERM)
        assert run.process.wait(timeout=120) == 75
        assert alive(tree[1:]) == []
    finally:
        signal_all_at_once(alive(tree), signal.SIGKILL)
    run.finish()
    assert "🛑 Stopping at step 50: SIGTERM" in run.text and "Resumed from checkpoint (step 50," in run.text
    assert json.loads((output_dir / "trainer_state.json").read_text())["stop_reason"] == "SIGTERM"
    assert checkpoint_steps(output_dir) == [50]


def test_sigint_stops_launch_sh_started_in_the_background_of_a_script(tmp_path, session_env, corpus):
    # A non-interactive shell starts background jobs with SIGINT ignored; bash could not trap it.
    ignored = subprocess.run(["bash", "-c", "grep SigIgn /proc/self/status & wait"], capture_output=True, text=True).stdout
    assert int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1)), "this shell does not ignore SIGINT in background jobs"
    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": 100000})
    in_a_script = ["bash", "-c", '"$0" "$@" & echo launch.sh is $!; wait $!', str(REPO / "launch.sh")]
    script = Training(session_env, tmp_path / "run", flags, launcher=in_a_script)
    launch_pid = int(script.wait_for(r"launch.sh is (\d+)").group(1))
    script.wait_for(r"step 20/100000")
    tree = process_tree(launch_pid)
    try:
        os.kill(launch_pid, signal.SIGINT)
        assert script.finish(timeout=120) == 75, script.text[-2000:]
    finally:
        signal_all_at_once(alive(tree), signal.SIGKILL)  # without the fix training would go on for ever
    assert alive(tree) == []
    stopped_at = int(script.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert f"💾 Saved checkpoint-{stopped_at} (SIGINT" in script.text
    assert checkpoint_steps(tmp_path / "run") == [stopped_at]
