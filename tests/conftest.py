"""Shared helpers: run the real program in a subprocess, kill it, compare bytes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HARNESS = REPO / "tests" / "harness.py"
TINY_MODEL = REPO / "tests" / "tiny-gpt2.json"
# The existing guarantees hold with saves written in the background too; tests take this as a parameter.
SAVE_MODES = pytest.mark.parametrize("save_mode", [["--async_save", "false"], ["--async_save", "true"]], ids=["sync", "async"])


# The quick lane (./tests/run.sh --quick, ~3 min): each feature's main path once. A test may also
# carry @pytest.mark.quick itself; these are named here to mark one case of a parametrized test.
QUICK = [
    "test_resume.py::test_kill_9_at_arbitrary_moments_ends_byte_identical[sync]",
    "test_interruptions.py::test_signal_saves_at_the_next_step_exits_75_and_resume_is_exact[SIGTERM]",
    "test_safety.py::test_damaged_newest_checkpoint_falls_back_and_ends_byte_identical[model.safetensors-corrupt_flip_byte-model.safetensors: checksum mismatch-save_mode1]",
    "test_safety.py::test_bad_input_gets_one_line_and_exit_2_with_nothing_written[flags0---train_file /nonexistent/data.txt: no such file]",
    "test_multiprocess.py::test_two_ranks_killed_at_arbitrary_moments_end_byte_identical[sync]",
    "test_streaming.py::test_one_rank_killed_at_arbitrary_moments_ends_byte_identical",
    "test_lora.py::test_lora_killed_and_resumed_ends_byte_identical_and_checkpoints_hold_only_the_adapter",
    "test_async_save.py::test_snapshot_is_the_state_of_the_save_step_while_training_goes_on",
    "test_status.py::test_status_of_an_empty_a_running_an_interrupted_a_damaged_and_a_finished_run",
    "test_library.py::test_example_killed_inside_and_between_saves_and_stopped_ends_byte_identical[digits_classifier-1-process]",
    "test_trainer.py::test_trainer_killed_inside_and_between_saves_and_stopped_ends_byte_identical[1-process]",
]  # fmt: skip
# Tests that compare times they measure or pin processes to cores: ./tests/run.sh runs the others on
# every core at once (pytest-xdist), then these alone (marker `serial`). A file or file::test.
# The multi-machine signal tests and --max_time's are not among them: their limits come from what they
# measure, and they pass with two busy loops holding both cores (issue 26).
SERIAL = [
    "test_bench.py::test_restart_preprocessing_benchmark_runs_and_the_restart_reads_the_cache",
    "test_bench.py::test_side_by_side_benchmark_pairs_train_loop_with_each_other_loop",
    "test_bench.py::test_content_hash_benchmark_times_the_hash_and_a_cache_hit_costs_less",
    "test_bench.py::test_async_save_benchmark_compares_the_blocked_time_and_the_steps_per_second",
    "test_bench.py::test_launch_speed_benchmark_times_launch_sh_and_the_plain_loop_in_alternation",
    "test_bench.py::test_page_reuse_benchmark_times_a_write_after_each_pause",
]  # fmt: skip
# Tests that submit jobs to the SLURM cluster (marker `slurm`): one at a time, since they share its one
# node, and beside the parallel pass: their jobs train paced (project_training_the_harness and
# HARNESS_STEP_SECONDS), so they spend their minutes waiting for the time limit and the requeue, not
# taking the cores the parallel pass needs.
SLURM = ["test_slurm.py", "test_backup.py::test_slurm_job_on_scratch_requeued_with_an_empty_output_dir_continues_from_backup"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = {item.path.name, f"{item.path.name}::{item.originalname}", f"{item.path.name}::{item.name}"}
        if names & set(QUICK):
            item.add_marker(pytest.mark.quick)
        if names & set(SERIAL):
            item.add_marker(pytest.mark.serial)
        if names & set(SLURM):
            item.add_marker(pytest.mark.slurm)


def write_corpus(path: Path, lines: int = 3000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while training resumes at the exact sample".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(lines)) + "\n")
    return path


@pytest.fixture(scope="session")
def session_env(tmp_path_factory):
    """One datasets cache for the session (tokenization is cached across runs, as for users)."""
    env = dict(os.environ)
    env["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores; also keeps CPU math repeatable
    env.pop("SLURM_JOB_ID", None)
    return env


def shared_directory(tmp_path_factory) -> Path:
    """One directory for every pytest-xdist worker of this session (each worker's own basetemp is below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


class held_lock:
    """An exclusive lock on `path` for a `with` block, across the workers' processes."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.handle = open(self.path, "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        self.handle.close()  # releases the lock


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The same file for every worker, so that flags naming it, and so the reference runs, are shared."""
    path = shared_directory(tmp_path_factory) / "data" / "corpus.txt"
    path.parent.mkdir(exist_ok=True)
    with held_lock(path.parent / "corpus.lock"):
        if not path.exists():
            write_corpus(path.with_suffix(".partial"))
            path.with_suffix(".partial").rename(path)
    return path


def tiny_flags(corpus: Path, **overrides) -> list[str]:
    flags = {
        "config_name": TINY_MODEL, "train_file": corpus, "block_size": 32, "per_device_train_batch_size": 4,
        "max_steps": 120, "save_steps": 10, "logging_steps": 5, "learning_rate": 1e-3,
    }  # fmt: skip
    flags.update(overrides)
    out = []
    for name, value in flags.items():
        if value is True:
            out.append(f"--{name}")
        elif value is not None:
            out += [f"--{name}", str(value)]
    return out


def train(env, output_dir, flags, timeout=600, harness_env=None, launcher=None) -> subprocess.CompletedProcess:
    """Run the training to its end (or its own exit) in a subprocess."""
    command = (launcher or [PYTHON, str(HARNESS)]) + ["--output_dir", str(output_dir), *flags]
    return subprocess.run(command, env={**env, **(harness_env or {})}, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def measure_start_up(env, directory: Path, corpus: Path, flags: dict, cache_filled: bool = False) -> float:
    """Seconds from the start of a run of tiny_flags(corpus, **flags) to its end after 2 steps, on this machine now
    (seconds when it is quiet, tens of seconds when its cores are busy): the second of two such runs, the
    first having filled the tokenization cache; or the only one, if a run of the same data in `env`'s datasets
    cache has filled it already (cache_filled)."""
    for name in ("warm-up", "start-up")[1 if cache_filled else 0 :]:
        started = time.monotonic()
        probe = train(env, directory / f"probe-{name}", tiny_flags(corpus, **{**flags, "max_steps": 2, "save_steps": 10_000}))
        assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-2000:]
    return time.monotonic() - started


HARNESS_AS_TRAIN_LOOP = """# A test project's training (tests/conftest.py project_training_the_harness): tests/harness.py.
import runpy, sys
sys.argv[0] = {harness!r}
runpy.run_path({harness!r}, run_name="__main__")
"""


def project_training_the_harness(directory: Path) -> dict:
    """The environment for `directory/launch.sh`, a project whose training is tests/harness.py, so that a run
    started by launch.sh (or by a SLURM job: RESUMABLE_HOME) takes the harness's switches.

    The real launch.sh, supervisor, resumable package and accelerate config; the supervisor is copied,
    since it runs the train_loop.py beside its own resolved path."""
    directory.mkdir()
    for name in ("launch.sh", "accelerate_config.yaml", "requirements.txt", "resumable"):
        (directory / name).symlink_to(REPO / name)
    shutil.copy(REPO / "supervisor.py", directory)
    (directory / "train_loop.py").write_text(HARNESS_AS_TRAIN_LOOP.format(harness=str(HARNESS)))
    return {"RESUMABLE_HOME": str(directory), "RESUMABLE_VENV": str(Path(PYTHON).parent.parent)}


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [grandchild for child in map(int, children) for grandchild in (child, *descendants(child))]


def signal_all_at_once(pids, number) -> None:
    """As a scheduler does: the same signal to every process, in one go (a process already gone is fine)."""
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


class Training:
    """A training process we can watch and kill at a moment of our choosing."""

    def __init__(self, env, output_dir, flags, harness_env=None, launcher=None):
        command = (launcher or [PYTHON, str(HARNESS)]) + ["--output_dir", str(output_dir), *flags]
        self.process = subprocess.Popen(
            command, env={**env, **(harness_env or {})}, cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.output = []

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        for line in self.process.stdout:
            self.output.append(line)
            match = regex.search(line)
            if match:
                return match
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"never printed {pattern!r}; output:\n{''.join(self.output)[-3000:]}")

    def signal_group(self, number=signal.SIGKILL) -> None:
        """Signal the process and every descendant (torchrun puts workers in sessions of their own)."""
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            try:
                os.kill(pid, number)
            except ProcessLookupError:
                pass

    def finish(self, timeout: float = 300) -> int:
        rest, _ = self.process.communicate(timeout=timeout)
        self.output.append(rest or "")
        return self.process.returncode

    @property
    def text(self) -> str:
        return "".join(self.output)


def kill_a_moment_after(run: Training, pattern: str, within: float = 0.3) -> int:
    """SIGKILL the run (and its children) at a random moment within `within` s after it prints `pattern`; its exit code."""
    run.wait_for(pattern)
    time.sleep(random.uniform(0.0, within))
    run.signal_group()
    return run.finish()


def kill_when(env, output_dir, flags, pattern: str, launcher=None, harness_env=None) -> str:
    """Start a training, SIGKILL it (and its children) as soon as it prints `pattern`; its output."""
    run = Training(env, output_dir, flags, launcher=launcher, harness_env=harness_env)
    run.wait_for(pattern)
    run.signal_group()
    run.finish()
    return run.text


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def computed_once(directory: Path, key: str, compute) -> Path:
    """directory/<digest of key>, made by compute(path) once in the session and shared by every worker: one
    that asks while another computes it waits for it (a lock per key), then reads it."""
    output_dir = directory / hashlib.sha256(key.encode()).hexdigest()[:16]
    done = output_dir.with_suffix(".done")
    with held_lock(output_dir.with_suffix(".lock")):
        if not done.exists():
            shutil.rmtree(output_dir, ignore_errors=True)  # left by a worker that failed
            compute(output_dir)
            done.write_text(key)
    return output_dir


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, session_env):
    """Uninterrupted runs, computed once per distinct flag set and shared by every test of every worker."""
    shared = shared_directory(tmp_path_factory) / "reference-runs"
    shared.mkdir(exist_ok=True)

    def get(flags: list[str], launcher=None, env_extra=None):
        def run(output_dir):
            result = train({**session_env, **(env_extra or {})}, output_dir, flags, launcher=launcher)
            assert result.returncode == 0, result.stdout + result.stderr

        return computed_once(shared, json.dumps([list(map(str, flags)), list(map(str, launcher or ())), sorted((env_extra or {}).items())]), run)

    return get


@pytest.fixture(scope="session")
def interrupted_runs(tmp_path_factory, session_env):
    """Runs killed with SIGKILL as soon as they print `after`, computed once per flag set and line: tests that
    start from the same interruption share its run, and each gets a copy of its own to damage or resume."""
    shared = shared_directory(tmp_path_factory) / "interrupted-runs"
    shared.mkdir(exist_ok=True)

    def copy(flags: list[str], after: str, destination: Path) -> Path:
        source = computed_once(shared, json.dumps([list(map(str, flags)), after]), lambda output_dir: kill_when(session_env, output_dir, flags, after))
        shutil.copytree(source, destination)
        return destination

    return copy
