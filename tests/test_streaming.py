"""--streaming: killed with SIGKILL at arbitrary moments and resumed, the result must not change."""

import json
import signal
from pathlib import Path

import pytest

from conftest import Training, computed_once, file_digest, held_lock, kill_when, shared_directory, tiny_flags, train, write_corpus
from test_multiprocess import TWO_RANKS

STEPS = 60

pytestmark = pytest.mark.slow  # each test starts the program six times (~2 min on a loaded 2-core machine)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three small text files (~2.5 KB each): 60 steps cross epochs, whose file orders differ. The same files
    for every worker, so that flags naming them, and so the reference runs, are shared (recorded_references)."""
    folder = shared_directory(tmp_path_factory) / "shards"
    folder.mkdir(exist_ok=True)
    with held_lock(folder / "shards.lock"):
        if not (folder / "part-2.txt").exists():
            for index in range(3):
                write_corpus(folder / f"part-{index}.partial", lines=40, seed=index)
                (folder / f"part-{index}.partial").rename(folder / f"part-{index}.txt")
    return folder / "part-*.txt"


@pytest.fixture(scope="session")
def recorded_references(tmp_path_factory):
    """A directory for uninterrupted runs with their batches recorded, each computed once per flag set and
    launcher and shared by every test of every worker (kill_resume_and_compare's `shared`)."""
    shared = shared_directory(tmp_path_factory) / "recorded-references"
    shared.mkdir(exist_ok=True)
    return shared


def stream_flags(train_file, **overrides):
    # 32-token blocks (~200 an epoch), buffer of 64, steps of 2 micro-batches of 4: 60 steps cross epochs.
    flags = dict(streaming=True, shuffle_buffer_size=64, max_steps=STEPS, save_steps=7, gradient_accumulation_steps=2)
    return tiny_flags(train_file, **{**flags, **overrides})


def read_batches(prefix: Path, rank: int) -> list[tuple[int, str]]:
    """(step, digests of its micro-batches) in the order trained; after a kill, steps since the checkpoint come again."""
    return [(int(step), digests) for step, digests in (line.split("\t") for line in Path(f"{prefix}.rank{rank}").read_text().splitlines())]


def uninterrupted_run(directory: Path, env, flags, launcher=None) -> Path:
    """directory/reference, a run of `flags` to its end, its batches recorded beside it (read_batches(directory/reference, rank))."""
    directory.mkdir(parents=True, exist_ok=True)
    reference = train(env, directory / "reference", flags, launcher=launcher, harness_env={"HARNESS_RECORD_BATCHES": str(directory / "reference")})
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    return directory / "reference"


def kill_resume_and_compare(tmp_path, env, flags, launcher=None, ranks=1, resumed_flags=None, shared=None):
    """The reference is computed in tmp_path, or once in the session in `shared` (recorded_references)."""
    if shared is None:
        reference_dir = uninterrupted_run(tmp_path, env, flags, launcher)
    else:
        key = json.dumps([list(map(str, flags)), list(map(str, launcher or ()))])
        reference_dir = computed_once(shared, key, lambda directory: uninterrupted_run(directory, env, flags, launcher)) / "reference"
    run_dir = tmp_path / "run"
    record = lambda name: {"HARNESS_RECORD_BATCHES": str(tmp_path / name)}  # noqa: E731

    resumed_from = []
    for kill_after_step in (10, 30, 30, 45):  # the third kill lands right after a resume (a second resume at once)
        run = Training(env, run_dir, resumed_flags or flags, launcher=launcher, harness_env=record("run"))
        match = run.wait_for(r"(✅ Resumed from checkpoint \(step (\d+)|🆕 Starting new training)")
        resumed_from.append(int(match.group(2) or 0))
        if kill_after_step > resumed_from[-1]:
            run.wait_for(rf"step {kill_after_step}/{STEPS}")
        run.signal_group(signal.SIGKILL)
        run.finish()
    final = train(env, run_dir, resumed_flags or flags, launcher=launcher, harness_env=record("run"))
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert resumed_from[0] == 0 and all(step > 0 for step in resumed_from[1:]), resumed_from

    assert file_digest(run_dir / "model.safetensors") == file_digest(reference_dir / "model.safetensors")
    assert json.loads((run_dir / "trainer_state.json").read_text())["epoch"] > 1  # crossed an epoch boundary
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    assert history == json.loads((reference_dir / "trainer_state.json").read_text())["log_history"]
    for rank in range(ranks):
        expected = dict(read_batches(reference_dir, rank))
        assert sorted(expected) == list(range(1, STEPS + 1))
        trained = read_batches(tmp_path / "run", rank)
        assert {step for step, _ in trained} == set(expected)
        assert [(step, digests) for step, digests in trained if digests != expected[step]] == []  # every attempt of every step
    return reference_dir, run_dir


def test_one_rank_killed_at_arbitrary_moments_ends_byte_identical(tmp_path, session_env, shards, recorded_references):
    kill_resume_and_compare(tmp_path, session_env, stream_flags(shards), shared=recorded_references)


def test_two_workers_killed_and_resumed_give_the_zero_worker_result(tmp_path, session_env, shards, recorded_references):
    # The reference reads with no worker (the previous test's, computed once); the killed runs tokenize in 2 worker processes.
    kill_resume_and_compare(tmp_path, session_env, stream_flags(shards), resumed_flags=stream_flags(shards, dataloader_num_workers=2), shared=recorded_references)


def test_two_ranks_with_two_workers_killed_at_arbitrary_moments_end_byte_identical(tmp_path, session_env, shards):
    # Reference: 2 ranks reading without workers; killed runs: 2 ranks with 2 tokenizing workers each.
    reference, run = kill_resume_and_compare(
        tmp_path, session_env, stream_flags(shards), launcher=TWO_RANKS, ranks=2,
        resumed_flags=stream_flags(shards, dataloader_num_workers=2),
    )  # fmt: skip
    assert (run / "checkpoint-60" / "stream_state_1.pt").is_file()  # one stream snapshot per rank
    batches = [dict(read_batches(reference, rank)) for rank in (0, 1)]
    assert all(batches[0][step] != batches[1][step] for step in batches[0])  # the ranks read different parts


def test_resume_on_another_number_of_processes_is_refused_in_one_line(tmp_path, session_env, shards):
    flags = stream_flags(shards, max_steps=14)
    kill_when(session_env, tmp_path / "run", flags, r"Saved checkpoint-7")
    code_file = tmp_path / "exit_code"
    refused = train(session_env, tmp_path / "run", flags + ["--exit_code_file", str(code_file)], launcher=TWO_RANKS)
    assert code_file.read_text().strip() == "2"
    line = "error: --streaming: the checkpoint was written by 1 process(es), this run has 2"
    assert refused.stderr.count(line) == 1, refused.stderr[-2000:]
    assert "With --allow_config_change each of the 2 processes would start its part" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-7"]  # nothing lost


def test_ctrl_c_with_workers_stops_with_a_checkpoint_and_no_worker_traceback(tmp_path, session_env, shards):
    flags = stream_flags(shards, dataloader_num_workers=2)
    run = Training(session_env, tmp_path / "run", flags)
    run.wait_for(r"step 10/")
    run.signal_group(signal.SIGINT)  # a terminal's Ctrl+C reaches the workers too
    assert run.finish() == 75
    assert "🛑 Stopping at step" in run.text and "Traceback" not in run.text and "KeyboardInterrupt" not in run.text
    resumed = train(session_env, tmp_path / "run", flags)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]


def test_allow_config_change_on_another_number_of_processes_restarts_the_epoch(tmp_path, session_env, shards):
    flags = stream_flags(shards, max_steps=20)
    kill_when(session_env, tmp_path / "run", flags, r"Saved checkpoint-14")
    resumed = train(session_env, tmp_path / "run", flags + ["--allow_config_change"], launcher=TWO_RANKS)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "--allow_config_change: 1 → 2 processes; each of the 2 processes would start its part" in resumed.stdout
    assert "world size 1 → 2: gradient accumulation 2 → 1, global batch 8 unchanged" in resumed.stdout
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == 20
