"""--async_save true: the guarantees of a background save, each on the real program."""

import json
import re
import resource
import signal
import subprocess

import pytest

from resumable import state
from conftest import HARNESS, PYTHON, Training, file_digest, tiny_flags, train
from resumable.stopping import Deadline
from test_multiprocess import TWO_RANKS

FLAGS = dict(max_train_samples=200, max_steps=40, save_steps=10)
ASYNC = ["--async_save", "true"]
SNAPSHOT_FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "training_args.json", "software.json"]


def next_save(output_dir, save_steps: int, max_steps: int) -> int:
    """The step of the first save a resume of `output_dir` makes. The stopped run's newest checkpoint is the
    one its signal landed after, which on a loaded machine can be a save or two later than the line waited for."""
    newest = state.checkpoint_step(state.list_checkpoints(output_dir)[-1])
    assert newest < max_steps, f"the run was not stopped before its end (checkpoint-{newest})"
    return min((newest // save_steps + 1) * save_steps, max_steps)


def same_checkpoint(first, second):
    """Every file byte for byte; trainer_state.json too, but for the wall-clock times of run_history."""
    for name in SNAPSHOT_FILES:
        assert file_digest(first / name) == file_digest(second / name), f"{first.name}/{name} differs"
    records = [json.loads((path / "trainer_state.json").read_text()) for path in (first, second)]
    for record in records:
        for entry in record["run_history"]:
            entry.pop("time")
    assert records[0] == records[1]


def test_snapshot_is_the_state_of_the_save_step_while_training_goes_on(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **FLAGS)
    reference = reference_runs(flags)  # synchronous saves of the same steps
    output_dir = tmp_path / "run"
    # Each file is written 0.3 s late: the loop takes several optimizer steps meanwhile.
    result = train(session_env, output_dir, flags + ASYNC, harness_env={"HARNESS_SLOW_WRITE": "0.3"})
    assert result.returncode == 0, result.stderr[-2000:]
    for step in (20, 30, 40):
        same_checkpoint(output_dir / f"checkpoint-{step}", reference / f"checkpoint-{step}")
        state.verify_checkpoint(output_dir / f"checkpoint-{step}")
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    # The loop went on training while checkpoint-10 was written, and says how long it waited.
    lines = result.stdout.splitlines()
    saved = next(i for i, line in enumerate(lines) if "Saved checkpoint-10" in line)
    assert any(re.search(r"step 1[2-9]/40", line) for line in lines[:saved]), "\n".join(lines)
    blocked, written = map(float, re.search(r"loop blocked (\d+\.\d+)s, written in (\d+\.\d+)s", lines[saved]).groups())
    assert blocked < 0.3 < written


def test_a_second_save_and_a_stop_wait_for_the_save_in_flight(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **{**FLAGS, "save_steps": 3})
    reference = reference_runs(tiny_flags(corpus, **FLAGS))
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, flags + ASYNC, harness_env={"HARNESS_SLOW_WRITE": "0.4"})
    run.wait_for(r"harness: writing optimizer.bin of .tmp-checkpoint-6")
    run.process.send_signal(signal.SIGTERM)  # while checkpoint-6 is being written
    assert run.finish() == 75, run.text[-3000:]
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    events = re.findall(r"harness: writing \S+ of \.tmp-checkpoint-(\d+)|Saved checkpoint-(\d+)", run.text)
    # The files of a save are written only after the previous save became visible.
    visible = set()
    for writing, saved in events:
        if writing:
            assert all(step in visible for step in range(3, int(writing), 3)), events
        else:
            visible.add(int(saved))
    assert visible >= {3, 6, stopped_at} and stopped_at > 6  # the save in flight, then the stop's own
    for checkpoint in state.list_checkpoints(output_dir):
        state.verify_checkpoint(checkpoint)
    assert not list(output_dir.glob(".tmp-checkpoint-*"))

    final = train(session_env, output_dir, tiny_flags(corpus, **FLAGS) + ASYNC)
    assert final.returncode == 0 and f"Resumed from checkpoint (step {stopped_at}," in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_kill_9_during_a_background_write_keeps_the_previous_checkpoint_and_the_result(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **FLAGS)
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, flags + ASYNC, harness_env={"HARNESS_SLOW_WRITE": "1"})
    run.wait_for(r"harness: writing optimizer.bin of .tmp-checkpoint-30")
    run.signal_group(signal.SIGKILL)
    run.finish()
    assert [p.name for p in state.list_checkpoints(output_dir)] == ["checkpoint-10", "checkpoint-20"]
    state.verify_checkpoint(output_dir / "checkpoint-20")
    final = train(session_env, output_dir, flags + ASYNC)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "Removed .tmp-checkpoint-30" in final.stdout and "Resumed from checkpoint (step 20," in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_a_background_failure_ends_the_run_like_a_synchronous_one(tmp_path, session_env, corpus):
    flags = tiny_flags(corpus, **FLAGS)
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, flags + ASYNC)
    run.wait_for("Saved checkpoint-20")
    run.signal_group()
    run.finish()
    before = {p.name: file_digest(p / "optimizer.bin") for p in state.list_checkpoints(output_dir)}
    failing = next_save(output_dir, FLAGS["save_steps"], FLAGS["max_steps"])
    largest = max(f.stat().st_size for f in state.list_checkpoints(output_dir)[-1].iterdir())

    def small_file_limit():  # the optimizer state no longer fits in a file: EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, largest // 2))

    command = [PYTHON, str(HARNESS), "--output_dir", str(output_dir), *flags, *ASYNC]
    result = subprocess.run(command, env=session_env, capture_output=True, text=True, preexec_fn=small_file_limit, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: saving checkpoint-{failing} failed (")
    assert "earlier checkpoints are untouched" in result.stderr and "Traceback" not in result.stderr
    assert not list(output_dir.glob(".tmp-checkpoint-*"))
    assert {p.name: file_digest(p / "optimizer.bin") for p in state.list_checkpoints(output_dir)} == before


def test_too_little_host_memory_falls_back_to_synchronous_saves_and_says_so(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **FLAGS)
    reference = reference_runs(flags)
    result = train(session_env, tmp_path / "run", flags + ASYNC, harness_env={"HARNESS_HOST_MEMORY": "100000"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"--async_save: a copy of the state needs \d+\.\d [KM]B of host memory, 100\.0 KB is available; saving synchronously", result.stdout)
    assert "loop blocked" not in result.stdout and re.search(r"Saved checkpoint-10 \(every --save_steps, \d+\.\d\ds\)", result.stdout)
    assert file_digest(tmp_path / "run" / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_the_deadline_keeps_room_for_the_save_in_flight_and_the_stop_save():
    deadline = Deadline(max_time_seconds=100, started_at=0, estimated_save_seconds=10)
    assert not deadline.reached(now=100 - 1.5 * 10 - 2.0 - 0.1)
    deadline.save_in_flight = True
    assert deadline.reached(now=100 - 1.5 * 10 - 2.0 - 0.1)
    assert not deadline.reached(now=100 - 2 * 1.5 * 10 - 2.0 - 0.1)


@pytest.mark.slow
def test_two_ranks_write_in_the_background_each_file_of_each_rank_before_the_rename(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": 14, "save_steps": 7})
    reference = reference_runs(flags, launcher=TWO_RANKS)
    result = train(session_env, tmp_path / "run", flags + ASYNC, launcher=TWO_RANKS, harness_env={"HARNESS_SLOW_WRITE": "0.3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("💾 Saved checkpoint-7 (every --save_steps, loop blocked") == 1
    for name in ("checkpoint-7", "checkpoint-14"):
        checkpoint = tmp_path / "run" / name
        state.verify_checkpoint(checkpoint)
        for file in (*SNAPSHOT_FILES, "random_states_1.pkl"):
            assert file_digest(checkpoint / file) == file_digest(reference / name / file), f"{name}/{file}"


def test_host_buffers_copy_every_tensor_once_keep_tied_ones_tied_and_are_reused():
    from collections import OrderedDict

    import torch

    from resumable.background_save import HostBuffers

    weight = torch.randn(4, 3)
    exp_avg = torch.randn(4, 3)  # the same size as the weight: must not share its buffer
    live = {
        "model": OrderedDict(wte=weight, lm_head=weight, bias=torch.randn(3)),
        "optimizer": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": exp_avg}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    }
    buffers = HostBuffers()
    first = buffers.copy(live)
    assert type(first["model"]) is OrderedDict
    assert first["model"]["wte"].untyped_storage().data_ptr() == first["model"]["lm_head"].untyped_storage().data_ptr()
    before = weight.clone()
    weight.add_(1)  # training goes on: the snapshot does not change
    assert torch.equal(first["model"]["wte"], before) and torch.equal(first["optimizer"]["state"][0]["exp_avg"], exp_avg)

    allocated = [buffer.data_ptr() for buffer in buffers.buffers]
    second = buffers.copy(live)  # the next save, once the first was written: same buffers, new values
    assert [buffer.data_ptr() for buffer in buffers.buffers] == allocated
    assert torch.equal(second["model"]["wte"], weight) and torch.equal(second["model"]["bias"], live["model"]["bias"])
    assert torch.equal(second["optimizer"]["state"][0]["exp_avg"], exp_avg)
    assert second["optimizer"]["param_groups"] == live["optimizer"]["param_groups"]


@pytest.mark.slow
def test_a_background_failure_on_one_rank_ends_every_rank_with_one_line(tmp_path, session_env, corpus):
    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": 21, "save_steps": 7}) + ASYNC
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, flags, launcher=TWO_RANKS)
    run.wait_for("Saved checkpoint-7")
    run.signal_group()
    run.finish()
    kept = [p.name for p in state.list_checkpoints(output_dir)]
    before = {name: file_digest(output_dir / name / "optimizer.bin") for name in kept}
    failing = next_save(output_dir, save_steps=7, max_steps=21)
    largest = (state.list_checkpoints(output_dir)[-1] / "optimizer.bin").stat().st_size

    def small_file_limit():  # inherited by both ranks: the main process's optimizer.bin fails, rank 1's RNG file does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest // 2, largest // 2))

    command = [*TWO_RANKS, "--output_dir", str(output_dir), *flags]
    result = subprocess.run(command, env=session_env, capture_output=True, text=True, preexec_fn=small_file_limit, timeout=600)
    assert result.returncode != 0
    assert result.stderr.count(f"error: saving checkpoint-{failing} failed (") == 1, result.stderr[-3000:]
    assert 'File "' + str(HARNESS.parent.parent / "train_loop.py") not in result.stderr
    assert not list(output_dir.glob(".tmp-checkpoint-*"))
    assert [p.name for p in state.list_checkpoints(output_dir)] == kept
    assert {name: file_digest(output_dir / name / "optimizer.bin") for name in kept} == before
