"""Random draws keyed to the samples (randomness.py), and --full_determinism."""

import subprocess
import sys

import torch

from conftest import REPO, file_digest, tiny_flags, train
from resumable.randomness import MicroBatchSeeding, micro_batch_seed, micro_batch_seeds

FLAGS = dict(max_train_samples=200, max_steps=30, save_steps=10, gradient_accumulation_steps=2)


def seeds_of_global_batch(world_size: int, accumulation: int, step: int) -> dict:
    """{global batch number within the epoch: seed} for one step, laid out as accelerate deals batches out.

    Rank r's j-th per-device batch of an epoch is batch j * world_size + r (BatchSamplerShard), and
    slot a of step s is the rank's batch j = s * accumulation + a.
    """
    seeds = {}
    for rank in range(world_size):
        for slot, seed in enumerate(micro_batch_seeds(42, step, rank, world_size, accumulation)):
            seeds[((step - 1) * accumulation + slot) * world_size + rank] = seed
    return seeds


def test_the_seeds_are_the_ones_checkpoints_were_trained_with():
    # Pinned: a changed seed function would give a resumed run other dropout masks than its first part had, silently.
    assert [micro_batch_seed(0, 1, 0, 0, 1), micro_batch_seed(42, 5, 1, 1, 2), micro_batch_seed(1234, 100000, 3, 2, 4)] == [
        5492360401230830419, 1329558323325687153, 6855866066612433206]
    seeding = MicroBatchSeeding(42, 1, 2, torch.device("cpu"))
    seeding.before(5, 1)  # what run.batches calls before the micro-batch
    assert torch.initial_seed() == micro_batch_seed(42, 5, 1, 1, 2)


def test_the_same_samples_get_the_same_seed_in_every_layout_of_the_global_batch():
    for step in (1, 2, 77):
        layouts = [(1, 8), (2, 4), (4, 2), (8, 1)]  # processes x accumulation, global batch 8 micro-batches
        seeds = [seeds_of_global_batch(world, accumulation, step) for world, accumulation in layouts]
        assert all(each == seeds[0] for each in seeds[1:]), step
        assert sorted(seeds[0]) == list(range((step - 1) * 8, step * 8))  # exactly this step's batches
        assert len(set(seeds[0].values())) == 8  # every micro-batch draws other masks
    assert set(seeds_of_global_batch(2, 1, 5).values()).isdisjoint(seeds_of_global_batch(2, 1, 6).values())
    assert micro_batch_seeds(43, 5, 0, 2, 1) != micro_batch_seeds(42, 5, 0, 2, 1)  # --seed changes the masks


def test_full_determinism_sets_what_an_exact_gpu_run_needs_before_cuda_starts(session_env):
    probe = (
        "import os, torch; from resumable import randomness; randomness.enable_full_determinism(); "
        "print(os.environ['CUBLAS_WORKSPACE_CONFIG'], torch.are_deterministic_algorithms_enabled(), "
        "torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.cuda.is_initialized())"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=session_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == [":4096:8", "True", "True", "False", "False"], result.stderr


def test_full_determinism_does_not_change_the_result_on_cpu(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **FLAGS)  # tests/tiny-gpt2.json: dropout 0.1
    reference = reference_runs(flags)
    deterministic = train(session_env, tmp_path / "run", [*flags, "--full_determinism"])
    assert deterministic.returncode == 0, deterministic.stderr[-2000:]
    first_line = next(line for line in deterministic.stdout.splitlines() if line.startswith("⚙️"))
    assert first_line.endswith("deterministic algorithms (--full_determinism)")
    assert file_digest(tmp_path / "run" / "model.safetensors") == file_digest(reference / "model.safetensors")
