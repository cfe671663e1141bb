"""The library in a user's own loop (examples/digits_classifier.py): killed, signalled, damaged and misused, as the real program."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import PYTHON, REPO, Training, file_digest, kill_a_moment_after, train
from resumable import state
from test_multiprocess import ACCELERATE_LAUNCH

EXAMPLE_HARNESS = str(REPO / "tests" / "example_harness.py")
DIGITS = str(REPO / "examples" / "digits_classifier.py")
ONE_PROCESS = [PYTHON, EXAMPLE_HARNESS, DIGITS]
# 1500 images / 32 per batch = 46 steps per epoch on one process: 600 steps cross many epoch boundaries.
# The validation accuracy every 100 steps: its entries in log_history, and the best checkpoint kept by rotation.
FLAGS = ["--max_steps", "600", "--save_steps", "20", "--eval_steps", "100"]


def log_history(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


# Each example, with the steps after which it is killed, killed inside a save, and stopped by SIGTERM (multiples of its save_steps).
EXAMPLES = {
    "digits_classifier": (FLAGS, 100, 240, 280),  # 46 steps an epoch on 1 process, 23 on 2
    "two_models": (["--max_steps", "400", "--save_steps", "20"], 60, 160, 200),  # two models, two optimizers, a registered EMA
    "causal_lm_loop": (["--max_steps", "200", "--save_steps", "10"], 30, 80, 100),  # gradient accumulation 2: 69 steps an epoch on 1 process
}


def example_launcher(name: str, processes: int) -> list[str]:
    script = str(REPO / "examples" / f"{name}.py")
    if processes == 1:
        return [PYTHON, EXAMPLE_HARNESS, script]
    return [*ACCELERATE_LAUNCH, "--config_file", str(REPO / "accelerate_config.yaml"), "--multi_gpu", "--num_processes", str(processes), EXAMPLE_HARNESS, script]


@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_example_killed_inside_and_between_saves_and_stopped_ends_byte_identical(tmp_path, session_env, reference_runs, example, processes):
    flags, killed_after, killed_inside, stopped_after = EXAMPLES[example]
    save_steps = int(flags[3])
    launcher = example_launcher(example, processes)
    reference = reference_runs(flags, launcher=launcher)
    output_dir = tmp_path / "run"

    # kill -9 a moment after a save, wherever the loop then is
    assert kill_a_moment_after(Training(session_env, output_dir, flags, launcher=launcher), rf"💾 Saved checkpoint-{killed_after} ") == -9

    # kill -9 inside a save: every file written, the manifest (the commit) not yet
    killed = train(session_env, output_dir, flags, launcher=launcher, harness_env={"EXAMPLE_KILL_IN_SAVE": str(killed_inside)})
    assert killed.returncode != 0 and (output_dir / f".tmp-checkpoint-{killed_inside}").is_dir(), killed.stdout + killed.stderr
    assert not (output_dir / f"checkpoint-{killed_inside}").exists()
    assert (output_dir / f"checkpoint-{killed_inside - save_steps}" / "manifest.json").is_file()

    # SIGTERM to the process we started, as `kill` does: a checkpoint at the step it stops at, exit 75.
    # (accelerate launch's own agent exits 1 on SIGTERM after its ranks exit 75: launch.sh's supervisor is what turns that into 75.)
    run = Training(session_env, output_dir, flags, launcher=launcher)
    run.wait_for(rf"🔄 Found checkpoint: checkpoint-{killed_inside - save_steps}")
    run.wait_for(rf"💾 Saved checkpoint-{stopped_after} ")
    stopped_at = stop_with_sigterm(run, processes, output_dir)
    assert f"🧹 Removed .tmp-checkpoint-{killed_inside}, left by a save that was interrupted" in run.text

    run_to_the_end_equal_to(reference, session_env, output_dir, flags, launcher, stopped_at)  # losses and accuracies logged too
    best = best_checkpoint(reference)
    assert best_checkpoint(output_dir) == best and (best is None or (output_dir / best / "manifest.json").is_file())  # rotation kept it
    assert (best is not None) == (example == "digits_classifier")


def stop_with_sigterm(run: Training, processes: int, output_dir) -> int:
    """SIGTERM to the process the test started, as `kill` does: a checkpoint at the step it stops at, exit 75. The step.

    (accelerate launch's own agent exits 1 on SIGTERM after its ranks exit 75: launch.sh's supervisor makes that 75.)
    """
    run.process.send_signal(signal.SIGTERM)
    code = run.finish()
    assert code == 75 if processes == 1 else code in (75, 1), run.text
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert (output_dir / f"checkpoint-{stopped_at}" / "manifest.json").is_file()
    return stopped_at


def run_to_the_end_equal_to(reference, session_env, output_dir, flags, launcher, stopped_at: int):
    """The same command again: it resumes at the stop's step and ends with the reference's weights and log_history."""
    final = train(session_env, output_dir, flags, launcher=launcher)
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"✅ Resumed from checkpoint (step {stopped_at}, epoch " in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert log_history(output_dir) == log_history(reference)  # the same values logged at the same steps, none twice


def best_checkpoint(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text()).get("best_model_checkpoint")


def test_async_save_killed_inside_a_background_write_then_stopped_ends_byte_identical_to_synchronous_saves(tmp_path, session_env, reference_runs):
    reference = reference_runs(FLAGS, launcher=ONE_PROCESS)  # synchronous saves: the switch must not change a byte
    output_dir = tmp_path / "run"
    with_async = FLAGS + ["--async_save"]

    # kill -9 on the writer thread of checkpoint-240, every file written, its manifest (the commit) not yet; the loop trains on meanwhile
    killed = train(session_env, output_dir, with_async, launcher=ONE_PROCESS, harness_env={"EXAMPLE_KILL_IN_SAVE": "240"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "💾 Saved checkpoint-220 (every save_steps, loop blocked " in killed.stdout  # saved in the background, reported once committed
    assert (output_dir / ".tmp-checkpoint-240").is_dir() and not (output_dir / "checkpoint-240").exists()
    state.verify_checkpoint(output_dir / "checkpoint-220")

    run = Training(session_env, output_dir, with_async, launcher=ONE_PROCESS)
    run.wait_for(r"💾 Saved checkpoint-280 ")
    run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 75, run.text
    assert "🧹 Removed .tmp-checkpoint-240, left by a save that was interrupted" in run.text and "✅ Resumed from checkpoint (step 220, epoch " in run.text
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert f"💾 Saved checkpoint-{stopped_at} (SIGTERM, loop blocked " in run.text or stopped_at % 20 == 0, run.text
    assert not list(output_dir.glob(".tmp-checkpoint-*"))  # the save in flight and the stop's own were committed before exit 75
    for checkpoint in state.list_checkpoints(output_dir):
        state.verify_checkpoint(checkpoint)

    final = train(session_env, output_dir, with_async, launcher=ONE_PROCESS)
    assert final.returncode == 0, final.stdout + final.stderr
    assert f"✅ Resumed from checkpoint (step {stopped_at}, epoch " in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):  # written by the thread, from the snapshot
        assert file_digest(output_dir / "checkpoint-600" / name) == file_digest(reference / "checkpoint-600" / name), name
    assert log_history(output_dir) == log_history(reference)


def weight_difference(output_dir, reference) -> float:
    """The largest difference between two final models' weights, relative to the reference's largest weight."""
    from safetensors.torch import load_file

    mine, theirs = load_file(output_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert mine.keys() == theirs.keys()
    return max((mine[k] - theirs[k]).abs().max().item() for k in mine) / max(theirs[k].abs().max().item() for k in theirs)


def test_a_run_killed_on_2_processes_resumes_on_1_with_the_same_global_batch(tmp_path, session_env, reference_runs):
    # 2 processes x accumulation 1 before the kill, 1 process x accumulation 2 after it: the same two micro-batches
    # per optimizer step, each with the random draws (dropout) of its samples.
    two_processes = example_launcher("digits_classifier", 2)
    reference = reference_runs(FLAGS, launcher=two_processes)  # shared with the 2-process kill sequence
    output_dir = tmp_path / "run"
    assert kill_a_moment_after(Training(session_env, output_dir, FLAGS, launcher=two_processes), r"💾 Saved checkpoint-100 ") == -9

    resumed = train(session_env, output_dir, FLAGS, launcher=ONE_PROCESS)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "🔀 world size 2 → 1: gradient accumulation 1 → 2, 2 micro-batches per optimizer step unchanged" in resumed.stdout
    resumed_from = int(resumed.stdout.split("✅ Resumed from checkpoint (step ")[1].split(",")[0])
    assert 100 <= resumed_from < 600, resumed.stdout
    assert [entry["step"] for entry in log_history(output_dir)] == [entry["step"] for entry in log_history(reference)]
    # The same samples and masks in every step; only the order of the gradient sum differs (an all-reduce against
    # accumulation, and 2 threads against 1 each): equal to rounding, measured 3e-8 of the largest weight.
    assert weight_difference(output_dir, reference) < 1e-5


def test_async_save_copies_registered_objects_at_their_step(tmp_path, session_env, reference_runs):
    # two_models registers an EMA that changes at every step: a copy taken later than the step would differ.
    flags = EXAMPLES["two_models"][0]
    launcher = example_launcher("two_models", 1)
    reference = reference_runs(flags, launcher=launcher)  # synchronous saves, shared with the kill sequence
    output_dir = tmp_path / "run"
    result = train(session_env, output_dir, flags + ["--async_save"], launcher=launcher)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "💾 Saved checkpoint-20 (every save_steps, loop blocked " in result.stdout and "saving synchronously" not in result.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    for checkpoint in ("checkpoint-360", "checkpoint-380", "checkpoint-400"):  # the ones rotation keeps
        names = sorted(path.name for path in (reference / checkpoint).iterdir() if path.suffix in (".pkl", ".bin", ".safetensors"))
        assert "custom_checkpoint_0.pkl" in names
        for name in names:
            assert file_digest(output_dir / checkpoint / name) == file_digest(reference / checkpoint / name), (checkpoint, name)


# A loop on resumable.Run, and a transformers.Trainer script with resumable.trainer's two lines (tests/test_trainer.py)
STOPPABLE = ["digits_classifier", "hf_trainer"]


# Every signal for the Run loop; SIGINT for the Trainer script, whose SIGTERM and SIGUSR1 stops are in
# test_trainer.py's main sequence (1 and 2 processes): the suite stays under its 35 minutes.
SIGNALLED = [("digits_classifier", signal.SIGINT), ("digits_classifier", signal.SIGTERM), ("digits_classifier", signal.SIGUSR1), ("hf_trainer", signal.SIGINT)]


@pytest.mark.parametrize(("example", "number"), SIGNALLED, ids=[f"{example}-{number.name}" for example, number in SIGNALLED])
def test_a_signal_saves_the_current_step_exits_75_and_status_reads_the_run(tmp_path, session_env, number, example):
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, ["--max_steps", "100000", "--save_steps", "50"], launcher=example_launcher(example, 1))
    run.wait_for(r"💾 Saved checkpoint-100 ")
    run.process.send_signal(number)
    assert run.finish() == 75, run.text
    stopped_at = int(run.text.split("🛑 Stopping at step ")[1].split(":")[0])
    assert f"🛑 Stopping at step {stopped_at}: {number.name}" in run.text
    assert f"💾 Saved checkpoint-{stopped_at} ({number.name}" in run.text or stopped_at % 50 == 0
    assert (output_dir / f"checkpoint-{stopped_at}" / "manifest.json").is_file()
    assert "▶️  To continue, run the same command again." in run.text
    assert "Held-out" not in run.text and "validation accuracy" not in run.text.lower()  # the script's code after training runs only when it is complete

    status = subprocess.run([PYTHON, "status.py", "--output_dir", str(output_dir)], cwd=REPO, env=session_env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stdout + status.stderr
    assert f"step {stopped_at} / 100000" in status.stdout and f"(last stop: {number.name})" in status.stdout, status.stdout


@pytest.mark.parametrize("example", STOPPABLE)
def test_a_deadline_stops_with_a_checkpoint_before_it(tmp_path, session_env, example):
    end = int(time.time()) + 30
    flags = ["--max_steps", "1000000", "--save_steps", "100000"]
    result = train({**session_env, "SLURM_JOB_END_TIME": str(end)}, tmp_path / "run", flags, launcher=example_launcher(example, 1))
    ended = time.time()
    assert result.returncode == 75, result.stdout + result.stderr
    stopped_at = int(result.stdout.split("🛑 Stopping at step ")[1].split(":")[0])
    assert "⏰ Will stop with a checkpoint before" in result.stdout and ": deadline" in result.stdout
    committed_at = (tmp_path / "run" / f"checkpoint-{stopped_at}" / "manifest.json").stat().st_mtime
    assert committed_at < end, f"the stop's checkpoint was committed {committed_at - end:.1f} s after the deadline"
    assert ended < end + 5, f"exited {ended - end:.1f} s after the deadline"  # a scheduler's SIGKILL comes later still (SLURM's KillWait, 30 s)


def test_a_flipped_byte_in_the_newest_checkpoint_is_passed_over_in_one_line(tmp_path, session_env, reference_runs):
    reference = reference_runs(FLAGS, launcher=ONE_PROCESS)
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, FLAGS, launcher=ONE_PROCESS)
    run.wait_for(r"💾 Saved checkpoint-300 ")
    run.signal_group()
    run.finish()
    newest = max((path for path in output_dir.glob("checkpoint-*") if (path / "manifest.json").is_file()), key=lambda p: int(p.name.split("-")[1]))
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    final = train(session_env, output_dir, FLAGS, launcher=ONE_PROCESS)
    assert final.returncode == 0, final.stdout + final.stderr
    warnings = [line for line in final.stdout.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and f"{newest.name} is damaged (model.safetensors: checksum mismatch); moved aside to {newest.name}.corrupt" in warnings[0], final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")



def test_backup_to_restores_the_run_on_an_empty_output_dir_and_ends_byte_identical(tmp_path, session_env, reference_runs):
    reference = reference_runs(FLAGS, launcher=ONE_PROCESS)
    output_dir, destination = tmp_path / "run", tmp_path / "backup"
    with_backup = FLAGS + ["--backup_to", str(destination)]
    run = Training(session_env, output_dir, with_backup, launcher=ONE_PROCESS)
    run.wait_for(r"💾 Saved checkpoint-300 ")
    run.signal_group()
    run.finish()
    shutil.rmtree(output_dir)  # a lost machine: only the backup is left
    final = train(session_env, output_dir, with_backup, launcher=ONE_PROCESS)
    assert final.returncode == 0, final.stdout + final.stderr
    restored = int(final.stdout.split("☁️  restored checkpoint-")[1].split(" ")[0])
    assert restored > 0 and f"✅ Resumed from checkpoint (step {restored}, epoch " in final.stdout, final.stdout
    assert "☁️  final model and checkpoint-600 are in" in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert file_digest(destination / "final-model" / "model.safetensors") == file_digest(reference / "model.safetensors")

def test_status_reads_a_library_run(tmp_path, session_env, reference_runs):
    reference = reference_runs(FLAGS, launcher=ONE_PROCESS)
    result = subprocess.run([PYTHON, "status.py", "--output_dir", str(reference)], cwd=REPO, env=session_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "600" in result.stdout and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- misuse: one line naming the call and the fix, exit 2

LOOP = """
import sys, torch
sys.path.insert(0, {repo!r})
import resumable
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

