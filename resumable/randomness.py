"""Random draws inside a training step follow the samples, not the process; --full_determinism.

    micro_batch_seed(seed, step, slot, rank, world_size)
    micro_batch_seeds(seed, step, rank, world_size, accumulation)
                            one seed per micro-batch this rank trains at `step`, a function of
                            (--seed, step, the micro-batch's place in the global batch) only
    seed_micro_batch(seed, device)
                            called before each micro-batch's forward pass: the generators dropout
                            draws from (the CPU one, and this rank's accelerator device) start there
    MicroBatchSeeding(seed, rank, world_size, device).before(step, slot)
                            both in one call, as resumable.Run makes it before each micro-batch
    enable_full_determinism()
                            deterministic kernels for GPUs; must run before CUDA is initialised

Why: with one RNG stream per rank, a micro-batch's dropout masks depend on which rank trains it
and what that rank drew before, so a checkpoint resumed on another number of processes could not
replay them. Seeded per micro-batch, the same samples get the same masks in a 2 x 1 layout
(2 ranks, no accumulation) and a 1 x 2 layout (1 rank, 2 accumulation slots); only the order of
the gradient sum differs. Random state outside the step (data order, evaluation, data-loading
workers) is saved and restored with the checkpoint as before (state.py).
"""

from __future__ import annotations

import hashlib
import os


def micro_batch_index(slot: int, rank: int, world_size: int) -> int:
    """Where a micro-batch sits in the global batch of its step, the same in every layout.

    accelerate's BatchSamplerShard (use_seedable_sampler, split_batches=False) deals the global
    sample order out in per-device batches, round-robin over the ranks: rank r's j-th batch of an
    epoch is batch j * world_size + r. In step s with `accumulation` slots, rank r's slot a is its
    batch j = s * accumulation + a, i.e. global batch (s * accumulation + a) * world_size + r: within
    the step, index a * world_size + r. 2 x 1: rank r -> r. 1 x 2: slot a -> a. The same samples.
    """
    return slot * world_size + rank


def micro_batch_seeds(seed: int, step: int, rank: int, world_size: int, accumulation: int) -> list[int]:
    """The seeds of this rank's micro-batches in optimizer step `step`, in slot order."""
    return [micro_batch_seed(seed, step, slot, rank, world_size) for slot in range(accumulation)]


def micro_batch_seed(seed: int, step: int, slot: int, rank: int, world_size: int) -> int:
    """The seed of this rank's micro-batch in accumulation `slot` of optimizer step `step` (counted from 1)."""
    return MicroBatchSeeding(seed, rank, world_size).seed_of(step, slot)


def seed_micro_batch(seed: int, device) -> None:
    """Seed the CPU generator and the current accelerator device's (not all GPUs: one call, ~µs)."""
    import torch

    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        getattr(torch, device.type).manual_seed(seed)  # torch.cuda.manual_seed: this rank's current device only


class MicroBatchSeeding:
    """This rank's micro-batch seeds (`seed_of`), and the seeding before each micro-batch (`before`) in one call.

    Why a class: run.batches seeds before every micro-batch, between two steps of the model, when the caches are
    cold and each Python call or lookup costs ~1 µs. The key's constant part is hashed once and the generators are
    looked up once, so the seeding is one call (bench/library_overhead.py, BENCHMARKS.md).
    """

    def __init__(self, seed: int, rank: int, world_size: int, device=None):
        """`device`: the accelerator device whose generator `before` seeds; `seed_of` alone needs none."""
        # A hash of "seed/step/index", not seed + step + index: neighbouring keys must not give related streams.
        self.key_start = hashlib.blake2b(f"{seed}/".encode(), digest_size=8)
        self.rank, self.world_size = rank, world_size
        if device is not None:
            import torch

            self.seed_cpu = torch.default_generator.manual_seed
            self.seed_device = None if device.type == "cpu" else getattr(torch, device.type).manual_seed  # this rank's current device only

    def seed_of(self, step: int, slot: int) -> int:
        key = self.key_start.copy()
        key.update(f"{step}/{micro_batch_index(slot, self.rank, self.world_size)}".encode())
        return int.from_bytes(key.digest(), "little")

    def before(self, step: int, slot: int) -> None:
        """Seed the CPU generator and this rank's device's with the seed of (step, slot)."""
        seed = self.seed_of(step, slot)
        self.seed_cpu(seed)
        if self.seed_device is not None:
            self.seed_device(seed)


def enable_full_determinism() -> None:
    """Deterministic algorithms everywhere (transformers' --full_determinism), before CUDA starts.

    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its first handle, so this runs before the
    accelerator touches the GPU. On CPU the kernels PyTorch uses are deterministic already, so the
    result does not change. An op with no deterministic implementation raises a RuntimeError
    naming it, rather than silently differing from run to run.
    """
    import torch

    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"  # transformers' flash_attention_2 backward (slower)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
