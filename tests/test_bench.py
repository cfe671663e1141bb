"""Smoke runs of the benchmarks at tiny sizes, so they do not rot (the full runs are in BENCHMARKS.md)."""

import subprocess
import sys

import pytest

from conftest import REPO, TINY_MODEL, write_corpus


def run_bench(env, script: str, *flags, timeout: float = 300) -> list[list[str]]:
    """Run bench/SCRIPT and return the cells of its Markdown table rows (header and separator left out)."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *map(str, flags)],
                            env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]


def number(cell: str) -> float:
    return float(cell.rstrip("x%s ").replace(",", ""))


def test_restart_preprocessing_benchmark_runs_and_the_restart_reads_the_cache(session_env):
    [row] = run_bench(session_env, "restart_preprocessing.py", "--samples", 3000)
    first, restart = float(row[2]), float(row[3])
    assert row[0] == "3,000" and restart < first


def test_loop_overhead_benchmark_times_all_four_loops(session_env):
    rows = run_bench(session_env, "loop_overhead.py", "--config_name", TINY_MODEL, "--block_size", 32, "--repeats", 1,
                     "--warmup_steps", 5, "--measured_steps", 10, "--logging_steps", 5, "--corpus_lines", 1000)  # fmt: skip
    assert [row[0] for row in rows] == ["plain PyTorch loop", "plain loop, train_loop's malloc limits", "train_loop.py", "transformers.Trainer"]
    assert all(number(row[1]) > 0 for row in rows)
    assert rows[0][3] == "1.000x (1.000-1.000)" and rows[1][4] == "1.000x (1.000-1.000)"


def test_side_by_side_benchmark_pairs_train_loop_with_each_other_loop(session_env):
    rows = run_bench(session_env, "loop_overhead.py", "side_by_side", "--config_name", TINY_MODEL, "--block_size", 32, "--repeats", 1,
                     "--warmup_steps", 10, "--measured_steps", 200, "--logging_steps", 10, "--corpus_lines", 1000,
                     "--min_overlap_seconds", 0.5)  # fmt: skip
    assert [row[0] for row in rows] == ["plain PyTorch loop", "plain loop, train_loop's malloc limits", "transformers.Trainer"]
    assert all(0.2 < number(row[2]) < 5 and number(row[3]) > 0 and number(row[4]) > 0 for row in rows)


def test_save_cost_benchmark_writes_a_checkpoint_of_weights_and_two_adam_moments(session_env):
    [row] = run_bench(session_env, "save_cost.py", "--models", "64x2", "--repeats", 1)
    parameters, megabytes = number(row[1]), number(row[2])
    assert 11 < megabytes * 1e6 / parameters < 14  # 3 x 4 bytes per parameter (tied embeddings once), plus small files
    assert all(number(cell) > 0 for cell in (row[3], row[4], row[6], row[7]))


def test_resume_cost_benchmark_resumes_early_and_late_in_the_epoch(session_env):
    rows = run_bench(session_env, "resume_cost.py", "--samples", 4000, "--batch_size", 16, "--repeats", 1)
    early, late, ratio = rows
    assert (early[1], late[1]) == ("2", "238")  # 1 % and 95 % of 250 steps
    for row in (early, late):
        assert 0 < number(row[2]) < number(row[3])  # '✅ Resumed' comes before the first step
    assert number(ratio[3]) > 0


def test_interval_advice_measures_saves_and_steps_of_a_real_run(session_env, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=500)
    rows = run_bench(session_env, "interval_advice.py", "--probe_steps", 30, "--probe_save_steps", 10, "--config_name", TINY_MODEL,
                     "--train_file", corpus, "--block_size", 32, "--per_device_train_batch_size", 4)  # fmt: skip
    assert [row[0] for row in rows] == ["250", "1000", "5000"]
    between_saves = [float(row[1].split()[0]) * (60 if row[1].endswith("min") else 1) for row in rows]
    assert 0 < between_saves[0] < between_saves[1] < between_saves[2]
    assert all(number(row[2]) >= 0 for row in rows)


def test_content_hash_benchmark_times_the_hash_and_a_cache_hit_costs_less(session_env):
    rows = run_bench(session_env, "content_hash.py", "--size_mb", 8, "--repeats", 1)
    assert [row[0] for row in rows] == [
        "hash, from the disk (page cache dropped) (8 MiB)", "hash, from the page cache (8 MiB)",
        "read only, from the page cache (no hash) (8 MiB)", "hash found in the cache file (8 MiB)",
    ]  # fmt: skip
    assert float(rows[3][1]) < float(rows[1][1])


@pytest.mark.slow
def test_streaming_benchmark_resumes_at_1_and_95_percent_and_estimates_the_trainer(session_env):
    rows = run_bench(session_env, "streaming.py", "--parts", "resume,trainer", "--gigabytes", 0.003, "--repeats", 1, "--trainer_seconds", 2)
    by_name = {row[0]: row for row in rows}
    # The benchmark itself checks that each resume's first progress line shows epoch 0.01 / 0.95.
    assert number(by_name["1% of epoch 1"][1]) > 0 and number(by_name["95% of epoch 1"][1]) > 0 and number(by_name["95% / 1%"][1]) > 0
    assert any(row[0].startswith("estimated resume at 95 %") for row in rows)


def test_async_save_benchmark_compares_the_blocked_time_and_the_steps_per_second(session_env):
    [row] = run_bench(session_env, "async_save.py", "blocked", "--models", "64x2", "--repeats", 1)
    synchronous, blocked, written = number(row[2]), number(row[3]), number(row[5])
    assert synchronous > 0 and 0 < blocked < written
    [row] = run_bench(session_env, "async_save.py", "steps", "--models", "64x2", "--repeats", 1, "--measured_steps", 200,
                      "--logging_steps", 5, "--corpus_lines", 1000, "--min_overlap_seconds", 0.5)  # fmt: skip
    assert number(row[1]) > 0 and number(row[2]) > 0 and 0.2 < number(row[3].split()[0]) < 5


@pytest.mark.slow
def test_gpu_check_runs_what_it_can_here_and_says_what_it_skipped(session_env):
    import torch

    rows = {row[0]: row for row in run_bench(session_env, "gpu_check.py", "--quick")}
    bf16 = next(row for name, row in rows.items() if name.startswith("bf16 kill -9 + resume"))
    assert bf16[2] == "passed" and "byte-identical" in bf16[3]
    assert rows["save of a ~1.2 GB state vs direct write"][2:4] == ["skipped", "--quick"]
    if not torch.cuda.is_available():
        assert rows["fp16 kill -9 + resume: GradScaler state"][2] == "skipped"
        assert rows["2 processes (NCCL) kill -9 + resume"][3].startswith("needs 2 CUDA devices, found 0")


def test_lora_checkpoint_size_benchmark_compares_full_and_lora_checkpoints(session_env, tmp_path):
    shape = tmp_path / "tiny.json"
    shape.write_text('{"model_type": "gpt2", "vocab_size": 384, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}')
    rows = run_bench(session_env, "lora_checkpoint_size.py", "--config_name", TINY_MODEL, "--pretrained_config", shape, "--block_size", 32)
    assert [row[0].split(" (")[0] for row in rows] == ["built-in", "local pretrained directory"]
    for row in rows:
        assert number(row[3]) > number(row[4]) > 0  # LoRA's checkpoint is the smaller
        assert abs(number(row[4]) / number(row[3]) * 100 - number(row[5])) < 0.01


def test_seeding_cost_benchmark_times_steps_with_and_without_the_seeding(session_env):
    rows = run_bench(session_env, "seeding_cost.py", "--config_name", TINY_MODEL, "--block_size", 32, "--steps", 6,
                     "--warmup", 2, "--corpus_lines", 500)  # fmt: skip
    assert [row[0] for row in rows] == ["with the seeding", "without", "the seeding calls alone"]
    assert all(number(row[1]) > 0 for row in rows) and rows[1][2] == "1.0000x"


@pytest.mark.slow
def test_elastic_resume_benchmark_resumes_on_the_other_number_of_processes(session_env):
    rows = run_bench(session_env, "elastic_resume.py", "--max_steps", 12, "--save_steps", 5, "--resume_from_step", 5, "--corpus_lines", 500, timeout=900)
    assert [row[0] for row in rows] == ["2 → 1", "1 → 2"]
    assert all(0 <= number(row[1]) < 1e-5 for row in rows)


@pytest.mark.slow
def test_launch_speed_benchmark_times_launch_sh_and_the_plain_loop_in_alternation(session_env):
    [row] = run_bench(session_env, "launch_speed.py", "--models", "32x1", "--rounds", 2, "--block_size", 32,
                      "--warmup_steps", 10, "--measured_steps", 40, "--logging_steps", 10, "--corpus_lines", 1000)  # fmt: skip
    assert row[0] == "32x1" and len(row[2].split(", ")) == 2  # one ratio per round
    assert 0.1 < number(row[1].split()[0]) < 10 and number(row[3]) > 0 and number(row[4]) > 0


def test_save_in_loop_benchmark_sets_the_launched_loop_beside_the_direct_write(session_env):
    [row] = run_bench(session_env, "save_in_loop.py", "--models", "64x2", "--rounds", 1, "--cycles", 2, "--repeats", 1, "--corpus_lines", 500)
    parameters, megabytes = number(row[1]), number(row[2])
    assert 11 < megabytes * 1e6 / parameters < 14  # the same state as bench/save_cost.py writes
    saved, plain_write, out_of_loop, direct = number(row[4]), number(row[6]), number(row[13]), number(row[14])
    assert saved > 0 and plain_write > 0 and out_of_loop > 0 and direct > 0  # the stalls and the cycle difference: noise at this size
    assert row[7].endswith(")") and number(row[7].split()[0]) != 0  # launch.sh / plain loop: median (range); either sign at this size


def test_page_reuse_benchmark_times_a_write_after_each_pause(session_env):
    rows = run_bench(session_env, "save_cost.py", "page_reuse", "--megabytes", 2, "--writes", 3, "--pauses", 0, 0.1)
    assert [row[0] for row in rows] == ["0", "0.1"]
    assert all(0 < number(row[1]) <= number(row[3]) for row in rows)  # into the page cache, then with fsync


def test_backup_benchmark_uploads_restores_and_times_a_fresh_machine_to_its_first_step(session_env):
    rows = run_bench(session_env, "backup_speed.py", "transfer", "--size_mb", 4, "--repeats", 1)
    assert [row[0] for row in rows] == ["upload 4 MB", "restore 4 MB"]
    assert all(number(row[3].split()[0]) > 0 for row in rows)
    [row] = run_bench(session_env, "backup_speed.py", "restore", "--model", "64x2", "--repeats", 1, timeout=600)
    assert row[0].startswith("restore 64x2") and number(row[3].split()[0]) > 0


def test_library_overhead_benchmark_times_the_example_beside_the_same_loop_without_the_library(session_env):
    rows = run_bench(session_env, "library_overhead.py", "--steps", 60, "--rounds", 1, "--save_steps", 20)
    assert [row[0] for row in rows] == ["plain loop", "plain loop + accelerator.save_state", "resumable (examples/digits_classifier.py)"]
    assert all(number(row[1]) > 0 for row in rows)
    assert rows[2][3] == "1.000x (1.000)"  # the library against itself


def test_trainer_overhead_benchmark_times_the_trainer_script_with_and_without_the_two_lines(session_env):
    rows = run_bench(session_env, "trainer_overhead.py", "--steps", 40, "--rounds", 1, "--save_steps", 20)
    assert [(row[0], row[1]) for row in rows] == [("20", "plain Trainer script"), ("20", "with resumable.trainer")]
    assert all(number(row[2]) > 0 for row in rows)
    assert rows[1][4] == "1.000x (1.000)"  # the integration against itself
