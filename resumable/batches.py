"""The batches of a run, epoch by epoch, from any optimizer step on: what makes a resume replay the same samples.

    micro_batches_of_epoch(dataloader, epoch, steps_done_in_epoch, steps_to_take, accumulation)
                            the micro-batches of the optimizer steps still to take in `epoch`, one at a
                            time; mid-epoch the batches already trained on are skipped without being loaded
    resumability_problem(dataloader)
                            why a prepared data loader's order cannot be replayed after a resume (one
                            line that says what to change), or None. Streams: resumable/streams.py

The order of an epoch is a function of the loader's seed and the epoch only: accelerate's
SeedableRandomSampler (DataLoaderConfiguration(use_seedable_sampler=True)) draws epoch e's
permutation from seed + e, and `set_epoch(e)` is called before each epoch, so a run resumed in
epoch 3 neither replays epoch 0's order (accelerate#2016, #3242) nor counts the skipped batches
again in the next epoch (#1451): the skip applies to the resumed epoch alone.
"""

from __future__ import annotations

import itertools


def micro_batches_of_epoch(dataloader, epoch: int, steps_done_in_epoch: int, steps_to_take: int, accumulation: int):
    """An iterator over the micro-batches of the optimizer steps still to take this epoch, one at a time.

    Mid-epoch (after a resume) the batches already trained on are skipped without being
    loaded, so the next batch is the one the uninterrupted run took next. One at a time, so
    that the loader fetches the next batch only when the loop asks for it: accelerate marks
    the end of the data when it fetches the last batch, and `accelerator.accumulate` syncs
    gradients there, so fetching a step's micro-batches ahead ended a step one early.
    An iterator, not a generator: each micro-batch then passes through no Python frame of its own.
    """
    from accelerate import skip_first_batches

    from resumable import state

    dataloader.set_epoch(epoch)  # the sample order is a function of (seed, epoch)
    batches_to_skip = steps_done_in_epoch * accumulation
    if batches_to_skip:
        rng_before = state.capture_rng_state()
        batches = iter(skip_first_batches(dataloader, batches_to_skip))
        first = next(batches)
        # Starting the skipping iterator drew from the global torch RNG, which the
        # uninterrupted run did not do at this point: undo it, or dropout would differ.
        state.restore_rng_state(rng_before)
        batches = itertools.chain([first], batches)
    else:
        batches = iter(dataloader)
    return itertools.islice(batches, steps_to_take * accumulation)


def steps_per_epoch(dataloader, accumulation: int, world_size: int) -> int:
    """Optimizer steps in one epoch: the complete global batches, the same number in every layout of them.

    A prepared loader is sharded (BatchSamplerShard): rank r takes the per-device batches r, r + W, ...
    of the epoch's order, and with even_batches the last round is padded with batches from the epoch's
    start. Counting the unsharded batches, an epoch has the same steps on 2 processes x 1 accumulation
    slot as on 1 x 2 (an elastic resume), and no step trains padding.
    """
    from accelerate.data_loader import BatchSamplerShard

    sharded = getattr(dataloader, "batch_sampler", None)
    if isinstance(sharded, BatchSamplerShard) and not sharded.split_batches:
        return len(sharded.batch_sampler) // (accumulation * world_size)
    return len(dataloader) // accumulation


def total_steps(max_steps: int | None, num_epochs: float | None, steps_per_epoch: int) -> int:
    """The optimizer steps a run trains: max_steps, or num_epochs of steps_per_epoch rounded up (a float's noise,
    3.0000000000000004 epochs, does not add a step)."""
    return max_steps if max_steps is not None else int(num_epochs * steps_per_epoch + 0.999999)


def data_order_seed(dataloader) -> int | None:
    """The seed the loader's shuffle starts from (recorded in each checkpoint, compared on resume); None if it does not shuffle."""
    from accelerate.data_loader import SeedableRandomSampler

    sampler = dataloader.get_sampler() if hasattr(dataloader, "get_sampler") else None
    return int(sampler.initial_seed) if isinstance(sampler, SeedableRandomSampler) else None


def resumability_problem(dataloader) -> str | None:
    """Why `dataloader`'s batches cannot be replayed exactly from a step on, or None if they can."""
    import torch
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard, SeedableRandomSampler

    if not isinstance(dataloader, (DataLoaderShard, DataLoaderDispatcher)):
        return "pass the DataLoader through accelerator.prepare(...) first (the prepared one shards it and knows its epoch)"
    if isinstance(dataloader.dataset, torch.utils.data.IterableDataset):
        # accelerate's prepared loaders iterate one batch ahead (DataLoaderShard.__iter__ fetches the next batch before
        # yielding the current one; DataLoaderDispatcher too), and with several processes they read one stream for all of
        # them (the main process reads and broadcasts each batch, or each rank reads every batch and keeps its slice).
        return (
            "accelerator.prepare(...) made this stream's loader read one batch ahead of the training (and, with several processes, "
            "read one stream for all of them), so its state is not the position after the last batch trained: pass the DataLoader "
            "(num_workers=0) over a stream that reads this rank's part (shard by accelerator.process_index) to run.batches without preparing it"
        )
    sampler = dataloader.get_sampler()
    if isinstance(sampler, torch.utils.data.RandomSampler) and not isinstance(sampler, SeedableRandomSampler):
        return (
            "its shuffle is not seeded per epoch, so a resumed run would see another order; build the Accelerator with "
            "dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=SEED)"
        )
    if getattr(dataloader, "num_workers", 0) and getattr(dataloader, "persistent_workers", False):
        return "persistent_workers=True keeps the workers of the epoch before a resume; pass persistent_workers=False"
    return None
