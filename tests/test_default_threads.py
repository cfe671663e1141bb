"""The exactness guarantees at the thread count users get: ./launch.sh with OMP_NUM_THREADS unset.

The rest of the suite trains at one thread per process (conftest's session_env). Here launch.sh
gives each process its share of the cores, as it does for a user (2 threads for one process on
2 cores). Each case: an uninterrupted run, and a run killed with SIGKILL at step 20 and resumed;
the final weights must be the same bytes. What differs between thread counts: README, "Exactness
and thread counts"."""

import os
import re
import signal

import pytest

from conftest import REPO, file_digest, kill_when, tiny_flags, train
from test_multinode import start_machines

pytestmark = pytest.mark.slow
LAUNCH = [str(REPO / "launch.sh")]
FLAGS = dict(max_train_samples=200, max_steps=40, save_steps=7)
CASES = {  # environment, flags
    "1 process": ({}, {}),
    "2 processes": ({"NUM_PROCESSES": "2"}, {}),
    "bf16": ({}, {"bf16": True}),
    "torch_compile": ({}, {"torch_compile": True}),
    "streaming": ({}, {"streaming": True, "shuffle_buffer_size": 64, "gradient_accumulation_steps": 2, "max_train_samples": None}),
}


@pytest.fixture
def user_env(session_env):
    env = dict(session_env)
    env.pop("OMP_NUM_THREADS")  # as a user runs it: launch.sh decides
    return env


def threads_line(processes_on_this_machine: int) -> str:
    return f"{max(1, len(os.sched_getaffinity(0)) // processes_on_this_machine)} CPU thread(s) each"


def assert_resumed_mid_way(text: str) -> None:
    resumed_at = re.search(r"Resumed from checkpoint \(step (\d+),", text)
    assert resumed_at and 0 < int(resumed_at.group(1)) < 40, text[-2000:]  # the kill lands at step 20 or a little later


@pytest.mark.parametrize("case", CASES)
def test_killed_and_resumed_at_the_default_thread_count_ends_byte_identical(case, tmp_path, user_env, corpus):
    environment, extra = CASES[case]
    env = {**user_env, **environment}
    flags = tiny_flags(corpus, **{**FLAGS, **extra})
    reference = train(env, tmp_path / "reference", flags, launcher=LAUNCH)
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    assert threads_line(int(environment.get("NUM_PROCESSES", "1"))) in reference.stdout, reference.stdout[:2000]

    kill_when(env, tmp_path / "run", flags, r"step 20/40", launcher=LAUNCH)  # SIGKILL to launch.sh and every process below it
    resumed = train(env, tmp_path / "run", flags, launcher=LAUNCH)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert_resumed_mid_way(resumed.stdout)
    assert file_digest(tmp_path / "run" / "model.safetensors") == file_digest(tmp_path / "reference" / "model.safetensors")


def test_two_machines_killed_and_resumed_at_the_default_thread_count_end_byte_identical(tmp_path, user_env, corpus):
    flags = tiny_flags(corpus, **FLAGS)
    reference = start_machines(user_env, tmp_path / "reference", flags)
    assert [machine.finish(timeout=600) for machine in reference] == [0, 0], reference[0].text[-2000:] + reference[1].text[-2000:]
    assert threads_line(1) in reference[0].text  # one process on each machine: all of its cores

    machines = start_machines(user_env, tmp_path / "run", flags)
    machines[0].wait_for(r"step 20/40")
    for machine in machines:
        machine.signal_group(signal.SIGKILL)
    [machine.finish() for machine in machines]
    resumed = start_machines(user_env, tmp_path / "run", flags)
    assert [machine.finish(timeout=600) for machine in resumed] == [0, 0], resumed[0].text[-2000:] + resumed[1].text[-2000:]
    assert_resumed_mid_way(resumed[0].text)
    assert file_digest(tmp_path / "run" / "model.safetensors") == file_digest(tmp_path / "reference" / "model.safetensors")