class Counter:
    def __init__(self): self.count = 0
    def state_dict(self): return {{"count": self.count}}
    def load_state_dict(self, state): self.count = state["count"]

set_seed(0)
accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler={seedable}, data_seed=0))
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
model, optimizer, prepared = accelerator.prepare(model, optimizer, loader)
run = resumable.Run(accelerator, sys.argv[1], max_steps=6, save_steps=2, settings={{"lr": {lr}}}{run_arguments})
{before_start}
run.start()
{after_start}
for x, y in run.batches({loader}):
    loss = torch.nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    {per_step}
{after_loop}
sys.exit(run.finish(model))
"""
PLAIN = dict(seedable=True, lr=0.1, run_arguments="", before_start="", after_start="", loader="prepared", per_step="run.step(loss=loss)", after_loop="")


def run_loop(tmp_path, output_dir, **changes):
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(LOOP.format(repo=str(REPO), **{**PLAIN, **changes})))
    return subprocess.run([PYTHON, str(script), str(output_dir)], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


MISUSE = {
    "register after start": (dict(after_start="run.register(counter=Counter())"), "error: run.register(counter) after run.start(): register every object before run.start()"),
    "step twice": (dict(per_step="run.step(); run.step()"), "error: run.step() called twice in one step: call it once per optimizer step"),
    "step skipped": (dict(per_step="pass"), "error: run.step() was not called after step 1's 1 micro-batch(es): call it once after each optimizer step"),
    "batches twice": (dict(after_loop="run.batches(prepared)"), "error: run.batches(...) started a second time: iterate it once"),
    "not prepared": (dict(loader="loader"), "error: run.batches(dataloader): pass the DataLoader through accelerator.prepare(...) first"),
    "unseeded shuffle": (dict(seedable=False), "error: run.batches(dataloader): its shuffle is not seeded per epoch, so a resumed run would see another order; build the Accelerator with dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True"),
    "no object": (dict(before_start="run.register(counter=[])"), "error: run.register(counter=...): a list has no state_dict()/load_state_dict()"),
    "a batch of losses": (
        dict(per_step="run.step(loss=torch.nn.functional.mse_loss(model(x), y, reduction='none'))"),
        "error: run.step(loss=...) was given a tensor of 8 numbers: pass one number per step (loss=loss, not a batch of losses)",
    ),
    "best metric not measured": (
        dict(run_arguments=', evaluate=lambda: {"acc": 1.0}, best_metric="accuracy"'),
        "error: Run(best_metric='accuracy'): evaluate() returned ['acc']; name one of them, or return 'accuracy' too",
    ),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_misuse_gets_one_line_naming_the_call_and_exit_2(tmp_path, case):
    changes, expected = MISUSE[case]
    result = run_loop(tmp_path, tmp_path / "out", **changes)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr


def test_a_checkpoint_of_other_objects_or_settings_is_refused_with_what_differs(tmp_path):
    output_dir = tmp_path / "out"
    first = run_loop(tmp_path, output_dir, before_start="run.register(counter=Counter())", per_step="run.step(); sys.exit(75) if run.global_step == 4 else None")
    assert first.returncode == 75 and (output_dir / "checkpoint-4" / "manifest.json").is_file(), first.stdout + first.stderr

    other_objects = run_loop(tmp_path, output_dir)
    assert other_objects.returncode == 2 and "Traceback" not in other_objects.stderr, other_objects.stderr
    assert other_objects.stderr.strip().splitlines()[-1] == (
        "error: checkpoint-4 holds 1 model(s), 1 optimizer(s), 0 scheduler(s), 1 dataloader(s) and registered ['counter'], this run has "
        "1 model(s), 1 optimizer(s), 0 scheduler(s), 1 dataloader(s) and nothing registered: prepare and register the same objects, in the "
        "same order, as the run that wrote it (or choose another output_dir to start fresh)"
    )

    other_settings = run_loop(tmp_path, output_dir, before_start="run.register(counter=Counter())", lr=0.5)
    assert other_settings.returncode == 2 and "Traceback" not in other_settings.stderr, other_settings.stderr
    assert "error: these settings differ from the checkpoint and would change the result:" in other_settings.stderr
    assert "lr | 0.1 | 0.5" in [" ".join(line.split()) for line in other_settings.stderr.splitlines()], other_settings.stderr

    same = run_loop(tmp_path, output_dir, before_start="run.register(counter=Counter())")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "✅ Resumed from checkpoint (step 4, epoch " in same.stdout and "🏁 Training complete: 6 steps" in same.stdout

    # finished, then its checkpoints deleted (./launch.sh clean): a rerun trains nothing and keeps the final model
    final_model = file_digest(output_dir / "model.safetensors")
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    again = run_loop(tmp_path, output_dir, before_start="run.register(counter=Counter())")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"✅ Training in {output_dir} is already complete (6 steps) and its checkpoints are gone" in again.stdout
    assert "🆕" not in again.stdout and file_digest(output_dir / "model.safetensors") == final_model


def test_resume_from_a_given_checkpoint_or_from_none_moves_the_others_aside(tmp_path):
    output_dir = tmp_path / "out"
    assert run_loop(tmp_path, output_dir).returncode == 0  # 6 steps: checkpoints 2, 4 and 6
    uninterrupted = file_digest(output_dir / "model.safetensors")

    older = run_loop(tmp_path, output_dir, run_arguments=f", resume_from={str(output_dir / 'checkpoint-2')!r}")
    assert older.returncode == 0, older.stdout + older.stderr
    assert "📦 Resuming from an older checkpoint: moved checkpoint-4, checkpoint-6 to superseded-" in older.stdout
    assert "✅ Resumed from checkpoint (step 2, epoch " in older.stdout and file_digest(output_dir / "model.safetensors") == uninterrupted

    fresh = run_loop(tmp_path, output_dir, run_arguments=', resume_from="none"')
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "📦 resume_from none: moved 3 earlier checkpoint(s) to previous-run-" in fresh.stdout and "🆕 Starting new training" in fresh.stdout
    assert file_digest(output_dir / "model.safetensors") == uninterrupted
    assert len(list(output_dir.glob("superseded-*/checkpoint-6"))) == 1 and len(list(output_dir.glob("previous-run-*/checkpoint-2"))) == 1  # moved, never deleted


def test_a_number_of_processes_that_cannot_keep_the_global_batch_is_refused_in_one_line(tmp_path):
    output_dir = tmp_path / "out"
    first = run_loop(tmp_path, output_dir, per_step="run.step(); sys.exit(75) if run.global_step == 4 else None")
    assert first.returncode == 75, first.stdout + first.stderr
    two = [*ACCELERATE_LAUNCH, "--config_file", str(REPO / "accelerate_config.yaml"), "--multi_gpu", "--num_processes", "2", str(tmp_path / "loop.py"), str(output_dir)]
    refused = subprocess.run(two, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode != 0
    expected = ("error: checkpoint-4 was written by 1 process(es) x gradient accumulation 1: 1 micro-batch(es) per optimizer step, "
                "which 2 processes cannot share equally; resume with 1 process(es) (or choose another output_dir to start fresh)")  # fmt: skip
    assert refused.stderr.splitlines().count(expected) == 1, refused.stderr  # once, from the machine's first process
    assert 'File "' + str(REPO / "resumable") not in refused.stderr  # our line, no traceback of ours
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # nothing lost


def test_import_resumable_loads_none_of_the_cli_libraries_and_costs_little():
    probe = "import sys, time; t = time.perf_counter(); import resumable; print(time.perf_counter() - t); print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft', 'accelerate', 'obstore') if m in sys.modules))"
    result = subprocess.run([PYTHON, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    seconds, loaded = result.stdout.splitlines()
    assert loaded == "[]", loaded
    assert float(seconds) < 0.1, seconds


def test_pip_install_of_the_checkout_into_a_fresh_venv_runs_the_example_outside_the_checkout(tmp_path):
    """A user's own environment: no launch.sh, no .venv, no transformers; torch is there already, as it would be."""
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")

    def pip(*arguments):
        result = subprocess.run([python, "-m", "pip", "install", "--quiet", *arguments], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip("torch==2.13.0")  # the CPU build (requirements.txt's pin); a plain `torch` would pull CUDA's
    pip(str(REPO), "scikit-learn==1.9.1")
    away = tmp_path / "elsewhere"
    away.mkdir()
    environment = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environment["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([python, str(REPO / "examples" / "digits_classifier.py"), "--output_dir", "D", "--max_steps", "60", "--save_steps", "30"],
                            cwd=away, env=environment, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert (away / "D" / "model.safetensors").is_file() and "🏁 Training complete: 60 steps" in result.stdout
    status = subprocess.run([python, "-m", "resumable.status", "--output_dir", "D"], cwd=away, env=environment, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "D: complete" in status.stdout and "step 60 / 60" in status.stdout, status.stdout + status.stderr
    assert "checkpoint-60" in status.stdout and "✅" in status.stdout  # verified against its manifest, without the CLI

    probe = "import sys, resumable; print(resumable.__file__); print(sorted(m for m in ('transformers', 'datasets', 'peft', 'torch') if m in sys.modules))"
    imported = subprocess.run([python, "-c", probe], cwd=away, env=environment, capture_output=True, text=True, timeout=120)
    where, loaded = imported.stdout.splitlines()
    assert where.startswith(str(venv)) and loaded == "[]", imported.stdout + imported.stderr
    installed = subprocess.run([python, "-m", "pip", "list", "--format", "freeze"], capture_output=True, text=True, timeout=120).stdout.lower()
    assert not any(f"{name}==" in installed for name in ("transformers", "datasets", "peft")), installed
