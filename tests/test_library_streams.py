"""run.batches(stream): a per-rank stream with state_dict, killed, signalled and misused, as the real program (examples/digits_classifier.py --stream)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
from conftest import PYTHON, REPO, Training, file_digest, kill_a_moment_after, train
from resumable import state
from test_library import example_launcher, run_to_the_end_equal_to, stop_with_sigterm

# 1500 images, 32 a batch: 46 batches an epoch on 1 process, 23 on each of 2, so 120 steps cross 2 (5) epoch ends.
STREAM_FLAGS = ["--stream", "--max_steps", "120", "--save_steps", "20"]


@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
def test_stream_killed_and_stopped_ends_byte_identical_with_each_ranks_position(tmp_path, session_env, reference_runs, processes):
    launcher = example_launcher("digits_classifier", processes)
    reference = reference_runs(STREAM_FLAGS, launcher=launcher)
    output_dir = tmp_path / "run"
    if processes == 1:
        # One process saves in the background and is killed on the writer thread inside the save of checkpoint-60, every
        # file written, the manifest (the commit) not yet, while its loop reads on: the position saved must be step 60's.
        flags = STREAM_FLAGS + ["--async_save"]
        killed = train(session_env, output_dir, flags, launcher=launcher, harness_env={"EXAMPLE_KILL_IN_SAVE": "60"})
        assert killed.returncode == -9 and (output_dir / ".tmp-checkpoint-60" / "stream_state_0.pt").is_file(), killed.stdout + killed.stderr
        assert not (output_dir / "checkpoint-60").exists()
    else:
        # Two ranks, killed with kill -9 a moment after a save, wherever their loops and streams then are.
        flags = STREAM_FLAGS
        assert kill_a_moment_after(Training(session_env, output_dir, flags, launcher=launcher), r"💾 Saved checkpoint-40 ") == -9
    newest = state.list_checkpoints(output_dir)[-1]  # the one the next start resumes from
    state.verify_checkpoint(newest)
    listed = json.loads((newest / "manifest.json").read_text())["files"]
    assert all(f"stream_state_{rank}.pt" in listed for rank in range(processes)), listed  # each rank's position is committed with the rest

    # SIGTERM: a checkpoint at the step it stops at, exit 75 (accelerate launch's agent may say 1; launch.sh's supervisor makes it 75)
    run = Training(session_env, output_dir, flags, launcher=launcher)
    run.wait_for(rf"🔄 Found checkpoint: {newest.name}")
    run.wait_for(r"💾 Saved checkpoint-\d+ ")  # the first save after the resume
    stopped_at = stop_with_sigterm(run, processes, output_dir)

    run_to_the_end_equal_to(reference, session_env, output_dir, flags, launcher, stopped_at)  # losses at the same steps and epochs
    for rank in range(processes):  # each rank's epoch and position at step 120, as the uninterrupted run saved them
        name = f"stream_state_{rank}.pt"
        assert file_digest(output_dir / "checkpoint-120" / name) == file_digest(reference / "checkpoint-120" / name), name


# ---------------------------------------------------------------------------- misuse: one line naming the call and the fix, exit 2

STREAM_LOOP = """
import sys, torch
sys.path.insert(0, {repo!r})
import resumable
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

class Numbers(torch.utils.data.IterableDataset):
    # 16 micro-batches of one example, and its position; no set_epoch, so once read to the end it yields nothing more
    def __init__(self): self.position = 0
    def __iter__(self):
        while self.position < 16:
            self.position += 1
            yield (torch.full((4,), float(self.position)),)
    def state_dict(self): return {{"position": self.position}}
    def load_state_dict(self, state): self.position = state["position"]

class Stateless(torch.utils.data.IterableDataset):
    def __iter__(self): return iter([(torch.randn(4),)] * 16)

set_seed(0)
accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4)
model, optimizer, prepared = accelerator.prepare(model, optimizer, loader)
run = resumable.Run(accelerator, sys.argv[1], save_steps=2, {length})
run.start()
for (x,) in run.batches({batches}):
    loss = model(x).pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    run.step(loss=loss)
sys.exit(run.finish(model))
"""
STREAM = "Numbers()"  # a stream that yields its micro-batches itself (examples/digits_classifier.py --stream batches through a DataLoader)
STREAM_REFUSALS = {  # (Run(num_epochs=...) and DataLoader(num_workers>0) are refused by the same path, in lines of their own)
    "stateless stream": (dict(batches="torch.utils.data.DataLoader(Stateless(), batch_size=4)"), "error: run.batches(stream): a stream (Stateless) cannot be resumed at its exact sample without state_dict()/load_state_dict(): give it both"),
    "prepared stream": (dict(batches="accelerator.prepare(torch.utils.data.DataLoader(Numbers(), batch_size=4))"), "error: run.batches(dataloader): accelerator.prepare(...) made this stream's loader read one batch ahead of the training"),
}


def run_stream_loop(tmp_path, output_dir, batches=STREAM, length="max_steps=4"):
    script = tmp_path / "stream_loop.py"
    script.write_text(textwrap.dedent(STREAM_LOOP.format(repo=str(REPO), batches=batches, length=length)))
    return subprocess.run([PYTHON, str(script), str(output_dir)], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_streams_that_cannot_resume_exactly_are_refused_in_one_line_with_exit_2(tmp_path):
    def assert_refused(result, expected):
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr

    for case, (changes, expected) in STREAM_REFUSALS.items():
        assert_refused(run_stream_loop(tmp_path, tmp_path / case, **changes), expected)

    # 16 micro-batches of one example: after 16 steps (checkpoint-16) the stream, which has no set_epoch, yields nothing more
    output_dir = tmp_path / "kinds"
    assert_refused(run_stream_loop(tmp_path, output_dir, length="max_steps=20"), "error: run.batches(stream): epoch 1 of the stream yielded no batch, so the run would never end")
    assert (output_dir / "checkpoint-16" / "stream_state_0.pt").is_file()

    # a checkpoint holds a stream's position or a loader's epoch and step: resuming it with the other kind is refused
    assert_refused(run_stream_loop(tmp_path, output_dir, batches="prepared", length="max_steps=20"),
                   "error: run.batches(dataloader): checkpoint-16 was written by a run that iterated a stream (it holds its position, stream_state_0.pt)")  # fmt: skip
